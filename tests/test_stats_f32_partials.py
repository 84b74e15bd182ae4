"""The float32-partials stats pass (-DLARS_STATS_F32_PARTIALS=1, the GPU build's on
sm_86, sm_87 and sm_89; docs/kernels.md, "float32 partials") against exact dot products.

The stats kernels of both emulated builds run on the same inputs; the partial sums
they write are compared with the exact sums (float64 products of the float32 values,
summed with math.fsum), within the bound the arithmetic gives: a lane's tile sums 8
products by fmaf in float32, so its partial is off by at most gamma_8 = 8u / (1 - 8u)
(u = 2^-24) of the tile's sum of |x y|, and the float64 sums across tiles add ~1e-15
of it. Tiles outside the float32 path's exact range (a NaN or Inf, a float32
overflow, a nonzero element below 2^-40) are summed in float64: those give the float64
build's partials bit for bit, and g.g stays finite exactly when g is.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import numpy as np
import pytest
from kernel_checks import FULL
from lars_cases import to_storage

from cupylars import backends, cuda, plan, quantization
from cupylars import functional as F
from cupylars.plan import SUMS

U = 2.0**-24
GAMMA_8 = 8 * U / (1 - 8 * U)
F64_SLACK = 1e-12  # float64 accumulation across tiles and the block's tree, relative to sum |x y|
SMALL_CHUNK = 512


def _backend(f32: bool):
    return cuda.emulated_backend(defines=cuda.STATS_F32_PARTIALS if f32 else None)


@contextmanager
def _recording_partials(backend):
    """Yields a list that receives the partials array of each stats launch."""
    seen: list[np.ndarray] = []
    original = backend._launch

    def launch(name, grid, block, args):
        original(name, grid, block, args)
        if name.startswith("lars_stats"):
            seen.append(args[-1])

    backend._launch = launch
    try:
        yield seen
    finally:
        del backend._launch


def _values(a: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _problem(rng, n, fmt, bits, scale_g=1.0, scale_p=1.0, scale_m=1.0):
    p = to_storage(rng.standard_normal(n) * scale_p, fmt)
    g = to_storage(rng.standard_normal(n) * scale_g, fmt)
    state = F.init_state(p, optim_bits=bits, min_8bit_size=0, dtype="bfloat16" if fmt == "bfloat16" else None)
    state.ensure_momentum(np)
    if bits == 8:
        state.codes[...] = rng.integers(0, 256, n, dtype=np.uint8)
        state.absmax[...] = (np.abs(rng.standard_normal(state.absmax.size)) * scale_m).astype(np.float32)
    else:
        state.momentum[...] = (rng.standard_normal(n) * scale_m).astype(np.float32)
    return p, g, state


def _m_values(state) -> np.ndarray:
    if state.codes is not None:
        book = quantization.dynamic_map().astype(np.float32)
        scale = np.repeat(state.absmax, 256)[: state.codes.size]
        return (book[state.codes.ravel()] * scale).astype(np.float32)
    return state.momentum.ravel()


def _exact(p, g, m) -> tuple[np.ndarray, np.ndarray]:
    """(exact sums, sums of |x y|) in the kernels' order g.g, p.p, m.m, g.p, g.m, p.m."""
    pairs = [(g, g), (p, p), (m, m), (g, p), (g, m), (p, m)]
    exact, size = [], []
    for a, b in pairs:
        prod = a.astype(np.float64) * b.astype(np.float64)  # exact: 24 + 24 bits
        exact.append(math.fsum(prod))
        size.append(math.fsum(np.abs(prod)))
    return np.array(exact), np.array(size)


def _stats(f32: bool, p, g, state, hp, fmt) -> np.ndarray:
    """One step on copies; the tensor's six sums as the stats pass wrote them (its block
    rows summed in float64, in order, as the finalize pass does in its tree)."""
    backend = _backend(f32)
    p, state = p.copy(), copy.deepcopy(state)
    with pytest.MonkeyPatch.context() as mp, _recording_partials(backend) as seen, backends.use(backend):
        mp.setattr(plan, "CHUNK_SIZE", SMALL_CHUNK)
        F.lars_update(p, g, state, dtype="bfloat16" if fmt == "bfloat16" else None, **hp)
    (partials,) = seen
    blocks = -(-p.size // SMALL_CHUNK)
    return np.asarray(partials[: blocks * SUMS]).reshape(blocks, SUMS).sum(axis=0)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 255, 3000])
