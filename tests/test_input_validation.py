"""Bad input refused with a clear error before anything is written: counters out of range,
aliased states and arrays, misaligned memory on the CUDA path, states that lost their
momentum. Every backend that updates NumPy arrays is checked (the emulated CUDA backend
is how CI runs the CUDA launcher)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cupylars import cuda, reference
from cupylars import functional as F
from cupylars import state as state_module
from cupylars._emulator import EmulatorError
from cupylars.state import LarsState
from cupylars.testing import emulated_cuda, native_cpu
from cupylars.testing import reference as reference_backend

ROOT = Path(__file__).resolve().parents[1]
MAX_COUNT = 2**53  # cupylars.state.MAX_COUNT, the documented bound of the counters
HP = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "percentile_clipping": 90}

HAS_GXX = shutil.which("g++") is not None
BACKENDS = {
    "reference": reference_backend,
    "cpu": native_cpu,
    "emulated-cuda": emulated_cuda,
}
needs_gxx = pytest.mark.skipif(not HAS_GXX, reason="the native and emulated backends need g++")


def backend_params():
    return [pytest.param(name, marks=() if name == "reference" else needs_gxx) for name in BACKENDS]


def _problem(n=600, seed=0):
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(n) * 0.1).astype(np.float32)
    g = (rng.standard_normal(n) * 0.01).astype(np.float32)
    return p, g


def _warm(p, g, *, bits=32, steps=2):
    state = F.init_state(p, optim_bits=bits, min_8bit_size=0)
    with reference_backend():
        for _ in range(steps):
            F.lars_update(p, g, state, **HP)
    return state


def _snapshot(params, states):
    return [p.copy() for p in params], copy.deepcopy(states)


def _assert_untouched(params, states, snap):
    for p, b in zip(params, snap[0]):
        np.testing.assert_array_equal(p, b)
    for s, b in zip(states, snap[1]):
        assert s.arrays().keys() == b.arrays().keys()
        for name, array in b.arrays().items():
            np.testing.assert_array_equal(getattr(s, name), array, err_msg=name)


# ---- counters --------------------------------------------------------------------------------------
def _run_isolated(code: str) -> subprocess.CompletedProcess:
    # A corrupt counter used to write outside the history (glibc aborts the process).
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_a_crafted_checkpoint_step_is_refused_at_load():
    pytest.importorskip("torch")
    result = _run_isolated(
        """
        import torch
        from cupylars.optim import LARS32bit
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = LARS32bit(model.parameters(), lr=0.1, momentum=0.9, percentile_clipping=90)
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        sd = opt.state_dict()
        sd["state"][0]["step"] = torch.tensor(2**63 - 1024)
        fresh = LARS32bit(model.parameters(), lr=0.1, momentum=0.9, percentile_clipping=90)
        try:
            fresh.load_state_dict(sd)
        except ValueError as exc:
            print("refused:", exc)
        fresh.step()
        print("stepped", [p.isfinite().all().item() for p in model.parameters()])
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "state of parameter 0" in result.stdout, result.stdout
    assert "'step'" in result.stdout and "2**53" in result.stdout, result.stdout


