"""The emulator computes what the GPU computes (docs/kernels.md, "The emulator contract"):
float32 subnormals flush to zero as under CuPy's -ftz=true, and a vector access that
is not aligned to its size fails as it would fault on a GPU.
"""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest

from cupylars import cuda, plan
from cupylars import functional as F
from cupylars._emulator import EmulatedModule, EmulatorError
from cupylars.state import LarsState
from cupylars.testing import emulated_cuda, reference

if shutil.which("g++") is None:
    pytest.skip("the CUDA emulator needs g++", allow_module_level=True)

TINY32 = np.finfo(np.float32).tiny


def _emulator_flushes() -> bool:
    source, _ = cuda.kernel_sources()
    return EmulatedModule([source], ["lars_finalize"], include_dirs=[source.parent]).flushes_subnormals


def test_subnormal_parameters_flush_to_zero_in_a_step():
    """With g = 0 and no weight decay, u = 0 and the step p - lr s u leaves every normal
    p as it is; the GPU's fma.rn.ftz reads a subnormal p as a zero of its sign, so those
    elements become +-0. The NumPy reference (gradual underflow) keeps them."""
    if not _emulator_flushes():
        pytest.skip("the emulator knows no flush-to-zero control on this CPU architecture")
    rng = np.random.default_rng(3)
    p = (rng.standard_normal(1000) * 1e-3).astype(np.float32)
    subnormal = np.arange(0, 1000, 7)
    p[subnormal] = (rng.standard_normal(subnormal.size) * 1e-39).astype(np.float32)
    assert np.all((np.abs(p[subnormal]) < TINY32) & (p[subnormal] != 0))
    g = np.zeros_like(p)
    hp = {"lr": 0.1, "momentum": 0.9, "max_unorm": 0.02, "trust_coefficient": 0.02}

    want = np.where(np.abs(p) < TINY32, np.copysign(np.float32(0), p), p).astype(np.float32)
    ref = p.copy()
    with reference():
        F.lars_update(ref, g, F.init_state(ref), **hp)
    assert np.array_equal(ref.view(np.uint32), p.view(np.uint32))  # no flush: the reference keeps p

    got = p.copy()
    with emulated_cuda():
        F.lars_update(got, g, F.init_state(got), **hp)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ---- alignment of vector accesses -------------------------------------------------------------------
RULE = "m_width = np.where(modes == STATE_32, 16, 4)"
PLANTED = {  # a wrong quad-alignment rule for the momentum arrays, and where it goes wrong
    "state32": "m_width = np.where(modes == STATE_32, 4, 4)",  # float32 m needs 16 bytes
    "state8": "m_width = np.where(modes == STATE_32, 16, 1)",  # a quad of codes needs 4
}


def _plan_with(rule: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A copy of cupylars/plan.py with the momentum alignment rule replaced."""
    source = open(plan.__file__, encoding="utf-8").read()
    assert source.count(RULE) == 1, f"cupylars/plan.py no longer states the rule {RULE!r}; update this test"
    module = types.ModuleType("cupylars._planted_plan")
    module.__package__ = "cupylars"
    module.__file__ = plan.__file__
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(source.replace(RULE, rule), plan.__file__, "exec"), module.__dict__)
    return module


def _misaligned_state(p: np.ndarray, mode: str) -> tuple[LarsState, np.ndarray]:
    """A state whose momentum array starts off its quad alignment (float32 m 4 bytes past
    a 16-byte boundary; codes 2 bytes past a 4-byte one): legal, but only the scalar
    path may touch it. Returns the state and the momentum array."""
    n = p.size
    if mode == "state32":
        base = np.zeros(n + 8, np.float32)
        skip = (-base.ctypes.data % 16) // 4 + 1
        m = base[skip : skip + n]
        state = LarsState.from_dict({**F.init_state(p).to_dict(), "momentum": m})
    else:
        base = np.full(n + 8, 127, np.uint8)
        skip = (-base.ctypes.data % 4) + 2
        m = base[skip : skip + n]
        blocks = -(-n // 256)
        data = {**F.init_state(p, optim_bits=8, min_8bit_size=0).to_dict(), "codes": m}
        data["absmax"] = np.zeros(blocks, np.float32)
        state = LarsState.from_dict(data)
    return state, m


@pytest.mark.parametrize("mode", list(PLANTED))
def test_a_wrong_alignment_rule_fails_in_the_emulator(mode, monkeypatch):
    rng = np.random.default_rng(17)
    p = (rng.standard_normal(3000) * 0.1).astype(np.float32)
    g = (rng.standard_normal(3000) * 0.01).astype(np.float32)
    hp = {"lr": 0.1, "momentum": 0.9, "max_unorm": 0.02}

    # The launcher's own rule sends the misaligned m down the scalar path: the steps run
    # and agree with the reference.
    state, m = _misaligned_state(p, mode)
    assert m.ctypes.data % (16 if mode == "state32" else 4) != 0
    got, want = p.copy(), p.copy()
    ref_state = LarsState.from_dict({k: np.copy(v) for k, v in state.to_dict().items()})
    with emulated_cuda():
        for _ in range(2):
            F.lars_update(got, g, state, **hp)
    with reference():
        for _ in range(2):
            F.lars_update(want, g, ref_state, **hp)
    assert state.step == 2
    # float32 rounding of the update; 8-bit m may differ by one code at a rounding boundary
    moved = np.max(np.abs(want - p))
    np.testing.assert_allclose(got, want, rtol=0, atol=(1e-5 if mode == "state32" else 1e-2) * moved)

    # The planted rule lets quads touch it: on a GPU a misaligned-address fault.
    monkeypatch.setattr(plan, "build_tables", _plan_with(PLANTED[mode], monkeypatch).build_tables)
    state, _ = _misaligned_state(p, mode)
    fresh = p.copy()
    with emulated_cuda(), pytest.raises(EmulatorError, match="not aligned"):
        for _ in range(2):
            F.lars_update(fresh, g, state, **hp)
