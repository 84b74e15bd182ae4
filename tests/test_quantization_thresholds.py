"""The 8-bit code as a count of thresholds (quantization.code_thresholds), against
the rounding rule of quantize_blockwise, and the CUDA kernels' branch-free search
(rawkernels/lars_common.cuh) run through the emulator.

The kernels find the code of x = m / absmax as the number of thresholds below x
(a binary search over 255 floats, no data-dependent branch); the reference finds
it with searchsorted and the two-sided distance rule. These tests hold the two
to the same code for every float32 within many ulps of each threshold and of each
map value, on a sweep over all float32 bit patterns, and for NaN and infinities.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cupylars import quantization as q
from cupylars._paths import kernel_dir

KERNELS = __file__.rsplit("/", 1)[0] + "/kernels/quantize_kernels.cu"


def _reference_codes(x: np.ndarray) -> np.ndarray:
    """quantize_blockwise's code of each x (a block of absmax 1 scales by 1: x itself)."""
    return q._nearest_code(np, x.astype(np.float32))


def _around(points: np.ndarray, ulps: int) -> np.ndarray:
    """Every float32 within ``ulps`` steps of each of ``points`` (walking through 0)."""
    ordered = q._ordered(points.astype(np.float32))
    steps = np.arange(-ulps, ulps + 1, dtype=np.int64)
    near = (ordered[:, None] + steps[None, :]).ravel()
    near = near[np.abs(near) < 0x7F800000]  # finite floats only
    return np.unique(q._from_ordered(near))


def _specials() -> np.ndarray:
    f = np.finfo(np.float32)
    ordinary = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, f.max, -f.max, f.tiny, -f.tiny]
    subnormal = [1e-45, -1e-45, 3e-39, -3e-39]
    return np.array([*ordinary, *subnormal, np.inf, -np.inf, np.nan, -np.nan], dtype=np.float32)


def _count_below(thresholds: np.ndarray, x: np.ndarray) -> np.ndarray:
    code = np.searchsorted(thresholds, x, side="left")  # thresholds strictly below x
    return np.where(np.isnan(x), 255, code).astype(np.uint8)


def test_thresholds_bracket_each_code():
    t = q.code_thresholds()
    book = q.dynamic_map()
    assert t.dtype == np.float32 and t.shape == (255,)
    assert np.all(book[:-1] <= t) and np.all(t < book[1:])
    assert np.all(np.diff(t) > 0)
    # T[i] is the largest float of code i: it has code i and the next float code i + 1
    assert np.array_equal(_reference_codes(t), np.arange(255, dtype=np.uint8))
    above = np.nextafter(t, np.float32(np.inf), dtype=np.float32)
    assert np.array_equal(_reference_codes(above), np.arange(1, 256, dtype=np.uint8))


def test_the_count_of_thresholds_below_is_the_code_near_every_threshold():
    t = q.code_thresholds()
    x = np.concatenate([_around(t, 4096), _around(q.dynamic_map(), 4096), _specials()])
    assert x.size > 2_000_000
    np.testing.assert_array_equal(_count_below(t, x), _reference_codes(x))


def test_the_count_of_thresholds_below_is_the_code_over_all_float32():
    t = q.code_thresholds()
    bits = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)  # every exponent, both signs, NaNs
    x = bits.view(np.float32)
    with np.errstate(invalid="ignore"):  # inf - inf in the rule's distances (its code is 0 or 255)
        want = _reference_codes(x)
    np.testing.assert_array_equal(_count_below(t, x), want)


def test_code_table_layout():
    table = q.code_table()
    assert table.dtype == np.float32 and table.shape == (512,)
    np.testing.assert_array_equal(table[:256], q.dynamic_map())
    assert table[256] == -np.inf
    np.testing.assert_array_equal(table[257:], q.code_thresholds())


# ---- the CUDA search itself, on the emulator ------------------------------------------------------
needs_emulator = pytest.mark.skipif(
    importlib.util.find_spec("cupylars._emulator") is None, reason="the CPU emulator is not available"
)


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    from cupylars._emulator import EmulatedModule

    return EmulatedModule(
        [KERNELS],
        ["codes_of", "quantize_tiles"],
        include_dirs=(str(kernel_dir()),),
        cache_dir=tmp_path_factory.mktemp("quantize-emulator"),
    )


@needs_emulator
def test_kernel_search_matches_the_rule_near_every_threshold(mod):
    t = q.code_thresholds()
    x = np.concatenate([_around(t, 48), _around(q.dynamic_map(), 8), _specials()]).astype(np.float32)
    # (subnormal x code as 127 with or without the flush: no threshold lies near 0)
    out = np.zeros(x.size, dtype=np.uint8)
    mod.get_function("codes_of")((64,), (256,), (q.code_table(), x, out, np.int64(x.size)))
    want = _reference_codes(x)
    bad = np.flatnonzero(out != want)
    assert bad.size == 0, [(float(x[i]), int(out[i]), int(want[i])) for i in bad[:10]]


def _tiles_near_thresholds(rng: np.random.Generator, tiles: int) -> np.ndarray:
    """Blocks of 256 whose m / absmax land within a few ulps of a threshold (m rounded
    from threshold x absmax, then nudged), with absmax itself in each block."""
    t = q.code_thresholds()
    scales = np.concatenate(
        [
            np.float32([1.0, 0.5, 3.0, 1e-3, 7.3e-12, 2.5e30, 1.7e38]),
            (10.0 ** rng.uniform(-30, 30, tiles)).astype(np.float32),
        ]
    )[:tiles]
    m = np.empty((tiles, 256), dtype=np.float32)
    for k, a in enumerate(scales):
        picks = t[rng.integers(0, 255, 256)]
        vals = (picks.astype(np.float64) * np.float64(a)).astype(np.float32)
        nudge = rng.integers(-3, 4, 256)
        vals = q._from_ordered(q._ordered(vals) + nudge)
        vals = np.clip(vals, -a, a)
        vals[rng.integers(0, 256)] = a if rng.random() < 0.5 else -a  # the block's absmax
        m[k] = vals
    return m


@needs_emulator
def test_kernel_tile_quantization_matches_quantize_blockwise_on_boundaries(mod):
    rng = np.random.default_rng(20)
    tiles = 96
    m = _tiles_near_thresholds(rng, tiles)
    codes = np.zeros(m.size, dtype=np.uint8)
    absmax = np.zeros(tiles, dtype=np.float32)
    args = (q.code_table(), m.ravel(), codes, absmax, np.int64(tiles))
    mod.get_function("quantize_tiles")((tiles // 8,), (256,), args)
    want_codes, want_absmax = q.quantize_blockwise(m.ravel())
    np.testing.assert_array_equal(absmax, want_absmax)
    bad = np.flatnonzero(codes != want_codes)
    assert bad.size == 0, f"{bad.size} codes differ, first at {bad[:5]}"
    # the blocks do exercise the boundaries: many values sit within 3 ulps of a threshold
    x = q._ordered((m / absmax[:, None]).astype(np.float32).ravel())
    ulps_off = np.abs(x[:, None] - q._ordered(q.code_thresholds())[None, :]).min(axis=1)
    assert np.mean(ulps_off <= 3) > 0.5
