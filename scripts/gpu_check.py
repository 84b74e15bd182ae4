#!/usr/bin/env python3
"""The GPU check without pytest: runs the checks of tests/gpu_checks.py (the same ones
tests/test_kernels_gpu.py runs under pytest), the device against the CPU emulator bit
for bit over a case matrix, then benchmarks/gpu_step.py, and ends with one summary.

Needs NumPy and CuPy (torch for the torch rows of the benchmark, g++ for the
emulator); neither pytest nor hypothesis. Every result is written as soon as it is
known, to stdout (flushed) and, when $OUT is set, to $OUT/gpu_check.txt (the
benchmark's rows also to $OUT/gpu_step_rows.jsonl and $OUT/gpu_step.md), so a
timeout loses nothing already measured.

Time: the whole check ends within --budget-s (default 330 s, under 6 minutes with
the interpreter's start). Each stage (checks at most 150 s, bit-exactness at most
60 s, the benchmark what is left) starts only if its minimum fits in what is left,
else it is skipped with a line saying so, and runs under a timeout: the checks and
the bit-exactness matrix are interrupted (SIGALRM) at theirs, the benchmark is a
subprocess with a budget of its own, killed at its timeout. The torch.compile rows
of the benchmark (minutes of compiling) run only with --compile.

Exit status: 0 when every check ran and passed, the device matched the emulator on
every case and the benchmark ran; 1 otherwise (also when CuPy or a device is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


class Log:
    """Writes each line at once to stdout and, if given, to a file (appended, flushed)."""

    def __init__(self, path: Path | None) -> None:
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()


# ---- the time budget ---------------------------------------------------------------------------
DEFAULT_BUDGET_S = 330.0
# Kept free at the end of the budget for the summary.
SUMMARY_S = 5.0


@dataclass(frozen=True)
class Stage:
    """A stage runs for at most ``limit_s`` (None: what is left), and only if at least
    ``minimum_s`` is left when it would start."""

    name: str
    limit_s: float | None
    minimum_s: float


STAGES = {
    "checks": Stage("checks", 150.0, 20.0),
    "bitexact": Stage("bitexact", 60.0, 10.0),
    "benchmark": Stage("benchmark", None, 45.0),
}


class Budget:
    """What is left of ``seconds`` from its creation, on ``clock``."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.end = clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()


def stage_timeout(stage: Stage, budget: Budget, log: Callable[[str], None]) -> float | None:
    """The seconds ``stage`` may run, or None (said in a line) when its minimum does not fit."""
    left = budget.left() - SUMMARY_S
    if left < stage.minimum_s:
        log(
            f"{stage.name}: NOT RUN (time limit: {max(left, 0):.0f} s left of the budget, "
            f"it needs at least {stage.minimum_s:.0f} s)"
        )
        return None
    return left if stage.limit_s is None else min(stage.limit_s, left)


