"""Comparisons of the fused kernels with the NumPy reference that need only NumPy:
the emulated tests (tests/test_kernels_emulated.py), the GPU tests
(tests/test_kernels_gpu.py) and the plain GPU check (scripts/gpu_check.py) share
them, and the last two must run where hypothesis (and, for the script, pytest)
is not installed.
"""

from __future__ import annotations

import numpy as np
import spec64

from cupylars import functional as F
from cupylars import reference
from cupylars.state import LarsState


def to_storage(values: np.ndarray, fmt: str) -> np.ndarray:
    """float64 values -> an array in the storage format (bfloat16 as uint16 bits)."""
    rounded = spec64.round_to(np.asarray(values, dtype=np.float64), fmt)
    if fmt == "bfloat16":
        return (rounded.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return rounded.astype(fmt)


def values_of(array: np.ndarray, fmt: str) -> np.ndarray:
    """Stored array -> float64 values."""
    if fmt == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return array.astype(np.float64)


def dtype_arg(fmt: str) -> str | None:
    return "bfloat16" if fmt == "bfloat16" else None


def assert_codes_match(got, want, m_raw, absmax, m_scale, what: str = "") -> None:
    """8-bit codes of two implementations agree, except by one code where the
    unquantized ``m`` (``m_raw``, per element, with its block's ``absmax``) lies
    within float32 rounding of the decision boundary between the two codes.

    Elementwise float32 arithmetic (fused or not) moves m by at most ~1e-6 of
    the size of its terms (``m_scale``); only elements that close to a boundary
    may round to the neighbouring code.
    """
    got, want = got.astype(np.int64), want.astype(np.int64)
    gap = np.abs(got - want)
    assert gap.max(initial=0) <= 1, f"{what}: codes differ by {gap.max()}"
    idx = np.flatnonzero(gap)
    if idx.size == 0:
        return
    book = F.dynamic_map().astype(np.float64)
    lo = np.minimum(got, want)[idx]
    boundary = (book[lo] + book[lo + 1]) / 2
    scale = absmax[idx].astype(np.float64)
    x = m_raw[idx] / scale
    slack = 4e-6 * m_scale / scale + 1e-6
    far = np.abs(x - boundary) > slack
    assert not far.any(), (
        f"{what}: {far.sum()} of {idx.size} differing codes are not at a rounding boundary, e.g. "
        f"x={x[far][:3]}, boundary={boundary[far][:3]}, slack={slack[far][:3]}"
    )


def random_problem(rng: np.random.Generator, shape, fmt: str, zero_param: bool = False):
    p = np.zeros(shape) if zero_param else rng.standard_normal(shape) * rng.choice([1e-2, 1.0])
    return to_storage(p, fmt)


def random_grad(rng: np.random.Generator, shape, fmt: str) -> np.ndarray:
    scale = rng.choice([1e-3, 1e-1, 1.0, 10.0])
    return to_storage(rng.standard_normal(shape) * scale, fmt)


# Every switch on at once: the richest path through all three passes.
FULL = {
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-2,
    "trust_coefficient": 0.02,
    "max_unorm": 0.05,
    "percentile_clipping": 50,
}

# One entry per switch (and the combinations the update formula distinguishes).
CONFIGS = {
    "plain": {"lr": 0.1, "max_unorm": 0.0},
    "unorm_only": {"lr": 0.5},
    "momentum": {"lr": 0.1, "momentum": 0.9, "max_unorm": 0.0},
    "momentum_unorm": {"lr": 0.1, "momentum": 0.9, "max_unorm": 0.01},
    "dampening": {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "max_unorm": 0.02},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "max_unorm": 0.02},
    "nesterov_no_unorm": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "max_unorm": 0.0},
    "weight_decay": {"lr": 0.1, "weight_decay": 0.1, "max_unorm": 0.02},
    "trust": {"lr": 0.5, "momentum": 0.9, "trust_coefficient": 0.01, "weight_decay": 1e-4},
    "trust_clip": {"lr": 0.01, "momentum": 0.9, "trust_coefficient": 0.01, "trust_clip": True},
    "trust_clip_lr0": {"lr": 0.0, "trust_coefficient": 0.01, "trust_clip": True},
    "percentile": {"lr": 0.1, "momentum": 0.5, "percentile_clipping": 20, "max_unorm": 0.0},
    "percentile_5": {"lr": 0.1, "percentile_clipping": 5, "weight_decay": 1e-3},
    "full": FULL,
    "propagate": {**FULL, "nonfinite": "propagate"},
    "raise": {**FULL, "nonfinite": "raise"},
}


