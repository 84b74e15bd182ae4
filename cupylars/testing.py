"""Testing helpers: choose the backend that updates NumPy arrays.

``with emulated_cuda(): F.lars_update(...)`` sends NumPy arrays through the CUDA
backend: the unmodified sources in rawkernels/ compiled with g++ through a shim
header (:mod:`cupylars._emulator`), launched by the same Python code that
launches them on a GPU. Everything but the hardware is exercised.
``native_cpu()`` and ``reference()`` choose the other two host backends.

``with emulated_capture() as graph: ...`` records the emulated launches instead of
running them, as a CUDA graph capture does, and refuses (``GraphCaptureError``)
every allocation, host copy, synchronisation and free inside; ``graph.replay()``
runs them again with their recorded addresses and scalars.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from . import backends
from .cuda_runtime import EmulatedGraph, GraphCaptureError, emulated_capture, emulated_stream

__all__ = [
    "EmulatedGraph",
    "GraphCaptureError",
    "active_emulation",
    "emulated_capture",
    "emulated_cuda",
    "emulated_stream",
    "native_cpu",
    "reference",
]


def emulated_cuda() -> AbstractContextManager[backends.Backend]:
    """Within this block, NumPy arrays are updated by the CUDA kernels run on the CPU."""
    from . import cuda

    return backends.use(cuda.emulated_backend())


def native_cpu() -> AbstractContextManager[backends.Backend]:
    """Within this block, NumPy arrays are updated by the native CPU backend (it must build)."""
    from . import cpu

    return backends.use(cpu.cpu_backend())


def reference() -> AbstractContextManager[backends.Backend]:
    """Within this block, NumPy arrays are updated by the NumPy reference."""
    return backends.use(backends.select("numpy", "reference"))


def active_emulation() -> backends.Backend | None:
    """The emulated CUDA backend when inside :func:`emulated_cuda`, else None."""
    chosen = backends.forced()
    return chosen if chosen is not None and chosen.name == "emulated-cuda" else None