def test_partials_within_the_float32_bound(n, fmt, bits):
    rng = np.random.default_rng(n * 31 + bits + len(fmt))
    p, g, state = _problem(rng, n, fmt, bits, scale_g=0.1, scale_m=0.5)
    exact, size = _exact(_values(p, fmt).ravel(), _values(g, fmt).ravel(), _m_values(state))
    got32 = _stats(True, p, g, state, FULL, fmt)
    got64 = _stats(False, p, g, state, FULL, fmt)
    assert np.all(np.abs(got64 - exact) <= F64_SLACK * size), (got64, exact)
    err32 = np.abs(got32 - exact)
    assert np.all(err32 <= (GAMMA_8 + F64_SLACK) * size), (err32 / size, GAMMA_8)
    if n >= 255:  # the float32 path ran: it rounds where float64 does not
        assert np.any(got32 != got64)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "scale",
    [1e25, 1e-20],  # squares past float32's maximum; products below its smallest normal
    ids=["overflowing-squares", "underflowing-products"],
)
def test_out_of_range_tiles_are_summed_in_float64(fmt, scale):
    rng = np.random.default_rng(int(math.log10(scale)) + 100)
    n = 3000
    p, g, state = _problem(rng, n, fmt, 32, scale_g=scale, scale_p=scale, scale_m=scale)
    got32 = _stats(True, p, g, state, FULL, fmt)
    got64 = _stats(False, p, g, state, FULL, fmt)
    assert np.all(np.isfinite(got32))
    np.testing.assert_array_equal(got32, got64)  # every tile took the float64 path
    exact, size = _exact(_values(p, fmt).ravel(), _values(g, fmt).ravel(), _m_values(state))
    assert np.all(np.abs(got32 - exact) <= F64_SLACK * size)


def test_one_huge_element_neither_overflows_nor_skips():
    # A finite g whose float32 square overflows: g.g stays finite (that lane's tile is
    # summed in float64), so the skip policy does not skip it.
    rng = np.random.default_rng(3)
    p, g, state = _problem(rng, 3000, "float32", 32)
    g[1234] = np.float32(3e30)
    before = p.copy()
    got32 = _stats(True, p, g, state, FULL, "float32")
    exact, size = _exact(p.ravel(), g.ravel(), _m_values(state))
    assert np.all(np.isfinite(got32))
    assert np.all(np.abs(got32 - exact) <= (GAMMA_8 + F64_SLACK) * size)
    with backends.use(_backend(True)):
        F.lars_update(p, g, state, **FULL)
    assert state.skipped == 0 and state.step == 1
    assert not np.array_equal(p, before)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_gradient_is_still_skipped(value):
    rng = np.random.default_rng(4)
    p, g, state = _problem(rng, 3000, "float32", 32)
    g[77] = value
    got32 = _stats(True, p, g, state, FULL, "float32")
    got64 = _stats(False, p, g, state, FULL, "float32")
    assert not np.isfinite(got32[0]) and not np.isfinite(got64[0])
    before = p.copy()
    with backends.use(_backend(True)):
        F.lars_update(p, g, state, **FULL)
    assert state.skipped == 1 and state.step == 0
    np.testing.assert_array_equal(p, before)


def test_the_range_bound_is_2_to_the_minus_40():
    # Tiles whose smallest nonzero element is exactly 2^-40 stay in float32; with one
    # element just below it in every lane's quads, every lane sums its tile in float64
    # (the float64 build's partials, bit for bit).
    n = 256
    g_in = np.full(n, np.float32(2.0**-40) * np.float32(1.5), np.float32)
    g_in[::3] = np.float32(2.0**-40)
    g_out = g_in.copy()
    g_out[1::4] = np.nextafter(np.float32(2.0**-40), np.float32(0))
    rng = np.random.default_rng(5)
    for g, same in ((g_in, False), (g_out, True)):
        p, _, state = _problem(rng, n, "float32", 32)
        p[...] = np.float32(1.0) + rng.random(n).astype(np.float32)  # no cancellation, round off in float32
        got32 = _stats(True, p, g, state, FULL, "float32")
        got64 = _stats(False, p, g, state, FULL, "float32")
        assert np.array_equal(got32, got64) == same
