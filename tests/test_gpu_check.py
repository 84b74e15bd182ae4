"""The GPU check runs on a bare CuPy image: without hypothesis (pytest -m gpu) and
without pytest (scripts/gpu_check.py), and its device-vs-emulator comparison reports
every differing bit. Here, without CuPy, the GPU parts skip or say so cleanly."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import gpu_checks
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


# Blocks an import as if the package were not installed (import raises ImportError).
BLOCK = "import sys; sys.modules.update({{name: None for name in {names!r}}}); "


def test_gpu_tests_collect_without_hypothesis():
    code = BLOCK.format(names=["hypothesis"]) + (
        "import pytest; sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', "
        "'tests/test_kernels_gpu.py']))"
    )
    # No plugin autoloading: a bare image has no hypothesis plugin to load either.
    done = _python(code, {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    output = done.stdout + done.stderr
    # The module skips as a whole for lack of CuPy: pytest then reports no test run (5),
    # not an error during collection (2) or an internal error (3).
    assert done.returncode in (0, 5), output
    # CuPy missing, or installed on a machine without a device
    assert "1 skipped" in output, output
    assert "CuPy not available" in output or "no CUDA device available to CuPy" in output, output
    assert "ERROR" not in output and " error" not in output, output  # no collection error
    assert "ImportError" not in output and "hypothesis" not in output.lower(), output


def test_plain_gpu_check_reports_a_missing_cupy_without_pytest(tmp_path):
    code = BLOCK.format(names=["hypothesis", "pytest", "cupy"]) + (
        "import runpy; sys.argv = ['gpu_check.py']; "
        "runpy.run_path('scripts/gpu_check.py', run_name='__main__')"
    )
    done = _python(code, {"OUT": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    assert "CuPy not available" in output and "== summary ==" in output, output
    assert (tmp_path / "gpu_check.txt").read_text() == done.stdout  # the same lines, as they came


def test_every_bitexact_case_runs_through_the_emulator_and_repeats_bit_for_bit():
    """The device-vs-emulator matrix, with the emulator on both sides: every case must
    run, and two runs of the unmodified kernels must agree bit for bit."""
    cases = gpu_checks.bitexact_cases()
    names = {c["name"] for c in cases}
    assert len(names) == len(cases)
    assert {"float32/none/full", "float16/32/full", "bfloat16/8/full"} <= names
    lines: list[str] = []
    run = gpu_checks.emulator_runner()
    equal, total = gpu_checks.bitexact(run, run, cases, lines.append)
    assert (equal, total) == (len(cases), len(cases)), "\n".join(lines)


def test_bitexact_reports_each_differing_element():
    case = next(c for c in gpu_checks.bitexact_cases() if c["name"] == "bfloat16/8/full")
    run = gpu_checks.emulator_runner()

    last_p = max(i for i, (label, _, _) in enumerate(run(case)) if label.endswith(" p"))

    def one_bit_off(c):
        out = run(c)
        label, data, dtype = out[last_p]
        flipped = bytearray(data)
        flipped[dtype.itemsize] ^= 1  # the lowest bit of element 1 (little-endian)
        out[last_p] = (label, bytes(flipped), dtype)
        return out

    lines: list[str] = []
    equal, total = gpu_checks.bitexact(one_bit_off, run, [case], lines.append)
    assert (equal, total) == (0, 1)
    label = run(case)[last_p][0]
    assert any(f"{label}: 1 of" in line and "[1]" in line for line in lines), lines


@pytest.mark.parametrize("mode", ["nonfinite-skip", "nonfinite-propagate"])
def test_the_nonfinite_cases_hold_nonfinite_gradients(mode):
    case = next(c for c in gpu_checks.bitexact_cases() if c["name"].endswith(mode))
    out = gpu_checks.emulator_runner()(case)
    steps = {label.split(" tensor")[0] for label, _, _ in out}
    assert steps == {"step 0", "step 1", "step 2"}
    # skipped steps leave skip_count at 1 (NaN) and 2 (Inf) for the poisoned tensors
    if mode == "nonfinite-skip":
        skips = [
            np.frombuffer(d, t)[0]
            for label, d, t in out
            if label.startswith("step 2") and "skip_count" in label
        ]
        assert sorted(skips)[-2:] == [1, 1], skips


# ---- the time budget (scripts/gpu_check, scripts/gpu_check.py) ----------------------------------
def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_script", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("budget_s", [330.0, 200.0, 120.0, 60.0, 12.0])
def test_the_stages_end_within_the_budget_or_are_skipped_with_a_line(budget_s):
    """Each stage runs its whole allowance (the worst case): the last one still ends
    SUMMARY_S before the budget, and a stage whose minimum no longer fits is skipped."""
    gc = _gpu_check_module()
    clock, lines = FakeClock(), []
    budget = gc.Budget(budget_s, clock)
    ran = []
    for stage in gc.STAGES.values():
        limit = gc.stage_timeout(stage, budget, lines.append)
        if limit is None:
            continue
        assert limit >= stage.minimum_s and (stage.limit_s is None or limit <= stage.limit_s)
        ran.append(stage.name)
        clock.now += limit
    assert budget.left() >= gc.SUMMARY_S - 1e-9
    skipped = [s for s in gc.STAGES if s not in ran]
    assert [line.split(":")[0] for line in lines] == skipped
    assert all("NOT RUN (time limit" in line for line in lines), lines
    if budget_s == gc.DEFAULT_BUDGET_S:
        assert ran == ["checks", "bitexact", "benchmark"]
    if budget_s == 12.0:
        assert ran == []


def test_a_stage_time_limit_interrupts_python_code_that_catches_exceptions():
    gc = _gpu_check_module()
    start = time.monotonic()
    with pytest.raises(gc.StageTimeout):
        with gc.time_limit(0.3):
            while True:
                try:
                    time.sleep(0.01)
                except Exception:  # a check's own handler must not end the timeout
                    pass
    assert 0.25 < time.monotonic() - start < 5
    time.sleep(0.4)  # the timer is off again: nothing fires here


def test_streamed_command_output_is_logged_as_it_comes_and_killed_at_its_timeout():
    gc = _gpu_check_module()
    code = "import time\nfor i in range(100):\n    print('row', i, flush=True)\n    time.sleep(0.2)\n"
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    command = [sys.executable, "-c", code]
    rc = gc.stream_command(command, lambda line: seen.append((time.monotonic(), line)), 2.0)
    took = time.monotonic() - start
    assert rc == 124 and took < 10
    rows = [(t, line) for t, line in seen if "row" in line]
    assert 3 <= len(rows) < 100 and rows[0][1].strip() == "row 0"
    assert rows[0][0] - start < took - 1.0  # logged long before the command ended
    assert "killed at its time limit" in seen[-1][1]


def test_the_benchmark_stage_passes_its_budget_and_compile_only_when_asked(tmp_path):
    gc = _gpu_check_module()
    command = gc.benchmark_command(tmp_path, 100.0, quick=False, compile_rows=False)
    assert "--compile" not in command and command[command.index("--budget-s") + 1] == "100"
    assert command[command.index("--out") + 1] == str(tmp_path)
    assert "--compile" in gc.benchmark_command(tmp_path, 100.0, quick=True, compile_rows=True)
    lines: list[str] = []
    # Without CuPy the benchmark says so and exits 2: the stage reports that, not a hang.
    rc, table = gc.run_benchmark(lines.append, tmp_path, 120.0, quick=True)
    assert rc == 2 and table == ""
    assert any("cannot run without CuPy" in line for line in lines), lines


FAKE_PYTHON = """#!/bin/sh
# Stands in for the interpreter: prints the command line of its parent (timeout) and its own.
tr '\\0' ' ' < /proc/$PPID/cmdline; echo
echo "$@"
"""


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    ("env", "timeout", "args"),
    [
        ({}, "350", "scripts/gpu_check.py --budget-s 330"),
        ({"GPU_CHECK_COMPILE": "1"}, "350", "scripts/gpu_check.py --budget-s 330 --compile"),
        ({"GPU_CHECK_BUDGET_S": "900", "GPU_CHECK_QUICK": "1"}, "920", "--budget-s 900 --quick"),
    ],
)
def test_the_shell_script_runs_within_its_budget_and_passes_the_options(tmp_path, env, timeout, args):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, "PYTHON": str(fake), **env},
    )
    assert done.returncode == 0, done.stderr
    parent, own = done.stdout.splitlines()
    assert parent.split()[:2] == ["timeout", timeout], parent
    assert own.endswith(args) and ("--compile" in own) == ("GPU_CHECK_COMPILE" in env), own
    if not env:
        assert int(timeout) < 360  # the default run ends within 6 minutes, whatever hangs


def test_the_shell_script_refuses_a_budget_that_is_not_a_number(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GPU_CHECK_BUDGET_S": "5m"},
    )
    assert done.returncode == 1 and "GPU_CHECK_BUDGET_S must be a whole number" in done.stderr