class StageTimeout(BaseException):
    """Raised in the main thread when a stage's time is up (a BaseException, so that a
    check's own ``except Exception`` does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with StageTimeout after ``seconds`` (SIGALRM: main thread,
    between Python bytecodes, so a call stuck in C ends only when it returns)."""

    def expire(signum: int, frame: object) -> None:
        raise StageTimeout(f"time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_checks(cp, log: Log, deadline: float, only: str | None = None) -> tuple[int, int, int, int]:
    """(passed, failed, skipped, not run); none starts after ``deadline`` (monotonic)."""
    import gpu_checks

    passed = failed = skipped = not_run = 0
    checks = [c for c in gpu_checks.CHECKS if not only or only in c[0]]
    for index, (name, check, kwargs) in enumerate(checks):
        if time.monotonic() > deadline:
            log(f"check {name}: NOT RUN (time limit)")
            not_run += 1
            continue
        start = time.monotonic()
        try:
            with time_limit(deadline - start):
                check(cp, **kwargs)
        except StageTimeout:
            failed += 1
            log(f"check {name}: FAILED (time limit: stopped after {time.monotonic() - start:.1f} s)")
            for later, _, _ in checks[index + 1 :]:
                log(f"check {later}: NOT RUN (time limit)")
            not_run += len(checks) - index - 1
            break
        except gpu_checks.Skip as e:
            skipped += 1
            log(f"check {name}: skipped ({e})")
            continue
        except Exception:
            failed += 1
            log(f"check {name}: FAILED ({time.monotonic() - start:.1f} s)")
            for line in traceback.format_exc().rstrip().splitlines()[-12:]:
                log(f"    {line}")
            continue
        passed += 1
        log(f"check {name}: passed ({time.monotonic() - start:.1f} s)")
    return passed, failed, skipped, not_run


def run_bitexact(cp, log: Log, deadline: float) -> tuple[int, int]:
    import gpu_checks

    device, emulator = gpu_checks.device_runner(cp), gpu_checks.emulator_runner()
    cases = gpu_checks.bitexact_cases()
    equal = done = 0
    for case in cases:
        if time.monotonic() > deadline:
            log(f"bitexact: {len(cases) - done} case(s) NOT RUN (time limit)")
            break
        try:
            with time_limit(deadline - time.monotonic()):
                e, n = gpu_checks.bitexact(device, emulator, [case], log)
        except StageTimeout:
            log(f"bitexact {case['name']}: stopped (time limit); {len(cases) - done - 1} more NOT RUN")
            break
        except Exception:
            log(f"bitexact {case['name']}: ERROR")
            for line in traceback.format_exc().rstrip().splitlines()[-8:]:
                log(f"    {line}")
            e, n = 0, 1
        equal += e
        done += n
    return equal, len(cases)


def stream_command(command: list[str], log: Callable[[str], None], timeout: float) -> int:
    """Run ``command``, logging each line of its output (stdout and stderr) as it comes;
    killed after ``timeout`` seconds (exit status 124 then)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        process.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log(f"    {line.rstrip()}")
        rc = process.wait()
    finally:
        timer.cancel()
    if expired.is_set():
        log(f"    (killed at its time limit of {timeout:.0f} s)")
        return 124
    return rc


def benchmark_command(folder: Path, budget_s: float, quick: bool, compile_rows: bool) -> list[str]:
    """benchmarks/gpu_step.py writing into ``folder``, ending by itself within ``budget_s``."""
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--out", str(folder)]
    command += ["--budget-s", f"{budget_s:.0f}"]
    return command + (["--quick"] if quick else []) + (["--compile"] if compile_rows else [])


def run_benchmark(
    log: Log, out: Path | None, timeout: float, quick: bool, compile_rows: bool = False
) -> tuple[int, str]:
    """The benchmark's exit status and its final table (or, if it did not finish, the
    markdown table of the rows it measured)."""
    folder = out if out is not None else ROOT / "benchmarks" / "results"
    # Its own budget ends it (with its tables written) before the kill at the timeout.
    command = benchmark_command(folder, max(timeout - 15.0, 1.0), quick, compile_rows)
    log(f"benchmark: {' '.join(command)}")
    rc = stream_command(command, log, timeout)
    for name in ("gpu_step.txt", "gpu_step.md") if rc == 0 else ("gpu_step.md",):
        if (folder / name).exists():
            return rc, (folder / name).read_text()
    return rc, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="run the checks whose name contains this text")
    parser.add_argument("--skip-bitexact", action="store_true")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small benchmark sizes (a smoke test)")
    parser.add_argument(
        "--compile", action="store_true", help="the benchmark's torch.compile rows too (minutes)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check"
    )
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log = Log(out / "gpu_check.txt" if out is not None else None)
    start = time.monotonic()
    log(f"== gpu_check: python {sys.version.split()[0]} ({sys.executable}), budget {args.budget_s:.0f} s ==")
    for module in ("numpy", "cupy", "torch", "pytest", "hypothesis"):
        try:
            version = __import__(module).__version__
        except Exception as e:
            version = f"not available ({type(e).__name__})"
        log(f"{module}: {version}")

    import gpu_checks

    cp, why_not = gpu_checks.load_cupy()
    if cp is None:
        log(f"{why_not}: nothing to check on a GPU")
        log("== summary ==")
        log(f"tests: not run ({why_not})")
        return 1
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    log(f"device: {name} sm_{props['major']}{props['minor']}, driver {cp.cuda.runtime.driverGetVersion()}")

    # None: the stage did not run (out of time, or skipped by an option)
    tests: tuple[int, int, int, int] | None = None
    bitexact: tuple[int, int] | None = None
    limit = stage_timeout(STAGES["checks"], budget, log)
    if limit is not None:
        tests = run_checks(cp, log, time.monotonic() + limit, args.only)
    if not args.skip_bitexact:
        limit = stage_timeout(STAGES["bitexact"], budget, log)
        if limit is not None:
            bitexact = run_bitexact(cp, log, time.monotonic() + limit)
    bench_rc: int | None = None
    table = ""
    if not args.skip_benchmark:
        limit = stage_timeout(STAGES["benchmark"], budget, log)
        if limit is not None:
            bench_rc, table = run_benchmark(log, out, limit, args.quick, args.compile)

    log("== summary ==")
    if tests is None:
        log("tests: NOT RUN (time limit)")
    else:
        passed, failed, skipped, not_run = tests
        log(f"tests: {passed} passed, {failed} failed, {skipped} skipped, {not_run} not run (time limit)")
    if not args.skip_bitexact:
        if bitexact is None:
            log("emulator bit-exactness: NOT RUN (time limit)")
        else:
            log(f"emulator bit-exactness: {bitexact[0]} of {bitexact[1]} cases identical")
    if not args.skip_benchmark:
        if bench_rc is None:
            log("benchmark: NOT RUN (time limit)")
        else:
            log(f"benchmark: exit {bench_rc}" + ("" if bench_rc == 0 else " (124: out of time)"))
        for line in table.rstrip().splitlines():
            log(line)
    log(f"total {time.monotonic() - start:.0f} s")
    ok = (
        tests is not None
        and tests[1] == tests[3] == 0
        and (args.skip_bitexact or (bitexact is not None and bitexact[0] == bitexact[1]))
        and (args.skip_benchmark or bench_rc == 0)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
