"""Blockwise 8-bit quantization of optimizer state with the signed dynamic map.

An 8-bit state tensor of ``n`` elements is ``n`` uint8 codes plus one float32
``absmax`` per block of :data:`BLOCK_SIZE` consecutive elements (flattened in C
order; the last block may be short)::

    m[i] = DYNAMIC_MAP[code[i]] * absmax[i // BLOCK_SIZE]

The code book is the signed dynamic map of bitsandbytes
(``create_dynamic_map(signed=True)``), so 8-bit states are interchangeable
with theirs. Its 256 values are shipped below as exact float32 hex literals;
``tests/test_quantization.py`` checks them against their SHA-256 and rebuilds
them from the construction.

Rounding rule (shared bit for bit with ``rawkernels/lars_common.cuh``): with
``x = m / absmax`` in float32, ``lo`` the largest index with ``map[lo] <= x``
and ``hi = lo + 1``, the code is ``lo`` when ``x - map[lo] <= map[hi] - x``
(float32 arithmetic), else ``hi``; ``x < map[0]`` gives 0 and ``x >= map[255]``
gives 255. A block whose absmax is 0 is coded 127 (the map's 0.0) everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "BLOCK_SIZE",
    "ZERO_CODE",
    "code_table",
    "code_thresholds",
    "dequantize_blockwise",
    "dynamic_map",
    "num_blocks",
    "quantize_blockwise",
]

#: Elements per absmax block.
BLOCK_SIZE = 256
#: The code of 0.0 in the dynamic map.
ZERO_CODE = 127

_DYNAMIC_MAP_HEX = (
    "-0x1.fc66660000000p-1", "-0x1.f533340000000p-1", "-0x1.ee00000000000p-1", "-0x1.e6cccc0000000p-1",
    "-0x1.df999a0000000p-1", "-0x1.d866660000000p-1", "-0x1.d133340000000p-1", "-0x1.ca00000000000p-1",
    "-0x1.c2cccc0000000p-1", "-0x1.bb999a0000000p-1", "-0x1.b466660000000p-1", "-0x1.ad33340000000p-1",
    "-0x1.a600000000000p-1", "-0x1.9ecccc0000000p-1", "-0x1.97999a0000000p-1", "-0x1.9066660000000p-1",
    "-0x1.8933340000000p-1", "-0x1.8200000000000p-1", "-0x1.7acccc0000000p-1", "-0x1.73999a0000000p-1",
    "-0x1.6c66680000000p-1", "-0x1.6533340000000p-1", "-0x1.5e00000000000p-1", "-0x1.56cccc0000000p-1",
    "-0x1.4f999a0000000p-1", "-0x1.4866680000000p-1", "-0x1.4133340000000p-1", "-0x1.3a00000000000p-1",
    "-0x1.32cccc0000000p-1", "-0x1.2b999a0000000p-1", "-0x1.2466680000000p-1", "-0x1.1d33340000000p-1",
    "-0x1.1600000000000p-1", "-0x1.0ecccc0000000p-1", "-0x1.0799980000000p-1", "-0x1.0066660000000p-1",
    "-0x1.f266640000000p-2", "-0x1.e400000000000p-2", "-0x1.d599980000000p-2", "-0x1.c733340000000p-2",
    "-0x1.b8cccc0000000p-2", "-0x1.aa66660000000p-2", "-0x1.9c00000000000p-2", "-0x1.8d99980000000p-2",
    "-0x1.7f33340000000p-2", "-0x1.70cccc0000000p-2", "-0x1.6266660000000p-2", "-0x1.5400000000000p-2",
    "-0x1.4599980000000p-2", "-0x1.3733340000000p-2", "-0x1.28cccc0000000p-2", "-0x1.1a66680000000p-2",
    "-0x1.0c00000000000p-2", "-0x1.fb33320000000p-3", "-0x1.de66660000000p-3", "-0x1.c1999a0000000p-3",
    "-0x1.a4cccc0000000p-3", "-0x1.8800000000000p-3", "-0x1.6b33340000000p-3", "-0x1.4e66660000000p-3",
    "-0x1.31999a0000000p-3", "-0x1.14cccc0000000p-3", "-0x1.f000000000000p-4", "-0x1.b666680000000p-4",
    "-0x1.93d70a0000000p-4", "-0x1.8851ee0000000p-4", "-0x1.7cccce0000000p-4", "-0x1.7147ae0000000p-4",
    "-0x1.65c2900000000p-4", "-0x1.5a3d700000000p-4", "-0x1.4eb8540000000p-4", "-0x1.4333340000000p-4",
    "-0x1.37ae140000000p-4", "-0x1.2c28f60000000p-4", "-0x1.20a3d60000000p-4", "-0x1.151eba0000000p-4",
    "-0x1.09999a0000000p-4", "-0x1.fc28f60000000p-5", "-0x1.e51eba0000000p-5", "-0x1.ce147a0000000p-5",
    "-0x1.b70a3e0000000p-5", "-0x1.a000000000000p-5", "-0x1.88f5c20000000p-5", "-0x1.71eb860000000p-5",
    "-0x1.5ae1460000000p-5", "-0x1.43d70a0000000p-5", "-0x1.2cccce0000000p-5", "-0x1.15c2900000000p-5",
    "-0x1.fd70a40000000p-6", "-0x1.cf5c2a0000000p-6", "-0x1.a147ae0000000p-6", "-0x1.7333340000000p-6",
    "-0x1.451eba0000000p-6", "-0x1.170a3e0000000p-6", "-0x1.d1eb860000000p-7", "-0x1.75c2900000000p-7",
    "-0x1.3e76c80000000p-7", "-0x1.2c08300000000p-7", "-0x1.19999a0000000p-7", "-0x1.072b020000000p-7",
    "-0x1.e978d40000000p-8", "-0x1.c49ba60000000p-8", "-0x1.9fbe760000000p-8", "-0x1.7ae1480000000p-8",
    "-0x1.56041a0000000p-8", "-0x1.3126e80000000p-8", "-0x1.0c49ba0000000p-8", "-0x1.ced9140000000p-9",
    "-0x1.851eb80000000p-9", "-0x1.3b645a0000000p-9", "-0x1.e353f80000000p-10", "-0x1.4fdf3a0000000p-10",
    "-0x1.eecbfe0000000p-11", "-0x1.b3d07c0000000p-11", "-0x1.78d5000000000p-11", "-0x1.3dd9820000000p-11",
    "-0x1.02de020000000p-11", "-0x1.8fc5060000000p-12", "-0x1.19ce0a0000000p-12", "-0x1.47ae160000000p-13",
    "-0x1.743e960000000p-14", "-0x1.15df660000000p-14", "-0x1.6f00680000000p-15", "-0x1.64840c0000000p-16",
    "-0x1.040bfe0000000p-17", "-0x1.b435280000000p-19", "-0x1.27476e0000000p-21", "0x0.0p+0",
    "0x1.27476e0000000p-21", "0x1.b435280000000p-19", "0x1.040bfe0000000p-17", "0x1.64840c0000000p-16",
    "0x1.6f00680000000p-15", "0x1.15df660000000p-14", "0x1.743e960000000p-14", "0x1.47ae160000000p-13",
    "0x1.19ce0a0000000p-12", "0x1.8fc5060000000p-12", "0x1.02de020000000p-11", "0x1.3dd9820000000p-11",
    "0x1.78d5000000000p-11", "0x1.b3d07c0000000p-11", "0x1.eecbfe0000000p-11", "0x1.4fdf3a0000000p-10",
    "0x1.e353f80000000p-10", "0x1.3b645a0000000p-9", "0x1.851eb80000000p-9", "0x1.ced9140000000p-9",
    "0x1.0c49ba0000000p-8", "0x1.3126e80000000p-8", "0x1.56041a0000000p-8", "0x1.7ae1480000000p-8",
    "0x1.9fbe760000000p-8", "0x1.c49ba60000000p-8", "0x1.e978d40000000p-8", "0x1.072b020000000p-7",
    "0x1.19999a0000000p-7", "0x1.2c08300000000p-7", "0x1.3e76c80000000p-7", "0x1.75c2900000000p-7",
    "0x1.d1eb860000000p-7", "0x1.170a3e0000000p-6", "0x1.451eba0000000p-6", "0x1.7333340000000p-6",
    "0x1.a147ae0000000p-6", "0x1.cf5c2a0000000p-6", "0x1.fd70a40000000p-6", "0x1.15c2900000000p-5",
    "0x1.2cccce0000000p-5", "0x1.43d70a0000000p-5", "0x1.5ae1460000000p-5", "0x1.71eb860000000p-5",
    "0x1.88f5c20000000p-5", "0x1.a000000000000p-5", "0x1.b70a3e0000000p-5", "0x1.ce147a0000000p-5",
    "0x1.e51eba0000000p-5", "0x1.fc28f60000000p-5", "0x1.09999a0000000p-4", "0x1.151eba0000000p-4",
    "0x1.20a3d60000000p-4", "0x1.2c28f60000000p-4", "0x1.37ae140000000p-4", "0x1.4333340000000p-4",
    "0x1.4eb8540000000p-4", "0x1.5a3d700000000p-4", "0x1.65c2900000000p-4", "0x1.7147ae0000000p-4",
    "0x1.7cccce0000000p-4", "0x1.8851ee0000000p-4", "0x1.93d70a0000000p-4", "0x1.b666680000000p-4",
    "0x1.f000000000000p-4", "0x1.14cccc0000000p-3", "0x1.31999a0000000p-3", "0x1.4e66660000000p-3",
    "0x1.6b33340000000p-3", "0x1.8800000000000p-3", "0x1.a4cccc0000000p-3", "0x1.c1999a0000000p-3",
    "0x1.de66660000000p-3", "0x1.fb33320000000p-3", "0x1.0c00000000000p-2", "0x1.1a66680000000p-2",
    "0x1.28cccc0000000p-2", "0x1.3733340000000p-2", "0x1.4599980000000p-2", "0x1.5400000000000p-2",
    "0x1.6266660000000p-2", "0x1.70cccc0000000p-2", "0x1.7f33340000000p-2", "0x1.8d99980000000p-2",
    "0x1.9c00000000000p-2", "0x1.aa66660000000p-2", "0x1.b8cccc0000000p-2", "0x1.c733340000000p-2",
    "0x1.d599980000000p-2", "0x1.e400000000000p-2", "0x1.f266640000000p-2", "0x1.0066660000000p-1",
    "0x1.0799980000000p-1", "0x1.0ecccc0000000p-1", "0x1.1600000000000p-1", "0x1.1d33340000000p-1",
    "0x1.2466680000000p-1", "0x1.2b999a0000000p-1", "0x1.32cccc0000000p-1", "0x1.3a00000000000p-1",
    "0x1.4133340000000p-1", "0x1.4866680000000p-1", "0x1.4f999a0000000p-1", "0x1.56cccc0000000p-1",
    "0x1.5e00000000000p-1", "0x1.6533340000000p-1", "0x1.6c66680000000p-1", "0x1.73999a0000000p-1",
    "0x1.7acccc0000000p-1", "0x1.8200000000000p-1", "0x1.8933340000000p-1", "0x1.9066660000000p-1",
    "0x1.97999a0000000p-1", "0x1.9ecccc0000000p-1", "0x1.a600000000000p-1", "0x1.ad33340000000p-1",
    "0x1.b466660000000p-1", "0x1.bb999a0000000p-1", "0x1.c2cccc0000000p-1", "0x1.ca00000000000p-1",
    "0x1.d133340000000p-1", "0x1.d866660000000p-1", "0x1.df999a0000000p-1", "0x1.e6cccc0000000p-1",
    "0x1.ee00000000000p-1", "0x1.f533340000000p-1", "0x1.fc66660000000p-1", "0x1.0000000000000p+0",)
_DYNAMIC_MAP = np.array([float.fromhex(h) for h in _DYNAMIC_MAP_HEX], dtype=np.float32)
_DYNAMIC_MAP.flags.writeable = False


def dynamic_map() -> np.ndarray:
    """The 256 ascending float32 values of the signed dynamic map (a copy)."""
    return _DYNAMIC_MAP.copy()


def num_blocks(n: int) -> int:
    """Number of absmax blocks of an ``n``-element tensor."""
    return -(-n // BLOCK_SIZE)


def _array_module(x: Any) -> Any:
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _blocks(xp: Any, flat: Any) -> Any:
    """``flat`` zero-padded to whole blocks, as a (num_blocks, BLOCK_SIZE) view."""
    n = flat.size
    padded = xp.zeros(num_blocks(n) * BLOCK_SIZE, dtype=xp.float32)
    padded[:n] = flat
    return padded.reshape(-1, BLOCK_SIZE)


def quantize_blockwise(x: Any) -> tuple[Any, Any]:
    """Quantize ``x`` (any shape, cast to float32) to ``(codes, absmax)``.

    ``codes`` is uint8 with the shape of ``x``; ``absmax`` is float32 with one
    entry per block of 256 flattened elements. Works on NumPy and CuPy arrays.
    """
    xp = _array_module(x)
    flat = xp.ascontiguousarray(x, dtype=xp.float32).ravel()
    blocks = _blocks(xp, flat)
    absmax = xp.abs(blocks).max(axis=1)
    safe = xp.where(absmax > 0, absmax, xp.float32(1))
    scaled = (blocks / safe[:, None]).astype(xp.float32).ravel()[: flat.size]
    codes = _nearest_code(xp, scaled)
    empty_block = xp.repeat(absmax == 0, BLOCK_SIZE)[: flat.size]
    codes = xp.where(empty_block, xp.uint8(ZERO_CODE), codes)
    return codes.reshape(x.shape), absmax


def _nearest_code(xp: Any, scaled: Any) -> Any:
    """The rounding rule of the module docstring, vectorised."""
    book = xp.asarray(_DYNAMIC_MAP)
    lo = xp.searchsorted(book, scaled, side="right") - 1  # largest lo with map[lo] <= x
    lo_c = xp.clip(lo, 0, 254)
    hi_c = lo_c + 1
    below = scaled - book[lo_c]  # float32 - float32 stays float32
    above = book[hi_c] - scaled
    code = xp.where(below <= above, lo_c, hi_c)
    code = xp.where(lo < 0, 0, code)
    code = xp.where(lo >= 255, 255, code)
    return code.astype(xp.uint8)


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 in value order (so bisection over the integers walks the floats)."""
    i = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(i >= 0, i, -(i & 0x7FFFFFFF))


