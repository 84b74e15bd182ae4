#!/usr/bin/env python3
"""The GPU check without pytest: runs the checks of tests/gpu_checks.py (the same ones
tests/test_kernels_gpu.py runs under pytest), the device against the CPU emulator bit
for bit over a case matrix, then benchmarks/gpu_step.py, and ends with one summary.

Needs NumPy and CuPy (torch for the torch rows of the benchmark, g++ for the
emulator); neither pytest nor hypothesis. Every result is written as soon as it is
known, to stdout (flushed) and, when $OUT is set, to $OUT/gpu_check.txt, so a
timeout loses nothing already measured. Time limits keep the whole check under 8
minutes: checks 200 s, bit-exactness 100 s, benchmark 150 s (none is started past
its deadline).

Exit status: 0 when every check passed, the device matched the emulator and the
benchmark ran; 1 otherwise (also when CuPy or a device is missing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
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


def run_checks(cp, log: Log, deadline: float, only: str | None = None) -> tuple[int, int, int]:
    import gpu_checks

    passed = failed = skipped = 0
    for name, check, kwargs in gpu_checks.CHECKS:
        if only and only not in name:
            continue
        if time.monotonic() > deadline:
            log(f"check {name}: NOT RUN (time limit)")
            failed += 1
            continue
        start = time.monotonic()
        try:
            check(cp, **kwargs)
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
    return passed, failed, skipped


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
            e, n = gpu_checks.bitexact(device, emulator, [case], log)
        except Exception:
            log(f"bitexact {case['name']}: ERROR")
            for line in traceback.format_exc().rstrip().splitlines()[-8:]:
                log(f"    {line}")
            e, n = 0, 1
        equal += e
        done += n
    return equal, len(cases)


def run_benchmark(log: Log, out: Path | None, timeout: float, quick: bool) -> tuple[int, str]:
    folder = out if out is not None else Path(os.environ.get("TMPDIR", "/tmp"))
    table = folder / "gpu_step.txt"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--report", str(table)]
    command += ["--json", str(folder / "gpu_step.json")] + (["--quick"] if quick else [])
    log(f"benchmark: {' '.join(command)}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        # What it printed before the limit (bytes even in text mode on some Pythons).
        partial = e.stdout or ""
        rc, output = 124, partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    for line in output.rstrip().splitlines()[-40:]:
        log(f"    {line}")
    return rc, table.read_text() if table.exists() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="run the checks whose name contains this text")
    parser.add_argument("--skip-bitexact", action="store_true")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small benchmark sizes (a smoke test)")
    args = parser.parse_args(argv)

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log = Log(out / "gpu_check.txt" if out is not None else None)
    start = time.monotonic()
    log(f"== gpu_check: python {sys.version.split()[0]} ({sys.executable}) ==")
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

    passed, failed, skipped = run_checks(cp, log, start + 200, args.only)
    equal = cases = 0
    if not args.skip_bitexact:
        equal, cases = run_bitexact(cp, log, start + 300)
    bench_rc, table = 0, ""
    if not args.skip_benchmark:
        bench_rc, table = run_benchmark(log, out, max(30.0, start + 450 - time.monotonic()), args.quick)

    log("== summary ==")
    log(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    if not args.skip_bitexact:
        log(f"emulator bit-exactness: {equal} of {cases} cases identical")
    if not args.skip_benchmark:
        log(f"benchmark: exit {bench_rc}" + ("" if bench_rc == 0 else " (124: timed out)"))
        for line in table.rstrip().splitlines():
            log(line)
    log(f"total {time.monotonic() - start:.0f} s")
    ok = failed == 0 and equal == cases and bench_rc == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
