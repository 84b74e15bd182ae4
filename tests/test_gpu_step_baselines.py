"""benchmarks/gpu_step.py's torch baselines compute the LARS step they are timed as.

The benchmark runs only on a GPU; its torch LARS implementations (eager per
tensor, foreach, torch.compile) are device-agnostic, so they are checked here on
CPU torch tensors against the NumPy reference, and the report renders every row.
"""

from __future__ import annotations

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
