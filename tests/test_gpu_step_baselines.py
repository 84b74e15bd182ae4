"""benchmarks/gpu_step.py's torch baselines compute the LARS step they are timed as.

The benchmark runs only on a GPU; its torch LARS implementations (eager per
tensor, foreach, torch.compile) are device-agnostic, so they are checked here on
CPU torch tensors against the NumPy reference, and the report renders every row.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cupylars import functional as F

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_step  # noqa: E402

SHAPES = [(64, 3, 7, 7), (64,), (256, 64, 1, 1), (1000, 20)]


def _problem(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in SHAPES]
    return params, grads


def _reference(params: list[np.ndarray], grads: list[np.ndarray], steps: int) -> list[np.ndarray]:
    params = [p.copy() for p in params]
    states = [F.init_state(p) for p in params]
    for _ in range(steps):
        F.lars_update_many(params, grads, states, backend="reference", **gpu_step.HP)
    return params


@pytest.mark.parametrize("kind", ["eager", "foreach", "compiled"])
def test_torch_lars_rows_compute_the_reference_step(kind):
    p_host, g_host = _problem(3)
    want = _reference(p_host, g_host, 3)
    tparams = [torch.tensor(p) for p in p_host]
    tgrads = [torch.tensor(g) for g in g_host]
    # aot_eager traces the same graph as inductor without compiling C++ for the CPU
    got = gpu_step.run_torch_lars(torch, kind, tparams, tgrads, 3, backend="aot_eager")
    for w, g, p0 in zip(want, got, p_host):
        moved = np.abs(w - p0).max()
        assert moved > 0
        np.testing.assert_allclose(g.numpy(), w, rtol=0, atol=1e-3 * moved)


def test_foreach_lars_with_bfloat16_parameters_matches_eager():
    p_host, g_host = _problem(4)
    tparams = [torch.tensor(p).to(torch.bfloat16) for p in p_host]
    tgrads = [torch.tensor(g).to(torch.bfloat16) for g in g_host]
    eager = gpu_step.run_torch_lars(torch, "eager", tparams, tgrads, 3)
    foreach = gpu_step.run_torch_lars(torch, "foreach", tparams, tgrads, 3)
    for a, b, p0 in zip(eager, foreach, tparams):
        assert a.dtype == b.dtype == torch.bfloat16
        assert not torch.equal(a, p0)  # the step moved the parameters
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=2 ** -7 * a.float().abs().max().item())


def test_same_bytes_rows_scale_by_the_documented_byte_counts():
    assert gpu_step.SGD_BYTES == {"float32": 20, "bfloat16": 10}
    # docs/kernels.md, bytes per parameter of a whole step (stats + update)
    assert gpu_step.CUPYLARS_BYTES == {
        ("float32", 32): 12 + 20,
        ("float32", 8): 9 + 14,
        ("bfloat16", 32): 8 + 14,
        ("bfloat16", 8): 5 + 8,
    }


def test_report_renders_every_row():
    rows = {}
    names = gpu_step.RESNET_ROWS
    for fmt in ("float32", "bfloat16"):
        for k, name in enumerate(names):
            rows[f"{fmt} {name}"] = {"ms": 1.0 + k, "wall_ms": 2.0, "host_us_per_tensor": 0.5}
    results = {
        "device": "test",
        "resnet50": {"tensors": 161, "params": 25_557_032, "rows": rows},
        "eager_check": {"max_diff_relative_to_update": 1e-6, "agrees": True},
        "foreach_check": {"max_diff_relative_to_update": 1e-6, "agrees": True},
        "compiled_check": {"error": "no GPU"},
    }
    text = gpu_step.report(results)
    for name in names:
        assert f"bfloat16 {name}" in text
    # cupylars 32-bit (7 ms) against the 32-bit same-bytes SGD row (2 ms) and the best torch LARS (4 ms)
    line = next(x for x in text.splitlines() if "float32 cupylars 32-bit" in x and "bfloat16" not in x)
    assert "3.50x" in line and "0.6x" in line
    assert "foreach LARS vs cupylars, 3 steps: agree" in text
    assert "compiled LARS vs cupylars check: error: no GPU" in text


# ---- every row written as soon as it is measured, within the budget ------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def _results() -> dict:
    return {"device": "test", "resnet50": {"tensors": 161, "params": 25_557_032, "rows": {}}}


def _measured(clock: FakeClock, seconds: float, ms: float):
    def measure() -> dict:
        clock.now += seconds
        return {"ms": ms, "wall_ms": 2 * ms, "host_us_per_tensor": 0.5}

    return measure


def test_each_row_is_written_as_soon_as_it_is_measured(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    results = _results()
    recorder = gpu_step.Recorder(results, tmp_path, gpu_step.Budget(None, clock), out)
    rows = results["resnet50"]["rows"]
    names = ["float32 cupylars 32-bit", "float32 torch SGD fused", "float32 optim.LARS8bit"]
    for k, name in enumerate(names):
        recorder.row(rows, "resnet50", name, _measured(clock, 2.0, 1.0 + k))
        # after each row, before the next is measured: stdout, the JSON lines and the tables
        printed = out.getvalue().splitlines()
        assert len(printed) == k + 1 and name in printed[-1] and f"gpu ms {1.0 + k:.3f}" in printed[-1]
        records = [json.loads(line) for line in (tmp_path / gpu_step.ROWS_JSONL).read_text().splitlines()]
        assert [r["row"] for r in records] == names[: k + 1]
        assert records[-1]["ms"] == 1.0 + k and records[-1]["seconds"] == 2.0
        table = (tmp_path / gpu_step.ROWS_MD).read_text().splitlines()
        assert len(table) == 2 + k + 1 and f"| resnet50 | {name} | {1.0 + k:.3f} |" in table[-1]
        assert name in (tmp_path / gpu_step.REPORT_TXT).read_text()
        numbers = json.loads((tmp_path / gpu_step.RESULTS_JSON).read_text())
        assert numbers["resnet50"]["rows"][name]["ms"] == 1.0 + k


def test_a_new_run_starts_a_new_rows_file(tmp_path):
    (tmp_path / gpu_step.ROWS_JSONL).write_text('{"row": "of an earlier run"}\n')
    gpu_step.Recorder(_results(), tmp_path, gpu_step.Budget(None), io.StringIO())
    assert (tmp_path / gpu_step.ROWS_JSONL).read_text() == ""


def test_rows_that_would_not_fit_the_budget_are_skipped_with_a_line(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    results = _results()
    recorder = gpu_step.Recorder(results, tmp_path, gpu_step.Budget(70.0, clock), out)
    rows = results["resnet50"]["rows"]
    measured = []

    def measure(name: str):
        def run() -> dict:
            measured.append(name)
            return _measured(clock, 30.0, 1.0)()

        return run

    names = [f"float32 {n}" for n in gpu_step.RESNET_ROWS[:4]]
    for name in names:
        recorder.row(rows, "resnet50", name, measure(name))
    # 70 s: two rows of 30 s; the third would start with 10 s left, under the 30 a row took
    assert measured == names[:2]
    assert [("skipped" in rows[n]) for n in names] == [False, False, True, True]
    printed = out.getvalue().splitlines()
    assert "skipped (time limit: 10 s left, a resnet50 row took 30 s)" in printed[2], printed
    records = [json.loads(line) for line in (tmp_path / gpu_step.ROWS_JSONL).read_text().splitlines()]
    assert [r["row"] for r in records] == names  # skipped rows are recorded too
    text = gpu_step.report(results)  # renders skipped rows
    assert f"{names[2]:38s} skipped (time limit" in text


def test_a_failing_row_is_recorded_and_the_next_rows_still_run(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    results = _results()
    recorder = gpu_step.Recorder(results, tmp_path, gpu_step.Budget(100.0, clock), out)
    rows = results["resnet50"]["rows"]

    def broken() -> dict:
        raise RuntimeError("out of memory")

    recorder.row(rows, "resnet50", "float32 torch eager LARS", broken)
    recorder.row(rows, "resnet50", "float32 torch foreach LARS", _measured(clock, 1.0, 3.0))
    assert rows["float32 torch eager LARS"]["error"] == "RuntimeError: out of memory"
    assert rows["float32 torch foreach LARS"]["ms"] == 3.0
    assert "error: RuntimeError: out of memory" in (tmp_path / gpu_step.ROWS_MD).read_text()


def test_the_torch_compile_rows_run_only_when_asked(monkeypatch):
    default = gpu_step.resnet_plan(with_torch=True, compiled=False, runs=50)
    asked = gpu_step.resnet_plan(with_torch=True, compiled=True, runs=50)
    assert not any("compile" in p.key or p.kind == "compiled" for p in default)
    assert {p.key for p in asked} - {p.key for p in default} == {
        "float32 torch.compile LARS",
        "bfloat16 torch.compile LARS",
    }
    # every planned row is one the report renders, each once
    formats, variants = ("float32", "bfloat16"), ("", gpu_step.FRESH)
    expected = {f"{f} {n}{v}" for f in formats for n in gpu_step.RESNET_ROWS for v in variants}
    assert len({p.key for p in asked}) == len(asked) and {p.key for p in asked} <= expected
    assert all(p.kind == "cupylars" for p in gpu_step.resnet_plan(with_torch=False, compiled=True, runs=50))
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_step.parse_args([])
    assert not args.compile and args.budget_s is None
    assert args.out == Path(gpu_step.ROOT) / "benchmarks" / "results"
    assert gpu_step.parse_args(["--compile", "--quick"]).compile
    monkeypatch.setenv("OUT", "/tmp/somewhere")
    assert gpu_step.parse_args([]).out == Path("/tmp/somewhere")


def test_the_benchmark_without_a_device_says_so_and_writes_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, str(Path(gpu_step.__file__)), "--out", str(tmp_path / "rows")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "cannot run without CuPy and a CUDA device" in done.stderr
    assert not (tmp_path / "rows").exists()