@pytest.mark.parametrize("backend", backend_params())
def test_a_wrapped_counter_never_indexes_outside_the_history(backend):
    # A counter changed in place after the batch was prepared is not seen by the host checks;
    # the history slot is an unsigned modulo in every backend, so even a negative count
    # writes inside the history, where the reference writes it.
    result = _run_isolated(
        f"""
        import numpy as np
        from cupylars import functional as F, reference
        from cupylars.testing import emulated_cuda, native_cpu, reference as reference_backend
        backends = {{"reference": reference_backend, "cpu": native_cpu, "emulated-cuda": emulated_cuda}}
        use = backends[{backend!r}]
        p = np.linspace(-1, 1, 300, dtype=np.float32)
        g = np.linspace(1, 2, 300, dtype=np.float32)
        state = F.init_state(p)
        block = np.full(164, 7.0, np.float32)  # 64 guard entries right before the history
        state.history = block[64:]
        state.history[...] = np.arange(100, dtype=np.float32) + 1.0
        hp = dict(lr=0.1, percentile_clipping=90)
        with use():
            batch = F.prepare([p], [state])
            state.step_count[...] = -9  # in place: the batch does not see it
            batch.update([p], [g], [state], F.LarsConfig(**hp))
        slot = reference.history_slot(-8)
        expect = np.arange(100, dtype=np.float32) + 1.0
        expect[slot] = np.float32(float(np.dot(g.astype(np.float64), g.astype(np.float64))))
        assert slot == 8, slot
        assert np.array_equal(block[:64], np.full(64, 7.0, np.float32)), "wrote before the history"
        np.testing.assert_allclose(state.history, expect, rtol=1e-6)
        print("ok")
        """
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "ok" in result.stdout


def test_history_slot_is_an_unsigned_modulo():
    assert [reference.history_slot(t) for t in (0, 1, 99, 100, 2**53 + 1)] == [0, 1, 99, 0, 93]
    assert reference.history_slot(-8) == (2**64 - 8) % 100 == 8
    assert reference.history_slot(-(2**63)) == (2**63) % 100


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["step_count", "skip_count"])
@pytest.mark.parametrize("count", [MAX_COUNT + 1, 2**63 - 1, -1])
def test_counters_outside_the_bound_are_refused(backend, name, count):
    # A negative step count made the reference fail with "float * NoneType" (no momentum
    # to continue at t <= 0) and the native backend index the history at a negative slot.
    p, g = _problem()
    state = _warm(p, g)
    setattr(state, name, np.asarray(count, dtype=np.int64))  # assigned: checked again
    snap = _snapshot([p], [state])
    with BACKENDS[backend](), pytest.raises(ValueError, match=rf"states\[0\]\.{name} is {count}, outside"):
        F.lars_update(p, g, state, **HP)
    _assert_untouched([p], [state], snap)
    with pytest.raises(ValueError, match=name):
        LarsState.from_dict(state.to_dict())


@pytest.mark.parametrize("backend", backend_params())
def test_a_step_past_the_bound_raises_before_writing(backend):
    p, g = _problem()
    state = _warm(p, g)
    state.step_count = np.asarray(MAX_COUNT - 1, dtype=np.int64)
    cfg = F.LarsConfig(**HP)
    with BACKENDS[backend]():
        F.lars_update(p, g, state, **HP)  # reaches the bound: allowed
        assert state.step == MAX_COUNT
        snap = _snapshot([p], [state])
        with pytest.raises(ValueError, match=r"states\[0\]\.step_count.*nothing was updated"):
            F.lars_update(p, g, state, **HP)  # the remembered batch reads the counters again
        batch = F.prepare([p], [state])  # at the bound is a valid state...
        with pytest.raises(ValueError, match=r"states\[0\]\.step_count.*nothing was updated"):
            batch.update([p], [g], [state], cfg)  # ... that no step can follow
    _assert_untouched([p], [state], snap)


def test_the_counter_bound_is_documented():
    assert state_module.MAX_COUNT == MAX_COUNT and float(MAX_COUNT) == MAX_COUNT


# ---- 8-bit scales -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_corrupt_absmax_is_refused(backend, bad):
    p, g = _problem(1000)
    state = _warm(p, g, bits=8)
    absmax = state.absmax.copy()
    absmax[1] = bad
    state.absmax = absmax
    snap = _snapshot([p], [state])
    with BACKENDS[backend](), pytest.raises(ValueError, match=r"states\[0\]\.absmax"):
        F.lars_update(p, g, state, **HP)
    _assert_untouched([p], [state], snap)
    with pytest.raises(ValueError, match="absmax"):
        LarsState.from_dict(state.to_dict())


def test_the_largest_float32_absmax_is_a_valid_scale():
    p, g = _problem(1000)
    state = _warm(p, g, bits=8)
    state.absmax[0] = np.finfo(np.float32).max  # what a block holding float32's max has
    LarsState.from_dict(state.to_dict())


# ---- aliasing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params())
def test_one_state_for_two_params_is_refused(backend):
    p, g = _problem()
    q, h = _problem(seed=1)
    state = _warm(p, g)
    snap = _snapshot([p, q], [state])
    with BACKENDS[backend](), pytest.raises(ValueError, match=r"states\[1\] appears twice.*states\[0\]"):
        F.lars_update_many([p, q], [g, h], [state, state], **HP)
    _assert_untouched([p, q], [state], snap)


@pytest.mark.parametrize("backend", backend_params())
def test_a_momentum_that_is_the_parameter_is_refused(backend):
    p, g = _problem()
    state = _warm(p, g)
    state.momentum = p  # the parameter itself
    snap = _snapshot([p], [state])
    with (
        BACKENDS[backend](),
        pytest.raises(ValueError, match=r"params\[0\] and states\[0\]\.momentum share memory"),
    ):
        F.lars_update(p, g, state, **HP)
    _assert_untouched([p], [state], snap)