def _from_ordered(i: np.ndarray) -> np.ndarray:
    bits = np.where(i >= 0, i, (-i) | 0x80000000).astype(np.uint32)
    return bits.view(np.float32)


def code_thresholds() -> np.ndarray:
    """float32[255]: ``T[i]``, the largest float32 whose code (the rounding rule) is ``i``.

    Rounding is monotone, so between ``map[lo]`` and ``map[lo+1]`` the rule's
    ``x - map[lo]`` never decreases and ``map[lo+1] - x`` never increases as ``x``
    grows: the code is ``lo`` on a prefix of that range and ``lo + 1`` on the
    rest, and the code of every non-NaN float32 is the number of thresholds below
    it (``tests/test_quantization_thresholds.py`` checks every float near each
    threshold against :func:`quantize_blockwise`). Found by bisection over the
    floats between neighbouring map values, with the rule itself as the test.
    """
    idx = np.arange(255)
    lo = _ordered(_DYNAMIC_MAP[:-1])  # code(map[i]) == i
    hi = _ordered(_DYNAMIC_MAP[1:])  # code(map[i + 1]) == i + 1
    while np.any(hi - lo > 1):
        mid = lo + (hi - lo) // 2
        at_most = _nearest_code(np, _from_ordered(mid)) <= idx
        lo = np.where(at_most, mid, lo)
        hi = np.where(at_most, hi, mid)
    return _from_ordered(lo)


def code_table() -> np.ndarray:
    """float32[512] that the CUDA kernels read as their code book: the map, then the
    thresholds as a 1-based array (entry 256 + j is ``T[j - 1]``; entry 256 is -inf
    and is never read), for a branch-free binary search (``lars_common.cuh``)."""
    return np.concatenate(
        [_DYNAMIC_MAP, np.array([-np.inf], dtype=np.float32), code_thresholds()]
    ).astype(np.float32)


def dequantize_blockwise(codes: Any, absmax: Any) -> Any:
    """float32 values ``map[codes] * absmax[block]``, with the shape of ``codes``."""
    xp = _array_module(codes)
    n = codes.size
    if absmax.shape != (num_blocks(n),):
        raise ValueError(
            f"absmax has shape {tuple(absmax.shape)}, expected ({num_blocks(n)},) for {n} codes"
        )
    book = xp.asarray(_DYNAMIC_MAP)
    scale = xp.repeat(absmax.astype(xp.float32), BLOCK_SIZE)[:n]
    return (book[codes.ravel()] * scale).reshape(codes.shape)
