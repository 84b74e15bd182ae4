"""python -m cupylars: the report, the self-test's verdicts and the exit status.

The command runs in subprocesses as a user would run it: with a compiler, without
one (no compiler on PATH), and with CUPYLARS_BACKEND set; each with a cache folder of
its own, so that what it reports about building is what happened. The self-test's
judgement is a pure function (diagnostics.compare_steps), checked here on wrong results.
"""

from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cupylars
from cupylars import diagnostics
from cupylars import functional as F

ROOT = Path(__file__).resolve().parents[1]


def _gpu_present() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no CuPy, no driver, no device: no GPU for cupylars
        return False


def run_report(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``python -m cupylars`` from the checkout (cwd), with ``env`` over this environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CUPYLARS_")}
    return subprocess.run(
        [sys.executable, "-m", "cupylars", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, **env},
        timeout=600,
    )


def section(out: str, title: str) -> dict[str, str]:
    """The rows of a report section: name -> the rest of its row, continuation lines appended."""
    body = ("\n" + out).split(f"\n{title}", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    last = ""
    for line in body.splitlines()[1:]:
        if re.match(r"  \S", line):  # a row: "  name  value", the two split at 2+ spaces
            last, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            rows[last] = value
        else:
            rows[last] += " " + line.strip()
    return rows


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cupylars-cache"))


def test_with_a_compiler_every_host_backend_passes(shared_cache):
    done = run_report({"CUPYLARS_CACHE_DIR": shared_cache})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    versions = section(out, "Versions")
    assert versions["cupylars"].startswith(f"{cupylars.__version__} ({ROOT / 'cupylars'})")
    assert versions["NumPy"] == np.__version__
    assert versions["Python"].startswith(".".join(map(str, sys.version_info[:3])))
    backends = section(out, "Backends")
    cpu = backends["cpu"]
    assert cpu.startswith("available") and "-march=native" in cpu
    assert f"cache folder: {shared_cache}/cpu" in cpu
    # A fresh cache: the library was compiled now, into the cache folder, and is trusted.
    assert "compiled now in" in cpu and "(in the cache folder; trusted" in cpu
    assert backends["emulated-cuda"].startswith("available") and "g++" in backends["emulated-cuda"]
    assert backends["reference"].startswith("available")
    defaults = section(out, "Default backends")
    assert defaults["NumPy arrays"].startswith("cpu: NumPy arrays: the native CPU backend")
    tests = section(out, "Self-test against the reference")
    assert tests["cpu"].startswith("PASS") and tests["emulated-cuda"].startswith("PASS")
    assert tests["reference"].startswith("not run: is the reference")
    if not _gpu_present():
        assert backends["cuda"].startswith("unavailable") and "cannot run here" in backends["cuda"]
        assert tests["cuda"].startswith("not run")
    assert out.rstrip().endswith("Result: OK")


def test_the_reference_when_asked_for_and_the_cache_when_built(shared_cache):
    done = run_report({"CUPYLARS_CACHE_DIR": shared_cache, "CUPYLARS_BACKEND": "reference"})
    assert done.returncode == 0, done.stdout + done.stderr
    defaults = section(done.stdout, "Default backends")
    assert defaults["NumPy arrays"].startswith("reference: asked for")
    assert "loaded from the cache" in section(done.stdout, "Backends")["cpu"]  # built by the test above
    assert section(done.stdout, "Self-test against the reference")["cpu"].startswith("PASS")
    assert done.stdout.rstrip().endswith("Result: OK")


def _no_compiler_env(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "bin"
    empty.mkdir()
    return {"PATH": str(empty), "CUPYLARS_CACHE_DIR": str(tmp_path / "cache")}


def test_without_a_compiler_the_report_says_why_and_the_reference_runs(tmp_path):
    done = run_report(_no_compiler_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    backends = section(out, "Backends")
    assert backends["cpu"].startswith("unavailable")
    assert "no C++ compiler found" in backends["cpu"] and "install a C++ compiler" in backends["cpu"]
    assert backends["emulated-cuda"].startswith("unavailable") and "install g++" in backends["emulated-cuda"]
    defaults = section(out, "Default backends")
    why = "reference: NumPy arrays: the native CPU backend is unavailable"
    assert defaults["NumPy arrays"].startswith(why)
    tests = section(out, "Self-test against the reference")
    assert tests["cpu"].startswith("not run") and tests["emulated-cuda"].startswith("not run")
    assert out.rstrip().endswith("Result: OK")
    assert "Warning" not in done.stderr  # the report says it; no warning repeats it
    assert not list((tmp_path / "cache").glob("cpu/*.so"))


def test_a_default_backend_that_cannot_run_fails_the_exit_status(tmp_path):
    done = run_report({**_no_compiler_env(tmp_path), "CUPYLARS_BACKEND": "cpu"}, "--no-self-test")
    assert done.returncode == 1, done.stdout + done.stderr
    defaults = section(done.stdout, "Default backends")
    assert defaults["NumPy arrays"].startswith("-: no backend: NativeUnavailableError: no C++ compiler found")
    assert "Self-test" not in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("Result: FAILED: NumPy arrays (none)")


def test_show_config_is_exported_without_importing_torch_or_cupy():
    code = """
        import sys, io
        import cupylars
        assert "cupylars.diagnostics" not in sys.modules
        buf = io.StringIO()
        cupylars.show_config(buf, self_test=False)
        print("torch" in sys.modules, buf.getvalue().splitlines()[0])
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    # show_config imports torch to report it, but `import cupylars` did not.
    assert done.stdout.split()[-1] == "Versions"


# ---- the self-test's judgement, on wrong results ------------------------------------------------------
@pytest.fixture(scope="module")
def a_step():
    before, grads = diagnostics._self_test_problem(seed=3)
    want, m_raw = diagnostics._reference_step(before, grads)
    return before, want, m_raw


def _check(a_step, got):
    before, want, m_raw = a_step
    momentum = diagnostics.SELF_TEST_HYPERPARAMETERS["momentum"]
    return diagnostics.compare_steps(before, want, got, m_raw, momentum)


def test_the_reference_agrees_with_itself(a_step):
    want = a_step[1]
    assert [s.is_8bit for s in want.states] == [True, False, True, False]  # both kinds of state
    assert all(s.step == 2 for s in want.states)
    assert _check(a_step, copy.deepcopy(want)) == []


def test_a_parameter_off_by_more_than_rounding_fails(a_step):
    got = copy.deepcopy(a_step[1])
    got.params[2].ravel()[100] *= np.float16(1.01)  # float16: a few ulps
    problems = _check(a_step, got)
    assert len(problems) == 1 and problems[0].startswith("tensor 2 (float16, 8-bit state) param: 1 of 5200")
    # One ulp of the storage format is within the tolerance.
    got = copy.deepcopy(a_step[1])
    value = got.params[0].ravel()[7]
    got.params[0].ravel()[7] = np.nextafter(value, np.float32(np.inf))
    assert _check(a_step, got) == []


def test_wrong_momentum_fails(a_step):
    got = copy.deepcopy(a_step[1])
    got.states[1].momentum *= np.float32(1.001)
    assert _check(a_step, got) == ["tensor 1 (float32, 32-bit state) state: momentum differs"]
    got = copy.deepcopy(a_step[1])
    codes = got.states[0].codes
    codes[codes < 255] += 1  # every code one step up: most are nowhere near a boundary
    problems = _check(a_step, got)
    assert len(problems) == 1 and problems[0].startswith("tensor 0 (float32, 8-bit state) state: ")
    assert problems[0].endswith(" 8-bit codes differ away from a rounding boundary")
    got = copy.deepcopy(a_step[1])
    got.states[0].codes.ravel()[5] += np.uint8(2) if got.states[0].codes.ravel()[5] < 254 else np.uint8(0)
    got.states[3].step_count[...] += 1
    problems = _check(a_step, got)
    assert problems[0] == "tensor 0 (float32, 8-bit state) state: 8-bit codes differ by up to 2 codes"
    assert problems[1] == "tensor 3 (float16, 32-bit state) state: step/skipped 3/0, expected 2/0"


def test_self_test_verdicts_and_the_exit_status():
    def reference_step(params, grads, states):
        hp = diagnostics.SELF_TEST_HYPERPARAMETERS
        F.lars_update_many(params, grads, states, backend="reference", **hp)
        return diagnostics.StepRecord(params, states)

    def wrong_lr(params, grads, states):
        hp = {**diagnostics.SELF_TEST_HYPERPARAMETERS, "lr": 0.11}
        F.lars_update_many(params, grads, states, backend="reference", **hp)
        return diagnostics.StepRecord(params, states)

    def broken(params, grads, states):
        raise RuntimeError("the kernel module did not load\nmore detail")

    passed = diagnostics.self_test(reference_step)
    assert passed.ok is True and passed.label == "PASS"
    failed = diagnostics.self_test(wrong_lr)
    assert failed.ok is False and failed.label == "FAIL"
    assert len(failed.problems) == 4 and all(" param: " in p for p in failed.problems)
    crashed = diagnostics.self_test(broken)
    assert crashed.ok is False and crashed.detail == "RuntimeError: the kernel module did not load"
    Outcome = diagnostics.Outcome
    assert diagnostics.exit_status([passed, Outcome(None, "no GPU")]) == 0
    assert diagnostics.exit_status([passed, failed]) == 1
    assert diagnostics.exit_status([crashed]) == 1
    assert diagnostics.exit_status([]) == 0


def test_report_without_the_self_test():
    buf = io.StringIO()
    status = diagnostics.report(buf, run_self_test=False)
    assert status == 0 and buf.getvalue().startswith("Versions\n")
    assert "Self-test" not in buf.getvalue()
