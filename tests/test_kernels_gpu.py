"""The CUDA kernels on a GPU (CuPy arrays) against the NumPy reference.

Skipped without CuPy or a CUDA device; ``scripts/gpu_check`` runs them. Each step
starts the reference from a host copy of the device state, so every step is
compared on its own, with the tolerances of tests/test_kernels_emulated.py.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from lars_cases import dtype_arg, random_grad, random_problem
from test_kernels_emulated import CONFIGS, FULL, _assert_param_close, _assert_state_close

from cupylars import cuda, plan
from cupylars import functional as F
from cupylars.state import LarsState

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="CuPy is not installed")
try:
    _AVAILABLE = bool(cp.cuda.is_available())
except Exception:  # a broken driver install raises instead of answering False
    _AVAILABLE = False
if not _AVAILABLE:
    pytest.skip("no CUDA device available to CuPy", allow_module_level=True)

SHAPES = [(1,), (255,), (257,), (4097,), (33, 65), (70000,)]
FORMATS = ["float32", "float16", "bfloat16"]


def _host_state(state: LarsState) -> LarsState:
    return _on(state, cp.asnumpy)


def _device(params, states):
    d_params = [cp.asarray(p) for p in params]
    return d_params, [_on(s, cp.asarray) for s in states]


def _on(state: LarsState, move) -> LarsState:
    """A copy of ``state`` with its arrays passed through ``move`` (shape etc. kept)."""
    meta = ("shape", "param_format", "is_8bit")
    return LarsState.from_dict({k: v if k in meta else move(v) for k, v in state.to_dict().items()})


def _fmt_of(p, dtype):
    return "bfloat16" if dtype == "bfloat16" else str(p.dtype)


def gpu_step_and_compare(d_params, grads, d_states, hp, dtype, what=""):
    """One GPU step (host grads copied over) against the reference from the same state."""
    h_params = [cp.asnumpy(p) for p in d_params]
    h_states = [_host_state(s) for s in d_states]
    prev = [_host_state(s) for s in d_states]
    ref_params = [p.copy() for p in h_params]
    F.lars_update_many(ref_params, grads, h_states, dtype=dtype, **hp)
    F.lars_update_many(d_params, [cp.asarray(g) for g in grads], d_states, dtype=dtype, **hp)
    for i, p in enumerate(d_params):
        fmt = _fmt_of(h_params[i], dtype)
        _assert_param_close(cp.asnumpy(p), ref_params[i], h_params[i], fmt, f"{what} tensor {i} {fmt}")
        _assert_state_close(_host_state(d_states[i]), h_states[i], prev[i], hp, f"{what} tensor {i} {fmt}")


def _problem(seed, shapes, fmt, bits, min_8bit_size=0):
    rng = np.random.default_rng(seed)
    params = [random_problem(rng, s, fmt) for s in shapes]
    states = [
        F.init_state(p, optim_bits=bits, min_8bit_size=min_8bit_size, dtype=dtype_arg(fmt)) for p in params
    ]
    return rng, *_device(params, states)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_the_reference_on_every_shape(fmt, bits):
    rng, params, states = _problem(zlib.crc32(f"{fmt}{bits}".encode()), SHAPES, fmt, bits)
    for t in range(5):
        grads = [random_grad(rng, p.shape, fmt) for p in params]
        gpu_step_and_compare(params, grads, states, FULL, dtype_arg(fmt), f"step {t}")
    assert all(s.step == 5 for s in states)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_switch(name, monkeypatch):
    monkeypatch.setattr(plan, "CHUNK_SIZE", 1024)
    rng, params, states = _problem(len(name), [(1,), (300,), (5000,), (33, 65)], "float32", 8, 1000)
    for t in range(4):
        grads = [random_grad(rng, p.shape, "float32") for p in params]
        gpu_step_and_compare(params, grads, states, CONFIGS[name], None, f"{name} step {t}")


def test_skip_and_raise_on_the_device():
    rng, params, states = _problem(3, [(600,), (3000,)], "float32", 32)
    grads = [random_grad(rng, p.shape, "float32") for p in params]
    gpu_step_and_compare(params, grads, states, FULL, None, "warm-up")
    grads[1] = grads[1].copy()
    grads[1][7] = np.nan
    before = cp.asnumpy(params[1])
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        F.lars_update_many(params, [cp.asarray(g) for g in grads], states, **{**FULL, "nonfinite": "raise"})
    assert states[0].step == 1 and states[1].step == 1
    gpu_step_and_compare(params, grads, states, FULL, None, "skip")
    np.testing.assert_array_equal(cp.asnumpy(params[1]), before)
    assert (states[0].step, states[1].step, states[1].skipped) == (2, 1, 1)


def _run_steps(seed, fmt, bits, steps=4):
    rng, params, states = _problem(seed, [(1,), (1000,), (70000,), (33, 65)], fmt, bits, 500)
    grads = [[cp.asarray(random_grad(rng, p.shape, fmt)) for p in params] for _ in range(steps)]
    for g in grads:
        F.lars_update_many(params, g, states, dtype=dtype_arg(fmt), **FULL)
    return params, states


@pytest.mark.parametrize("bits", [32, 8])
def test_two_runs_are_bitwise_identical(bits):
    (p1, s1), (p2, s2) = _run_steps(11, "bfloat16", bits), _run_steps(11, "bfloat16", bits)
    for a, b in zip(p1, p2):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes()
    for a, b in zip(s1, s2):
        for k, arr in a.arrays().items():
            assert cp.asnumpy(arr).tobytes() == cp.asnumpy(getattr(b, k)).tobytes(), k


def test_a_steady_state_step_is_sync_free_and_graph_capturable():
    """A step after the first (tables cached) captures into a CUDA graph: any host
    synchronisation or upload inside it would break the capture."""
    stream = cp.cuda.Stream(non_blocking=True)
    if not hasattr(stream, "begin_capture"):
        pytest.skip("this CuPy has no stream capture")
    rng, params, states = _problem(5, [(3,), (5000,), (70000,)], "float32", 8, 1000)
    grads = [cp.asarray(random_grad(rng, p.shape, "float32")) for p in params]
    twin_p = [p.copy() for p in params]
    twin_s = [_on(s, cp.copy) for s in states]
    with stream:
        F.lars_update_many(params, grads, states, **FULL)  # first step: builds and uploads the tables
        stream.synchronize()
        stream.begin_capture()
        F.lars_update_many(params, grads, states, **FULL)
        graph = stream.end_capture()
        graph.launch()
        graph.launch()
    stream.synchronize()
    assert all(s.step == 3 for s in states)
    for _ in range(3):  # the same three steps without a graph, on the default stream
        F.lars_update_many(twin_p, grads, twin_s, **FULL)
    for a, b in zip(params, twin_p):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes()


def test_launches_do_not_grow_with_the_tensor_count():
    sizes = np.random.default_rng(0).integers(1, 3000, 200)
    rng, params, states = _problem(6, [(int(n),) for n in sizes], "float16", 32)
    grads = [cp.asarray(random_grad(rng, p.shape, "float16")) for p in params]
    with cuda.record_launches() as launches:
        F.lars_update_many(params, grads, states, **FULL)
    assert len(launches) == 3


def test_arrays_on_another_device_are_rejected():
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cp.cuda.Device(1):
        p = cp.ones(10, cp.float32)
        g = cp.ones(10, cp.float32)
        state = F.init_state(p)
    with cp.cuda.Device(0), pytest.raises(ValueError, match="device"):
        F.lars_update(p, g, state, lr=0.1)


def test_backend_reason():
    backend = F.backend_for([cp.zeros(3, cp.float32)])
    assert backend.name == "cuda" and "CuPy" in backend.reason
