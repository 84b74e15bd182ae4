"""The 8-bit code book and the blockwise quantizer against an independent implementation."""

import numpy as np
import pytest
import spec64
from hypothesis import given, settings
from hypothesis import strategies as st

from cupylars import functional as F
from cupylars.quantization import BLOCK_SIZE, ZERO_CODE, num_blocks


def test_shipped_map_has_the_reference_sha256():
    assert spec64.map_sha256(F.dynamic_map()) == spec64.MAP_SHA256


def test_shipped_map_equals_the_construction():
    np.testing.assert_array_equal(F.dynamic_map(), spec64.build_dynamic_map())


def test_map_shape_and_landmarks():
    book = F.dynamic_map()
    assert book.dtype == np.float32 and book.shape == (256,)
    assert np.all(np.diff(book) > 0), "strictly ascending"
    assert book[ZERO_CODE] == 0.0 and book[255] == 1.0
    assert -1.0 not in book and book[0] > -1.0


def test_dynamic_map_returns_a_copy():
    F.dynamic_map()[0] = 5.0
    assert F.dynamic_map()[0] != 5.0


@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from([1, 2, 255, 256, 257, 511, 1000, 4097]),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6]),
    seed=st.integers(0, 2**32 - 1),
)
def test_codes_match_independent_quantizer(n, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * scale * rng.exponential(1.0, n)).astype(np.float32)
    x[rng.random(n) < 0.05] = 0.0
    codes, absmax = F.quantize_blockwise(x)
    want_codes, want_absmax = spec64.quantize(x, F.dynamic_map())
    np.testing.assert_array_equal(absmax, want_absmax)
    np.testing.assert_array_equal(codes, want_codes)
    assert codes.dtype == np.uint8 and absmax.dtype == np.float32
    assert absmax.shape == (num_blocks(n),)


def test_exact_ties_go_to_the_lower_code():
    book = F.dynamic_map()
    ties = []
    for lo in range(255):
        mid = np.float32((np.float64(book[lo]) + np.float64(book[lo + 1])) / 2)
        if np.float32(mid - book[lo]) == np.float32(book[lo + 1] - mid):
            ties.append((lo, mid))
    assert len(ties) > 50, "the map has many exactly representable midpoints"
    values = np.array([1.0] + [m for _, m in ties], dtype=np.float32)  # absmax 1: x == value
    values = values[:BLOCK_SIZE]
    codes, absmax = F.quantize_blockwise(values)
    assert absmax[0] == 1.0
    for (lo, _), code in zip(ties[: BLOCK_SIZE - 1], codes[1:]):
        assert code == lo


def test_one_ulp_past_a_tie_goes_up():
    book = F.dynamic_map()
    lo = 200
    mid = np.float32((np.float64(book[lo]) + np.float64(book[lo + 1])) / 2)
    above = np.nextafter(mid, np.float32(2))
    codes, _ = F.quantize_blockwise(np.array([1.0, mid, above], dtype=np.float32))
    assert list(codes[1:]) == [lo, lo + 1]


def test_extremes():
    # -absmax maps below map[0] (no -1.0 in the map): code 0; +absmax is exactly 1.0: code 255.
    codes, absmax = F.quantize_blockwise(np.array([-3.0, 3.0, 0.0, -1e-30], dtype=np.float32))
    assert absmax[0] == 3.0
    assert codes[0] == 0 and codes[1] == 255 and codes[2] == ZERO_CODE
    assert codes[3] == ZERO_CODE  # far below the smallest magnitude rounds to zero


def test_zero_block_gets_zero_code_and_zero_absmax():
    x = np.zeros(700, dtype=np.float32)
    x[600] = 2.0  # only the third block is non-zero
    codes, absmax = F.quantize_blockwise(x)
    assert list(absmax) == [0.0, 0.0, 2.0]
    assert np.all(codes[:512] == ZERO_CODE)
    np.testing.assert_array_equal(F.dequantize_blockwise(codes, absmax)[:512], 0.0)


def test_short_last_block_uses_its_own_absmax():
    x = np.ones(257, dtype=np.float32)
    x[256] = -0.5
    codes, absmax = F.quantize_blockwise(x)
    assert list(absmax) == [1.0, 0.5]
    assert codes[256] == 0  # -absmax of its own block


def test_dequantize_is_map_times_absmax_and_keeps_shape():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    codes, absmax = F.quantize_blockwise(x)
    assert codes.shape == x.shape
    got = F.dequantize_blockwise(codes, absmax)
    want = spec64.dequantize(codes, absmax, F.dynamic_map())
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # error bound: half the widest gap of the map, times the block's absmax
    gap = np.max(np.diff(F.dynamic_map())) / 2
    scale = np.repeat(absmax, BLOCK_SIZE)[: x.size].reshape(x.shape)
    assert np.all(np.abs(got - x) <= gap * scale * (1 + 1e-5))


def test_dequantize_rejects_wrong_absmax_length():
    with pytest.raises(ValueError, match="absmax"):
        F.dequantize_blockwise(np.zeros(300, np.uint8), np.zeros(1, np.float32))
