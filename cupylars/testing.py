"""Testing helpers: run the CUDA kernels on the CPU.

``with emulated_cuda(): F.lars_update(...)`` sends NumPy arrays through the CUDA
backend: the unmodified sources in rawkernels/ compiled with g++ through a shim
header (:mod:`cupylars._emulator`), launched by the same Python code that
launches them on a GPU. Everything but the hardware is exercised.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["active_emulation", "emulated_cuda"]

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("cupylars_emulation", default=None)


@contextmanager
def emulated_cuda() -> Iterator[Any]:
    """Within this block, NumPy arrays are updated by the CUDA kernels run on the CPU."""
    from . import cuda

    token = _ACTIVE.set(cuda.emulated_backend())
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active_emulation() -> Any:
    """The emulated CUDA backend when inside :func:`emulated_cuda`, else None."""
    return _ACTIVE.get()