@pytest.mark.parametrize("backend", backend_params())
def test_state_arrays_shared_between_two_states_are_refused(backend):
    p, g = _problem()
    q, h = _problem(seed=1)
    a, b = _warm(p, g), _warm(q, h)
    b.step_count = a.step_count  # the counter would step twice
    snap = _snapshot([p, q], [a, b])
    with (
        BACKENDS[backend](),
        pytest.raises(ValueError, match=r"states\[0\]\.step_count and states\[1\]\.step_count"),
    ):
        F.lars_update_many([p, q], [g, h], [a, b], **HP)
    _assert_untouched([p, q], [a, b], snap)


@pytest.mark.parametrize("backend", backend_params())
def test_a_shared_history_is_refused_only_for_clipping(backend):
    # Without percentile clipping the history is neither read nor written (the torch
    # adapter shares one scratch history between such states).
    p, g = _problem()
    q, h = _problem(seed=1)
    a, b = F.init_state(p), F.init_state(q)
    b.history = a.history
    no_clip = {**HP, "percentile_clipping": 100}
    with BACKENDS[backend]():
        F.lars_update_many([p, q], [g, h], [a, b], **no_clip)
        snap = _snapshot([p, q], [a, b])
        with pytest.raises(ValueError, match=r"states\[1\]\.history is shared"):
            F.lars_update_many([p, q], [g, h], [a, b], **HP)
    _assert_untouched([p, q], [a, b], snap)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["momentum", "step_count", "history"])
def test_a_state_array_made_read_only_after_a_step_is_refused(backend, name):
    p, g = _problem()
    q, h = _problem(seed=1)
    states = [_warm(p, g), _warm(q, h)]
    with BACKENDS[backend]():
        F.lars_update_many([p, q], [g, h], states, **HP)  # the batch is remembered
        getattr(states[1], name).flags.writeable = False  # in place: the version stays
        snap = _snapshot([p, q], states)
        with pytest.raises(ValueError, match=rf"states\[1\]\.{name} is read-only"):
            F.lars_update_many([p, q], [g, h], states, **HP)
    _assert_untouched([p, q], states, snap)


def test_a_parameter_made_read_only_after_a_step_is_refused_by_the_reference():
    p, g = _problem()
    q, h = _problem(seed=1)
    states = [_warm(p, g), _warm(q, h)]
    with reference_backend():
        F.lars_update_many([p, q], [g, h], states, **HP)
        q.flags.writeable = False
        snap = _snapshot([p, q], states)
        with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
            F.lars_update_many([p, q], [g, h], states, **HP)
    _assert_untouched([p, q], states, snap)


# ---- alignment on the CUDA path ------------------------------------------------------------------------
def _at_odd_offset(values: np.ndarray) -> np.ndarray:
    """A copy of ``values`` one byte past an aligned address (np.frombuffer at offset 1)."""
    buffer = bytearray(values.nbytes + 1)
    view = np.frombuffer(buffer, dtype=values.dtype, count=values.size, offset=1).reshape(values.shape)
    view[...] = values
    assert view.ctypes.data % values.dtype.itemsize != 0 and view.flags.writeable
    return view


MISALIGNED = {
    "params[0]": lambda p, g, s: (_at_odd_offset(p), g, s),
    "grads[0]": lambda p, g, s: (p, _at_odd_offset(g), s),
    "states[0].momentum": lambda p, g, s: (p, g, _replace(s, momentum=_at_odd_offset(s.momentum))),
    "states[0].history": lambda p, g, s: (p, g, _replace(s, history=_at_odd_offset(s.history))),
    "states[0].step_count": lambda p, g, s: (p, g, _replace(s, step_count=_at_odd_offset(s.step_count))),
}


def _replace(state, **arrays):
    state = copy.deepcopy(state)
    for name, array in arrays.items():
        setattr(state, name, array)
    return state


@needs_gxx
@pytest.mark.parametrize("what", list(MISALIGNED))
def test_misaligned_arrays_are_refused_on_the_cuda_path(what):
    p, g = _problem()
    state = _warm(p, g)
    param, grad, st = MISALIGNED[what](p, g, state)
    snap = _snapshot([param], [st])
    with emulated_cuda(), pytest.raises(ValueError, match=rf"{re.escape(what)} is not aligned to its"):
        F.lars_update(param, grad, st, **HP)
    _assert_untouched([param], [st], snap)


