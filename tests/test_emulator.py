"""The CPU emulator of CUDA kernels (cupylars._emulator).

The kernels in tests/kernels/emulator_kernels.cu run through the shim; every
result is checked against an independent NumPy computation (or, for the
shuffles, against CUDA's documented semantics written out per lane).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cupylars import _emulator
from cupylars._emulator import EmulatedModule, EmulatorCompileError, EmulatorError

if shutil.which("g++") is None:
    pytest.skip("the CUDA emulator needs g++", allow_module_level=True)

KERNELS = Path(__file__).resolve().parent / "kernels" / "emulator_kernels.cu"
NAMES = [
    "record_builtins",
    "affine_2d",
    "block_sum_shared",
    "dynamic_shared_reverse",
    "warp_sums",
    "shuffle_modes",
    "shuffle_wide",
    "votes",
    "warp_reduce_match",
    "block_votes",
    "early_exit_barrier",
    "atomics",
    "spin_lock_counter",
    "convert_16bit",
    "decode_16bit",
    "arith_16bit",
    "typed_args",
    "api_surface",
    "deadlock_mixed_barriers",
    "deadlock_partial_shuffle",
    "mismatched_masks",
    "trap_when",
    "assert_positive",
    "wait_for_later_block",
    "big_stack",
]
FULL = 0xFFFFFFFF


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emulator-cache")


@pytest.fixture(scope="module")
def mod(cache_dir: Path) -> EmulatedModule:
    return EmulatedModule([KERNELS], NAMES, cache_dir=cache_dir)


def variant(cache_dir: Path, **options: object) -> EmulatedModule:
    """The same (already built) module with other launch options."""
    return EmulatedModule([KERNELS], NAMES, cache_dir=cache_dir, **options)


# ---- indexing -----------------------------------------------------------------------------------


def test_builtins_over_a_3d_grid(mod: EmulatedModule) -> None:
    grid, block = (2, 3, 2), (4, 2, 3)
    threads = np.prod(grid) * np.prod(block)
    out = np.full(threads * 12, -1, np.int32)
    mod.get_function("record_builtins")(grid, block, (out,))

    # Independent layout: blocks x-fastest, threads x-fastest within a block.
    bz, by, bx, tz, ty, tx = np.meshgrid(
        *(np.arange(n) for n in (grid[2], grid[1], grid[0], block[2], block[1], block[0])), indexing="ij"
    )
    expected = np.stack(
        [tx, ty, tz, bx, by, bz] + [np.full_like(tx, v) for v in (*block, *grid)],
        axis=-1,
    ).reshape(-1, 12)
    np.testing.assert_array_equal(out.reshape(-1, 12), expected)


def test_2d_grid_indexing(mod: EmulatedModule) -> None:
    height, width = 29, 37
    image = np.random.default_rng(0).random((height, width), dtype=np.float32)
    out = np.full_like(image, np.nan)
    block = (8, 4)
    grid = (-(-width // block[0]), -(-height // block[1]))
    mod.get_function("affine_2d")(grid, block, (image, out, np.int32(width), np.int32(height)))
    ys, xs = np.indices((height, width))
    expected = (np.float32(2) * image + xs.astype(np.float32)) - ys.astype(np.float32)
    np.testing.assert_array_equal(out, expected)


# ---- shared memory and block barriers ----------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"schedule": "reverse"}, {"threads": 2}])
@pytest.mark.parametrize("block", [64, 256])
def test_block_tree_reduction(cache_dir: Path, options: dict, block: int) -> None:
    module = variant(cache_dir, **options)
    n, grid = 5000, 7
    values = np.random.default_rng(1).integers(0, 100, n).astype(np.float32)  # sums stay exact
    partial = np.zeros(grid, np.float32)
    module.get_function("block_sum_shared")((grid,), (block,), (values, partial, np.int32(n)))
    owner = (np.arange(n) // block) % grid  # grid-stride loop: which block reads element i
    expected = np.bincount(owner, weights=values, minlength=grid).astype(np.float32)
    np.testing.assert_array_equal(partial, expected)


def test_dynamic_shared_memory(mod: EmulatedModule) -> None:
    grid, block = 3, 64
    values = np.arange(grid * block, dtype=np.float32)
    out = np.zeros_like(values)
    mod.get_function("dynamic_shared_reverse")((grid,), (block,), (values, out), shared_mem=block * 4)
    np.testing.assert_array_equal(out, values.reshape(grid, block)[:, ::-1].ravel())


def test_block_votes(mod: EmulatedModule) -> None:
    rng = np.random.default_rng(2)
    for pred in (rng.integers(0, 2, 96), np.ones(96), np.zeros(96)):
        pred = pred.astype(np.int32)
        out = np.full(3, -1, np.int32)
        mod.get_function("block_votes")((1,), (96,), (pred, out))
        assert list(out) == [pred.sum(), int(pred.all()), int(pred.any())]


def test_exited_threads_do_not_block_barriers(mod: EmulatedModule) -> None:
    out = np.full(128, -1, np.int32)
    mod.get_function("early_exit_barrier")((1,), (64,), (out,))
    t = np.arange(40)
    np.testing.assert_array_equal(out[:40], 39 - t)
    np.testing.assert_array_equal(out[64:104], t ^ 1)
    assert np.all(out[40:64] == -1) and np.all(out[104:] == -1)


# ---- warps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"schedule": "reverse"}])
def test_warp_shuffle_reductions(cache_dir: Path, options: dict) -> None:
    module = variant(cache_dir, **options)
    grid, block = 3, 256
    rng = np.random.default_rng(3)
    values = rng.integers(-1000, 1000, grid * block).astype(np.float32)  # exact sums
    xor_out = np.zeros_like(values)
    down_out = np.zeros(grid * block // 32, np.float32)
    block_out = np.zeros(grid, np.float32)
    module.get_function("warp_sums")((grid,), (block,), (values, xor_out, down_out, block_out))
    warp_totals = values.reshape(-1, 32).sum(axis=1)
    np.testing.assert_array_equal(xor_out, np.repeat(warp_totals, 32))
    np.testing.assert_array_equal(down_out, warp_totals)
    np.testing.assert_array_equal(block_out, values.reshape(grid, -1).sum(axis=1))

    # Arbitrary floats: the butterfly leaves bit-identical sums in all lanes.
    values = rng.standard_normal(grid * block).astype(np.float32)
    module.get_function("warp_sums")((grid,), (block,), (values, xor_out, down_out, block_out))
    lanes = xor_out.reshape(-1, 32)
    assert np.all(lanes == lanes[:, :1])
    np.testing.assert_allclose(lanes[:, 0], values.reshape(-1, 32).sum(axis=1, dtype=np.float64), rtol=1e-5)


def documented_shuffles(width: int, delta: int, src: int, lane_mask: int) -> np.ndarray:
    """What CUDA's programming guide says each lane of a 64-thread block gets."""
    t = np.arange(64)
    lane = t % 32
    base = t - lane
    group, pos = lane // width, lane % width
    value = 100 * t + 1
    idx = group * width + src % width  # srcLane outside [0, width) wraps within the group
    up = np.where(pos >= delta, lane - delta, lane)  # no source: own value
    down = np.where(pos + delta < width, lane + delta, lane)
    partner = lane ^ lane_mask
    xor = np.where(partner // width > group, lane, partner)  # later groups: own value
    return np.stack([value[base + idx], value[base + up], value[base + down], value[base + xor]], axis=1)


@pytest.mark.parametrize(
    ("width", "delta", "src", "lane_mask"),
    [(32, 1, 0, 16), (32, 5, 31, 3), (16, 3, 5, 8), (8, 3, 13, 16), (4, 1, 6, 2), (1, 1, 0, 1)],
)
def test_shuffle_modes_follow_cuda(
    mod: EmulatedModule, width: int, delta: int, src: int, lane_mask: int
) -> None:
    out = np.zeros((64, 4), np.int32)
    args = (out, np.int32(width), np.uint32(delta), np.int32(src), np.int32(lane_mask))
    mod.get_function("shuffle_modes")((1,), (64,), args)
    np.testing.assert_array_equal(out, documented_shuffles(width, delta, src, lane_mask))


def test_invalid_shuffle_width(mod: EmulatedModule) -> None:
    out = np.zeros((32, 4), np.int32)
    with pytest.raises(EmulatorError, match="width 12"):
        mod.get_function("shuffle_modes")(1, 32, (out, np.int32(12), np.uint32(1), np.int32(0), np.int32(1)))


def test_64bit_shuffles(mod: EmulatedModule) -> None:
    values = np.random.default_rng(4).standard_normal(64)
    out_d = np.zeros(64)
    out_ll = np.zeros(64, np.int64)
    mod.get_function("shuffle_wide")((1,), (64,), (values, out_d, out_ll))
    t = np.arange(64)
    np.testing.assert_array_equal(out_d, values[t ^ 1])
    source = (t - t % 32) + 31 - t % 32
    np.testing.assert_array_equal(out_ll, (source.astype(np.int64) << 40) | 5)


def test_votes_with_a_partial_warp(mod: EmulatedModule) -> None:
    threads = 80  # warps of 32, 32 and 16 lanes
    pred = np.random.default_rng(5).integers(0, 2, threads).astype(np.int32)
    pred[32:64] = 1
    pred[64:] = 0
    ballots = np.zeros(6, np.uint32)
    any_all = np.full(6, -1, np.int32)
    active = np.zeros(threads, np.uint32)
    branch = np.zeros(threads, np.uint32)
    mod.get_function("votes")((1,), (threads,), (pred, ballots, any_all, active, branch))

    def bits(p: np.ndarray) -> int:
        return int(sum(1 << i for i, v in enumerate(p) if v))

    warps = [pred[0:32], pred[32:64], pred[64:80]]
    assert list(ballots[:3]) == [bits(w) for w in warps]
    even = [bits(np.where(np.arange(len(w)) % 2 == 0, w, 0)) for w in warps]
    assert list(ballots[3:]) == even
    assert list(any_all) == [v for w in warps for v in (int(w.any()), int(w.all()))]
    np.testing.assert_array_equal(active, [FULL] * 64 + [0xFFFF] * 16)
    np.testing.assert_array_equal(branch, np.where(np.arange(threads) % 32 < 8, 0xFF, 0))


def test_warp_reduce_and_match(mod: EmulatedModule) -> None:
    values = np.random.default_rng(6).integers(-50, 50, 64).astype(np.int32)
    sums = np.zeros(2, np.int32)
    maxima = np.zeros(2, np.uint32)
    groups = np.zeros(64, np.uint32)
    mod.get_function("warp_reduce_match")((1,), (64,), (values, sums, maxima, groups))
    per_warp = values.reshape(2, 32)
    np.testing.assert_array_equal(sums, per_warp.sum(axis=1))
    np.testing.assert_array_equal(maxima, per_warp.view(np.uint32).max(axis=1))
    residue = np.fmod(per_warp, 3)  # C's % truncates
    expected = [
        sum(1 << m for m in range(32) if residue[w, m] == residue[w, lane])
        for w in range(2)
        for lane in range(32)
    ]
    np.testing.assert_array_equal(groups, expected)


# ---- atomics -------------------------------------------------------------------------------------

ATOMIC_RESULTS = np.dtype(
    [
        ("fsum", np.float32),
        ("imax", np.int32),
        ("dsum", np.float64),
        ("usum", np.uint64),
        ("imin", np.int32),
        ("bits_or", np.uint32),
        ("bits_and", np.uint32),
        ("first_writer", np.int32),
        ("winners", np.int32),
        ("exch_slot", np.int32),
        ("wrapped", np.uint32),
        ("countdown", np.int32),
    ],
    align=True,  # the C struct's layout
)


@pytest.mark.parametrize("threads", [1, 2])
def test_atomics(cache_dir: Path, threads: int) -> None:
    module = variant(cache_dir, threads=threads)
    n, nbins = 3000, 17
    keys = np.random.default_rng(7).integers(0, 1000, n).astype(np.int32)
    hist = np.zeros(nbins, np.int32)
    trace = np.zeros(n, np.int32)
    r = np.zeros(1, ATOMIC_RESULTS)
    r["imax"], r["imin"], r["bits_and"] = -(2**31), 2**31 - 1, FULL
    r["first_writer"], r["exch_slot"], r["countdown"] = -1, -7, 10_000
    args = (keys, np.int32(n), hist, np.int32(nbins), r, trace)
    module.get_function("atomics")((-(-n // 128),), (128,), args)

    k = keys.astype(np.int64)
    np.testing.assert_array_equal(hist, np.bincount(k % nbins, minlength=nbins))
    assert r["fsum"][0] == k.sum()  # integers below 2^24: exact in any order
    assert r["dsum"][0] == 0.5 * k.sum()
    assert r["usum"][0] == (k << 20).sum()
    assert r["imax"][0] == k.max() - 500 and r["imin"][0] == k.min() - 500
    assert r["bits_or"][0] == np.bitwise_or.reduce(1 << (k & 31))
    assert r["bits_and"][0] == FULL & ~int(np.bitwise_or.reduce(1 << (k & 31)))
    assert r["winners"][0] == 1 and 0 <= r["first_writer"][0] < n
    # Every exchange returned the previous occupant: together with the final
    # value they are the initial value and each index exactly once.
    np.testing.assert_array_equal(np.sort(np.append(trace, r["exch_slot"])), np.append(-7, np.arange(n)))
    assert r["wrapped"][0] == n % 10
    assert r["countdown"][0] == 10_000 - n


@pytest.mark.parametrize("threads", [1, 2])
def test_spin_lock_within_a_block(cache_dir: Path, threads: int) -> None:
    lock, counter = np.zeros(1, np.int32), np.zeros(1, np.int32)
    variant(cache_dir, threads=threads).get_function("spin_lock_counter")((3,), (64,), (lock, counter))
    assert counter[0] == 3 * 64 and lock[0] == 0


# ---- 16-bit floats -------------------------------------------------------------------------------


def bfloat16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7fff (CUDA's canonical NaN)."""
    bits = x.view(np.uint32)
    upper, lower = bits >> 16, bits & 0xFFFF
    round_up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & 1) == 1))
    out = (upper + round_up).astype(np.uint16)
    out[np.isnan(x)] = 0x7FFF
    return out


def special_floats() -> np.ndarray:
    two = np.float64(2)
    values = [
        0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan,
        65504.0, 65519.99, 65520.0, -65520.0, 65536.0, 1e30,
        two**-14, two**-24, two**-25, 3 * two**-25, two**-26, 1.5 * two**-24, 2.5 * two**-24,
        1 + two**-11, 1 + 3 * two**-11, 1 + two**-8, 1 + 3 * two**-8, 1 + two**-8 + two**-20,
        np.finfo(np.float32).max, np.finfo(np.float32).tiny, np.finfo(np.float32).smallest_subnormal,
        3.3895313892515355e38,  # rounds to bfloat16 infinity
    ]  # fmt: skip
    return np.array(values, dtype=np.float32)


def test_float_to_16bit_conversions(mod: EmulatedModule) -> None:
    rng = np.random.default_rng(8)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    moderate = rng.standard_normal(50_000).astype(np.float32) * np.float32(1000)
    x = np.concatenate([special_floats(), random_bits, moderate])
    n = x.size
    h_bits, b_bits = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    h_back, b_back = np.zeros(n, np.float32), np.zeros(n, np.float32)
    mod.get_function("convert_16bit")(
        (-(-n // 256),), (256,), (x, h_bits, h_back, b_bits, b_back, np.int32(n))
    )

    nan = np.isnan(x)
    with np.errstate(over="ignore", invalid="ignore"):
        half = x.astype(np.float16)
    np.testing.assert_array_equal(h_bits[~nan], half.view(np.uint16)[~nan])
    assert np.all(h_bits[nan] == 0x7FFF)
    np.testing.assert_array_equal(h_back[~nan], half.astype(np.float32)[~nan])
    assert np.all(np.isnan(h_back[nan]))

    np.testing.assert_array_equal(b_bits, bfloat16_rne(x))
    np.testing.assert_array_equal(b_back.view(np.uint32), b_bits.astype(np.uint32) << 16)


def test_16bit_to_float_exhaustive(mod: EmulatedModule) -> None:
    h_out, b_out = np.zeros(65536, np.float32), np.zeros(65536, np.float32)
    mod.get_function("decode_16bit")((256,), (256,), (h_out, b_out))
    bits = np.arange(65536, dtype=np.uint32)
    half = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(half)
    np.testing.assert_array_equal(h_out[~nan], half[~nan])
    assert np.all(h_out[nan].view(np.uint32) == 0x7FFFFFFF)  # CUDA's canonical NaN
    np.testing.assert_array_equal(b_out.view(np.uint32), bits << 16)


def test_16bit_arithmetic_rounds_once(mod: EmulatedModule) -> None:
    rng = np.random.default_rng(9)
    n = 20_000

    def operands(to_bits: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        magnitude = np.exp2(rng.uniform(-5, 6.5, n)).astype(np.float32)
        return to_bits(magnitude * rng.choice(np.array([-1, 1], np.float32), n))

    def half_bits(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float16).view(np.uint16)

    a, b, c = (operands(half_bits) for _ in range(3))
    h_mul, h_fma, b_mul = (np.zeros(n, np.uint16) for _ in range(3))
    launch = mod.get_function("arith_16bit")
    launch((-(-n // 128),), (128,), (a, b, c, h_mul, h_fma, b_mul, np.int32(n)))
    fa, fb, fc = (v.view(np.float16).astype(np.float64) for v in (a, b, c))
    # Products of halves are exact in float32 and a*b+c in float64 (bounded
    # exponents), so NumPy's conversion gives the correctly rounded results.
    np.testing.assert_array_equal(h_mul, (fa * fb).astype(np.float32).astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(h_fma, (fa * fb + fc).astype(np.float16).view(np.uint16))

    a, b = operands(bfloat16_rne), operands(bfloat16_rne)
    launch((-(-n // 128),), (128,), (a, b, c, h_mul, h_fma, b_mul, np.int32(n)))
    fa, fb = ((v.astype(np.uint32) << 16).view(np.float32) for v in (a, b))
    np.testing.assert_array_equal(b_mul, bfloat16_rne(fa * fb))  # bfloat16 products are exact in float32


def test_device_api_sample(mod: EmulatedModule) -> None:
    f, i, u = np.zeros(11, np.float32), np.zeros(5, np.int32), np.zeros(8, np.uint64)
    u[5] = 41
    mod.get_function("api_surface")((1,), (32,), (f, i, u))
    np.testing.assert_array_equal(f, [24, 3.5, 4.25, 0, 3.5, 0.5, 1 + 4 + 12 + 32, 10.25, 1, 3, 7])
    np.testing.assert_array_equal(i, [8 + 31 + 4, -4 + 5, 2000 - 200 - 30 + 3, 0x3FF00000, -3])
    expected = [0x3FF0000000000000, 0x80000000, 2, 0x55114400, 42, 41, 0x1F, 1]
    np.testing.assert_array_equal(u, np.array(expected, np.uint64))


# ---- arguments -----------------------------------------------------------------------------------


def typed_args(out: np.ndarray) -> list:
    table_rows = [np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32)]
    table = np.array([row.ctypes.data for row in table_rows], np.uint64)
    return [
        out,
        np.array([2.5]),
        np.int32(-3),
        np.uint32(4),
        np.int64(5),
        np.float32(0.25),
        np.float64(0.5),
        np.bool_(True),
        table,
        np.float16(1.5),
        np.array([7, 8, 9], np.uint8),
        np.arange(8, dtype=np.float32),
        table_rows,  # kept alive by the caller; not an argument
    ]


def test_typed_arguments_reach_the_kernel(mod: EmulatedModule) -> None:
    out = np.zeros(4, np.float32)
    *args, _rows = typed_args(out)
    kernel = mod.get_function("typed_args")
    kernel(1, 1, tuple(args))
    np.testing.assert_array_equal(out, [0.25 + 0.5 - 3 + 4 + 5 + 1 + 1.5, 2.5, 4.0, 9 + 7])

    out[:] = 0  # a raw address as np.uint64 works for a pointer parameter
    kernel(1, 1, (np.uint64(out.ctypes.data), *args[1:]))
    assert out[1] == 2.5


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (5, np.float64(0.25), r"argument 5 \(parameter type float\) got a NumPy float64"),
        (2, np.int64(-3), r"argument 2 \(parameter type int32\) got a NumPy int64"),
        (2, -3, r"argument 2 .* got a Python int"),
        (5, 0.25, r"argument 5 .* got a Python float"),
        (0, np.float32(1), r"argument 0 \(parameter type pointer to float\) got a NumPy float32"),
        (2, np.zeros(1, np.int32), r"argument 2 .* got an ndarray"),
        (0, np.zeros(4, np.float64), r"argument 0 .* got an array of dtype float64"),
        (8, np.zeros(2, np.uint32), r"argument 8 \(parameter type pointer to pointer\)"),
        (7, np.int8(1), r"argument 7 \(parameter type bool\)"),
        (1, [2.5], r"argument 1 .* got list"),
    ],
)
def test_argument_mismatches_raise(mod: EmulatedModule, index: int, value: object, message: str) -> None:
    out = np.zeros(4, np.float32)
    *args, _rows = typed_args(out)
    args[index] = value
    with pytest.raises(TypeError, match="typed_args: " + message):
        mod.get_function("typed_args")(1, 1, tuple(args))
    assert not out.any(), "nothing was launched"


def test_argument_count_and_layout_checks(mod: EmulatedModule) -> None:
    out = np.zeros(4, np.float32)
    *args, _rows = typed_args(out)
    kernel = mod.get_function("typed_args")
    with pytest.raises(TypeError, match="takes 12 argument"):
        kernel(1, 1, tuple(args[:-1]))
    with pytest.raises(ValueError, match="not C-contiguous"):
        kernel(1, 1, (np.zeros(8, np.float32)[::2], *args[1:]))
    with pytest.raises(ValueError, match="16-byte aligned"):
        kernel(1, 1, (*args[:-1], np.zeros(12, np.float32)[1:9]))


def test_launch_configuration_limits(mod: EmulatedModule) -> None:
    kernel = mod.get_function("record_builtins")
    out = np.zeros(12 * 2048, np.int32)
    for grid, block in [
        (1, 1025),
        (1, (32, 32, 2)),
        (1, (1, 1, 65)),
        (0, 32),
        ((1, 65536), 32),
        ((1, 1, 1, 1), 1),
    ]:
        with pytest.raises((EmulatorError, ValueError), match=r"grid|block"):
            kernel(grid, block, (out,))
    with pytest.raises(EmulatorError, match="shared_mem"):
        kernel(1, 1, (out,), shared_mem=10**6)
    kernel(1, (32, 32), (out,))  # 1024 threads is the limit, not past it


# ---- failures inside kernels ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "message"),
    [
        ("deadlock_mixed_barriers", np.int32, r"deadlock .* wait at __syncthreads\(\).* __syncwarp"),
        ("deadlock_partial_shuffle", np.float32, r"deadlock .* __shfl_xor_sync\(mask=0xffffffff\)"),
        ("mismatched_masks", np.int32, r"do not match .*mask=0x0000ffff"),
    ],
)
def test_barrier_misuse_raises_instead_of_hanging(
    mod: EmulatedModule, name: str, dtype: type, message: str
) -> None:
    with pytest.raises(EmulatorError, match=message):
        mod.get_function(name)((2,), (32,), (np.zeros(32, dtype),))
    test_2d_grid_indexing(mod)  # the module keeps working


def test_trap_and_assert_raise(mod: EmulatedModule) -> None:
    flags = np.zeros(128, np.int32)
    mod.get_function("trap_when")((2,), (64,), (flags,))
    flags[77] = 1
    with pytest.raises(EmulatorError, match=r"__trap\(\) called \[block \(1,0,0\), thread \(13,0,0\)\]"):
        mod.get_function("trap_when")((2,), (64,), (flags,))

    x = np.ones(100, np.float32)
    mod.get_function("assert_positive")((2,), (64,), (x, np.int32(100)))
    x[42] = -1
    with pytest.raises(EmulatorError, match=r"emulator_kernels.cu:\d+: .*assertion `x\[i\] > 0.0f' failed"):
        mod.get_function("assert_positive")((2,), (64,), (x, np.int32(100)))


def test_waiting_for_a_later_block_is_a_livelock(cache_dir: Path) -> None:
    kernel = variant(cache_dir, threads=1).get_function("wait_for_later_block")
    with pytest.raises(EmulatorError, match="livelock"):
        kernel((2,), (1,), (np.zeros(1, np.int32),))
    flag = np.zeros(1, np.int32)  # with blocks on two OS threads the flag does arrive
    variant(cache_dir, threads=2).get_function("wait_for_later_block")((2,), (1,), (flag,))
    assert flag[0] == 1


def test_stack_overflow_hits_the_guard_page(cache_dir: Path, tmp_path: Path) -> None:
    """A kernel needing more than the fiber stack dies by SIGSEGV, never corrupts silently."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from cupylars._emulator import EmulatedModule
        mod = EmulatedModule([{str(KERNELS)!r}], {NAMES!r}, cache_dir={str(cache_dir)!r})
        mod.get_function("big_stack")(1, 2, (np.zeros(2, np.float32), np.int32(1 << 16)))
        """
    )
    EmulatedModule([KERNELS], NAMES, cache_dir=cache_dir)  # built before the child needs it
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    # Run from tmp_path: a core dump, if the system writes one, lands there.
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=tmp_path, env=env)
    assert child.returncode == -11, child.stderr.decode()

    out = np.zeros(2, np.float32)
    variant(cache_dir, stack_size=1 << 20).get_function("big_stack")(1, 2, (out, np.int32(1 << 16)))
    np.testing.assert_array_equal(out, 65535.0)


# ---- compilation ------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_modules_are_cached(tmp_path: Path) -> None:
    header = write(tmp_path / "scale.cuh", "#define SCALE 3\n")
    source = write(
        tmp_path / "scale.cu",
        f"""
        #include "scale.cuh"
        // unique to this test run: {tmp_path}
        extern "C" __global__ void scale(int* x) {{ x[threadIdx.x] *= SCALE; }}
        """,
    )
    cache = tmp_path / "cache"

    def run() -> tuple[EmulatedModule, np.ndarray]:
        module = EmulatedModule([source], ["scale"], cache_dir=cache)
        x = np.arange(4, dtype=np.int32)
        module.get_function("scale")(1, 4, (x,))
        return module, x

    first, x = run()
    assert first.compiled and first.library_path.parent == cache
    np.testing.assert_array_equal(x, [0, 3, 6, 9])
    again, _ = run()
    assert not again.compiled and again.library_path == first.library_path

    _emulator._clear_memory_cache()
    from_disk, _ = run()
    assert not from_disk.compiled and from_disk.library_path == first.library_path
    assert sorted(p.name[len(first.library_path.stem) :] for p in cache.iterdir() if p.suffix != ".cpp") == [
        ".so",
        ".so.sha256",  # the library's digest, checked before it is loaded
    ]

    write(header, "#define SCALE 5\n")  # an included header is part of the key
    changed, x = run()
    assert changed.compiled and changed.library_path != first.library_path
    np.testing.assert_array_equal(x, [0, 5, 10, 15])


def test_compile_errors_carry_the_compiler_output(tmp_path: Path) -> None:
    source = write(tmp_path / "broken.cu", 'extern "C" __global__ void ok(int* x) { x[0] = 1; }\n')
    with pytest.raises(EmulatorCompileError, match=r"(?s)missing.*hint: a requested kernel is missing"):
        EmulatedModule([source], ["ok", "missing"], cache_dir=tmp_path / "cache")


def test_unknown_kernel_name(mod: EmulatedModule) -> None:
    with pytest.raises(KeyError, match="not exported"):
        mod.get_function("nope")


# ---- flush to zero (CuPy compiles with -ftz=true) -------------------------------------------------

FTZ_KERNELS = Path(__file__).resolve().parent / "kernels" / "ftz_kernels.cu"
TINY32 = np.finfo(np.float32).tiny  # the smallest normal float32, 2^-126


def flushed(x: np.ndarray) -> np.ndarray:
    """float32 values with subnormals replaced by a zero of the same sign (the GPU's -ftz)."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.abs(x) < TINY32, np.copysign(np.float32(0), x), x).astype(np.float32)


def ftz_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    two = np.float64(2)
    special = [  # (a, b, c)
        (1e-20, 1e-20, 0.0),  # product 1e-40: a subnormal result
        (-1e-20, 1e-20, -0.0),  # the same, negative: -0.0
        (1e-40, 1.0, 0.0),  # a subnormal input
        (-1e-40, 3.0, -0.0),
        (1.5e-38, 1.0, -1.2e-38),  # a sum of normals that is subnormal
        (two**-70, two**-70, two**-139),  # subnormal product and addend: fma gives 0
        (two**-63, two**-63, two**-126),  # a normal fma result from a subnormal product
        (1.0, 2.0, 3.0),
    ]
    rng = np.random.default_rng(21)
    a = rng.standard_normal(2000) * 2.0 ** rng.integers(-70, -55, 2000)
    b = rng.standard_normal(2000) * 2.0 ** rng.integers(-70, -55, 2000)
    c = rng.standard_normal(2000) * np.abs(a * b) * 4
    cols = [np.concatenate([[s[k] for s in special], v]).astype(np.float32) for k, v in enumerate((a, b, c))]
    return cols[0], cols[1], cols[2]


def exact_fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fmaf(a, b, c) rounded once to float32, and where that is known exactly: a*b is
    exact in float64; when the float64 sum is exact too (TwoSum error 0), rounding it
    to float32 is the single rounding of the true value."""
    p = a.astype(np.float64) * b.astype(np.float64)
    s = p + c.astype(np.float64)
    bp = s - p
    err = (p - (s - bp)) + (c.astype(np.float64) - bp)
    with np.errstate(under="ignore"):
        return s.astype(np.float32), err == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_subnormals_flush_to_zero(cache_dir: Path, threads: int) -> None:
    module = EmulatedModule([FTZ_KERNELS], ["float_ops"], cache_dir=cache_dir, threads=threads)
    if not module.flushes_subnormals:
        pytest.skip("the emulator knows no flush-to-zero control on this CPU architecture")
    a, b, c = ftz_inputs()
    n = a.size
    mul, add, fused = (np.full(n, np.nan, np.float32) for _ in range(3))
    widened, positive = np.full(n, np.nan), np.full(n, -1, np.int32)
    args = (a, b, c, mul, add, fused, widened, positive, np.int32(n))
    module.get_function("float_ops")((-(-n // 128),), (128,), args)

    fa, fb, fc = flushed(a), flushed(b), flushed(c)
    with np.errstate(under="ignore"):
        want_mul = flushed(fa * fb)
        want_add = flushed(fa + fc)
    want_fma, exact = exact_fma32(fa, fb, fc)
    want_fma = flushed(want_fma)
    assert exact[:8].all() and exact.mean() > 0.9  # the cases the test is about are all known exactly
    bits = np.uint32
    np.testing.assert_array_equal(mul.view(bits), want_mul.view(bits))
    np.testing.assert_array_equal(add.view(bits), want_add.view(bits))
    np.testing.assert_array_equal(fused.view(bits)[exact], want_fma.view(bits)[exact])
    np.testing.assert_array_equal(widened, fa.astype(np.float64))
    np.testing.assert_array_equal(positive, (fa > 0).astype(np.int32))
    # The flush is what made these differ: IEEE gradual underflow keeps them.
    with np.errstate(under="ignore"):
        assert (a[:5] * b[:5])[0] != 0 and a[2] + c[2] != 0 and a[4] + c[4] != 0
    assert np.signbit(mul[1]) and not np.signbit(mul[0]) and mul[0] == 0 and mul[1] == 0
    assert fused[5] == 0 and fused[6] == np.float32(2.0**-126 + 2.0**-126)
    assert widened[2] == 0 and positive[2] == 0


def test_the_callers_floating_point_mode_is_restored(cache_dir: Path) -> None:
    module = EmulatedModule([FTZ_KERNELS], ["float_ops"], cache_dir=cache_dir)
    x = np.array([1e-20], np.float32)
    out = [np.zeros(1, np.float32) for _ in range(3)]
    module.get_function("float_ops")(
        (1,), (32,), (x, x, x, *out, np.zeros(1), np.zeros(1, np.int32), np.int32(1))
    )
    assert out[0][0] == 0 or not module.flushes_subnormals
    # NumPy, on the calling thread, still has gradual underflow after the launch.
    with np.errstate(under="ignore"):
        assert x[0] * x[0] == np.float32(1e-40) != 0