def _ulp(values: np.ndarray, fmt: str) -> np.ndarray:
    mant = {"float32": 23, "float16": 10, "bfloat16": 7}[fmt]
    tiny = {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}[fmt]
    exp = np.floor(np.log2(np.maximum(np.abs(values), 1e-300)))
    return np.maximum(2.0 ** (exp - mant), tiny)


def _assert_param_close(got, want, before, fmt, what):
    g, w, b = (values_of(a, fmt).ravel() for a in (got, want, before))
    assert np.array_equal(np.isnan(g), np.isnan(w)), f"{what}: NaN positions differ"
    finite = ~np.isnan(w)
    g, w, b = g[finite], w[finite], b[finite]
    step = np.max(np.abs(w - b), initial=0.0)  # the largest update of the tensor
    tol = _ulp(w, fmt) + 1e-5 * step + 1e-30
    bad = np.abs(g - w) > tol
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} differ, e.g. at {np.flatnonzero(bad)[:4]}: "
        f"got {g[bad][:4]}, want {w[bad][:4]} (tol {tol[bad][:4]})"
    )


def _assert_state_close(
    got: LarsState, want: LarsState, prev: LarsState, hp: dict, what: str, m_raw=None
) -> None:
    """``got`` (kernels) against ``want`` (reference), both one step after ``prev``;
    ``m_raw`` is the reference's float32 m before quantization (8-bit state)."""
    assert got.step == want.step, f"{what}: step {got.step} != {want.step}"
    assert got.skipped == want.skipped, f"{what}: skipped {got.skipped} != {want.skipped}"
    np.testing.assert_allclose(got.history, want.history, rtol=2e-6, atol=0, err_msg=f"{what}: history")
    assert got.has_momentum or not want.has_momentum, f"{what}: momentum missing"
    if not want.has_momentum or want.step == 0:
        return
    m_want = want.momentum_buffer().ravel()
    m_got = got.momentum_buffer().ravel()
    nan = np.isnan(m_want)  # nonfinite='propagate' carries NaN into m
    assert np.array_equal(np.isnan(m_got), nan), f"{what}: NaN positions of m differ"
    # m = mu m_old + (1 - dampening) d rounds at the size of its terms, which
    # can be far larger than m itself where they cancel.
    old = prev.momentum_buffer() if prev.step > 0 and prev.has_momentum else None
    carried = np.zeros_like(m_want) if old is None else np.abs(hp.get("momentum", 0.0) * old.ravel())
    if got.is_8bit:
        if m_raw is None:  # the reference skipped this tensor: both must hold the old state
            np.testing.assert_array_equal(got.codes, want.codes, err_msg=what)
            np.testing.assert_array_equal(got.absmax, want.absmax, err_msg=what)
            return
        terms = np.abs(m_raw) + 2 * carried  # bounds |mu m_old| + |(1 - dampening) d|
        m_scale = np.max(terms[np.isfinite(terms)], initial=0.0) + 1e-30
        finite_block = np.repeat(np.isfinite(want.absmax), 256)[: m_raw.size]
        absmax = np.repeat(want.absmax, 256)[: m_raw.size]
        assert_codes_match(
            got.codes.ravel()[finite_block],
            want.codes.ravel()[finite_block],
            m_raw[finite_block],
            absmax[finite_block],
            m_scale,
            what,
        )
        np.testing.assert_allclose(got.absmax, want.absmax, rtol=1e-6, atol=1e-6 * m_scale, err_msg=what)
        scale = np.repeat(want.absmax, 256)[: m_want.size][~nan]
        assert np.all(np.abs(m_got - m_want)[~nan] <= 0.02 * scale + 1e-30), f"{what}: dequantized m"
    else:
        terms = np.abs(m_want) + 2 * carried  # bounds |mu m_old| + |(1 - dampening) d|
        scale = np.max(terms[~np.isnan(terms)], initial=0.0) + 1e-30
        np.testing.assert_allclose(m_got[~nan], m_want[~nan], rtol=0, atol=1e-6 * scale, err_msg=what)


def reference_step(params, grads, states, hp, dtype):
    """The reference's step on copies of ``params`` and ``states`` (raising as it raises).

    Returns its params, states and, by ``id`` of each returned 8-bit state, its float32
    m before quantization: what a code is judged against (assert_codes_match).
    """
    ref_params = [p.copy() for p in params]
    ref_states = [LarsState.from_dict({k: np.copy(v) for k, v in s.to_dict().items()}) for s in states]
    raw_m: dict[int, np.ndarray] = {}
    store = reference._store_momentum

    def spy(state, m):
        raw_m[id(state)] = np.asarray(m, dtype=np.float64).ravel()
        store(state, m)

    reference._store_momentum = spy
    try:
        F.lars_update_many(ref_params, grads, ref_states, dtype=dtype, backend="reference", **hp)
    finally:
        reference._store_momentum = store
    return ref_params, ref_states, raw_m