@needs_gxx
def test_misaligned_8bit_scales_are_refused_on_the_cuda_path():
    p, g = _problem(1000)
    state = _warm(p, g, bits=8)
    state.absmax = _at_odd_offset(state.absmax)
    with emulated_cuda(), pytest.raises(ValueError, match=r"states\[0\]\.absmax is not aligned"):
        F.lars_update(p, g, state, **HP)


@needs_gxx
@pytest.mark.parametrize("what", ["params[0]", "states[0].history", "states[0].step_count"])
def test_the_emulator_asserts_the_alignment_of_scalar_accesses(what, monkeypatch):
    # With the launcher's refusal taken out, the kernels reach the misaligned memory: the
    # emulator fails the launch, as a GPU would fault, instead of quietly reading it.
    monkeypatch.setattr(cuda, "check_alignment", lambda named: None)
    p, g = _problem()
    state = _warm(p, g)
    param, grad, st = MISALIGNED[what](p, g, state)
    with emulated_cuda(), pytest.raises(EmulatorError, match="scalar access is not aligned"):
        F.lars_update(param, grad, st, **HP)


# ---- the torch adapter ---------------------------------------------------------------------------------
def _views_of_one_buffer():
    torch = pytest.importorskip("torch")
    base = torch.linspace(-1, 1, 100)
    a = torch.nn.Parameter(base[:60])  # shares base's memory
    b = torch.nn.Parameter(base[40:])
    assert a.data_ptr() < b.data_ptr() < a.data_ptr() + 60 * 4
    for p in (a, b):
        p.grad = torch.full_like(p, 0.01)
    return a, b


def _assert_adapter_refuses(opt, params, match):
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert len(opt.state) == 0  # no state entry was created
    for p, b in zip(params, before):
        assert p.detach().equal(b)


@pytest.mark.parametrize("foreach", [False, True])
def test_adapter_refuses_overlapping_params_in_one_group(foreach):
    from cupylars.optim import LARS32bit

    a, b = _views_of_one_buffer()
    opt = LARS32bit([a, b], lr=0.1, momentum=0.9, foreach=foreach)
    _assert_adapter_refuses(
        opt, [a, b], r"parameter 1 of param group 0 overlaps in memory with parameter 0 of param group 0"
    )


@pytest.mark.parametrize("foreach", [False, True])
def test_adapter_refuses_overlapping_params_across_groups(foreach):
    from cupylars.optim import LARS8bit

    a, b = _views_of_one_buffer()
    opt = LARS8bit([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1, momentum=0.9, foreach=foreach)
    _assert_adapter_refuses(
        opt, [a, b], r"parameter 0 of param group 1 overlaps in memory with parameter 0 of param group 0"
    )


def test_adapter_names_the_group_of_a_parameter_given_twice():
    torch = pytest.importorskip("torch")
    from cupylars.optim import LARS32bit

    a, _ = _views_of_one_buffer()
    other = torch.nn.Parameter(torch.ones(3))
    other.grad = torch.ones(3)
    with pytest.warns(UserWarning, match="duplicate"):  # torch's own warning, at construction
        opt = LARS32bit([{"params": [other]}, {"params": [a, a]}], lr=0.1)
    _assert_adapter_refuses(
        opt, [a, other], r"parameter 1 of param group 1 is the same tensor as parameter 0 of param group 1"
    )


def test_adapter_accepts_interleaved_views():
    # Strided views whose extents overlap but share no element are updated independently.
    torch = pytest.importorskip("torch")
    from cupylars.optim import LARS32bit

    base = torch.linspace(-1, 1, 100).view(10, 10)
    a, b = torch.nn.Parameter(base[:, 0::2]), torch.nn.Parameter(base[:, 1::2])
    twins = [torch.nn.Parameter(base[:, 0::2].clone()), torch.nn.Parameter(base[:, 1::2].clone())]
    for p in (a, b, *twins):
        p.grad = torch.full(p.shape, 0.01)
    LARS32bit([a, b], lr=0.1, momentum=0.9).step()
    LARS32bit(twins, lr=0.1, momentum=0.9).step()
    assert a.detach().equal(twins[0].detach()) and b.detach().equal(twins[1].detach())


def test_a_meta_lr_is_refused_with_a_clear_message():
    torch = pytest.importorskip("torch")
    from cupylars.optim import LARS

    model = torch.nn.Linear(4, 2)
    for capturable in (False, True):
        with pytest.raises(ValueError, match="lr is a meta tensor"):
            LARS(model.parameters(), lr=torch.tensor(0.1, device="meta"), capturable=capturable)
