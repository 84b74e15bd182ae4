"""Storage formats of parameters and gradients.

Parameters and gradients are stored as float32, float16 or bfloat16; the
arithmetic of a step is float32 throughout. NumPy and CuPy have no bfloat16
dtype, so bfloat16 data travels as ``uint16`` arrays holding the bit patterns
and the caller says so explicitly with ``dtype="bfloat16"``: a ``uint16``
array is never taken for bfloat16 by guessing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FORMATS", "format_code", "from_float32", "resolve_format", "to_float32"]

#: Supported storage formats, in the order of their kernel codes.
FORMATS = ("float32", "float16", "bfloat16")

_NATIVE = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


def format_code(fmt: str) -> int:
    """Index of ``fmt`` in :data:`FORMATS` (used in kernel names and tables)."""
    return FORMATS.index(fmt)


def resolve_format(array: Any, dtype: str | None = None, *, name: str = "param") -> str:
    """The storage format of ``array``, checked against an explicit ``dtype``.

    ``dtype=None`` reads the format from the array (float32 or float16);
    ``dtype="bfloat16"`` requires a ``uint16`` array of bfloat16 bit patterns.
    """
    if not (hasattr(array, "dtype") and hasattr(array, "shape")):
        raise TypeError(f"{name} is a {type(array).__name__}, expected a NumPy or CuPy array")
    array_dtype = np.dtype(array.dtype)
    if dtype is None:
        if array_dtype in _NATIVE:
            return _NATIVE[array_dtype]
        if array_dtype == np.uint16:
            raise TypeError(
                f"{name} is a uint16 array: pass dtype='bfloat16' if it holds bfloat16 bit patterns"
            )
        raise TypeError(
            f"{name} has unsupported dtype {array_dtype}: LARS updates float32, float16 "
            "or bfloat16 (as uint16 with dtype='bfloat16') tensors"
        )
    if dtype == "bfloat16" or getattr(dtype, "name", None) == "bfloat16":
        if array_dtype != np.uint16:
            raise TypeError(f"dtype='bfloat16' expects {name} as a uint16 array, got {array_dtype}")
        return "bfloat16"
    try:
        wanted = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}; expected one of {FORMATS}") from None
    if wanted not in _NATIVE:
        raise TypeError(f"unsupported dtype {dtype!r}; expected one of {FORMATS}")
    if wanted != array_dtype:
        raise TypeError(f"dtype={dtype!r} does not match {name}.dtype {array_dtype}")
    return _NATIVE[wanted]


def to_float32(xp: Any, array: Any, fmt: str) -> Any:
    """A new float32 array with the values of ``array`` (stored as ``fmt``)."""
    if fmt == "bfloat16":
        # bfloat16 is the upper half of a float32: widen the bits, no rounding.
        return (array.astype(xp.uint32) << 16).view(xp.float32)
    return array.astype(xp.float32, copy=True)


def from_float32(xp: Any, values: Any, fmt: str) -> Any:
    """``values`` (float32) rounded to nearest even into the storage dtype of ``fmt``."""
    if fmt == "float32":
        return values
    if fmt == "float16":
        return values.astype(xp.float16)  # IEEE conversion: round to nearest even
    bits = values.view(xp.uint32)
    # Round to nearest even on the 16 dropped bits: add 0x7FFF plus the lowest kept bit.
    rounded = (bits + xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))) >> 16
    # NaN must stay NaN (the carry could turn a NaN payload into Inf): keep a quiet NaN.
    rounded = xp.where(xp.isnan(values), (bits >> 16) | xp.uint32(0x0040), rounded)
    return rounded.astype(xp.uint16)
