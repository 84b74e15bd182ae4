"""The GPU check runs on a bare CuPy image: without hypothesis (pytest -m gpu) and
without pytest (scripts/gpu_check.py), and its device-vs-emulator comparison reports
every differing bit. Here, without CuPy, the GPU parts skip or say so cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
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
    assert "1 skipped" in output and "CuPy not available" in output, output
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
