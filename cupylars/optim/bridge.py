"""Torch tensors as NumPy or CuPy arrays, without copies, and which backend runs where.

Each device of an optimizer's parameters gets a :class:`DeviceBackend`:

* ``cpu``: NumPy views of the tensors (``tensor.numpy()``), updated in place by
  the native CPU backend (or whichever host backend :mod:`cupylars.backends`
  selects: the NumPy reference with ``CUPYLARS_BACKEND=reference``, the
  emulated kernels inside ``cupylars.testing.emulated_cuda()``).
* ``cuda``: CuPy views through DLPack (``cupy.from_dlpack``), updated by the
  CUDA kernels on torch's current stream of that device.
* anything else, or ``cuda`` without an importable CuPy: host copies updated on
  the host and copied back. Correct but slow, so it warns once and
  says why; :attr:`cupylars.optim.LARS.backends` records it too.

bfloat16 has no NumPy or CuPy dtype: bfloat16 tensors travel as ``uint16``
views of the same memory, and the update is told ``dtype='bfloat16'``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, cast

import torch

from ..state import HISTORY_SIZE, UNRECORDED
from ..streams import torch_device_scope

__all__ = [
    "DeviceBackend",
    "backend_for_device",
    "dtype_argument",
    "is_dtensor",
    "local_tensor",
    "storage_format",
]

_FORMATS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def storage_format(tensor: torch.Tensor, name: str = "parameter") -> str:
    """The cupylars storage format of a float32, float16 or bfloat16 tensor."""
    try:
        return _FORMATS[tensor.dtype]
    except KeyError:
        # float64 is refused rather than stepped in float32 (the step's arithmetic), which
        # would quietly void the float64 numerics it is usually chosen for.
        cast = " (cast it to float32, e.g. model.float(); see docs/torch.md, float64 parameters)"
        raise TypeError(
            f"{name} has dtype {tensor.dtype}: LARS updates float32, float16 and bfloat16 tensors"
            + (cast if tensor.dtype == torch.float64 else "")
        ) from None


def dtype_argument(fmt: str) -> str | None:
    """The ``dtype=`` argument of the functional API for arrays stored as ``fmt``."""
    return "bfloat16" if fmt == "bfloat16" else None


def is_dtensor(tensor: torch.Tensor) -> bool:
    # No DTensor exists before its module is imported: checking sys.modules keeps the
    # (slow) import of torch.distributed out of programs that never use it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor, or the tensor itself, detached."""
    if is_dtensor(tensor):
        return cast(Any, tensor).to_local().detach()  # a DTensor (checked without importing it)
    return tensor.detach()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    # Same memory, reinterpreted: the arrays see bfloat16 as its uint16 bit patterns.
    tensor = tensor.detach()
    return tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor


class DeviceBackend:
    """How the tensors of one device become arrays for :mod:`cupylars.functional`.

    ``zero_copy`` backends hand out views (:meth:`view`) that stay valid while
    the tensor's storage does, so callers may cache them; the host-copy backend
    hands out copies (:meth:`stage`) that :meth:`commit` writes back.
    """

    name = "reference"
    zero_copy = True
    array_module = "numpy"

    def __init__(self, device: torch.device, reason: str) -> None:
        self.device = device
        self.reason = reason

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around every update of this device's tensors."""
        return contextlib.nullcontext()

    def view(self, tensor: torch.Tensor) -> Any:
        return _bits(tensor).numpy()

    def scratch_history(self) -> Any:
        """A history array for states that keep none (never written without clipping)."""
        import numpy as np

        return np.full(HISTORY_SIZE, UNRECORDED, dtype=np.float32)

    def describe(self) -> str:
        return f"{self.name}: {self.reason}"

    def stage(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """A host copy of ``tensor`` and its array (host-copy backends only)."""
        raise NotImplementedError(f"the {self.name} backend hands out views (view), not host copies")

    def commit(self, tensor: torch.Tensor, host: torch.Tensor) -> None:
        """Write a staged host copy back (host-copy backends only)."""
        raise NotImplementedError(f"the {self.name} backend hands out views (view), not host copies")


class _CupyBackend(DeviceBackend):
    name = "cuda"
    array_module = "cupy"

    def __init__(self, device: torch.device, reason: str, cupy: Any) -> None:
        super().__init__(device, reason)
        self._cupy = cupy

    def context(self) -> contextlib.AbstractContextManager[Any]:
        # Kernels go on torch's current stream of the device, so they are ordered with the
        # backward pass that produced the gradients and the forward pass that reads the
        # parameters, with no synchronisation (cupylars/streams.py).
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch_device_scope(self._cupy, index)

    def view(self, tensor: torch.Tensor) -> Any:
        # Called inside context(): DLPack's stream handshake sees torch's own stream and
        # needs no event.
        return self._cupy.from_dlpack(_bits(tensor))

    def scratch_history(self) -> Any:
        with self.context():
            return self._cupy.full(HISTORY_SIZE, UNRECORDED, dtype=self._cupy.float32)


class _HostCopyBackend(DeviceBackend):
    name = "host copy"
    zero_copy = False

    def stage(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """A CPU copy of ``tensor`` and its NumPy view."""
        host = tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        return host, _bits(host).numpy()

    def commit(self, tensor: torch.Tensor, host: torch.Tensor) -> None:
        tensor.detach().copy_(host)


_lock = threading.Lock()
_cupy_import: tuple[Any, str | None] | None = None


def _import_cupy() -> tuple[Any, str | None]:
    """CuPy, or None and the reason it cannot be used (tried once per process)."""
    global _cupy_import
    with _lock:
        if _cupy_import is None:
            try:
                import cupy
            except Exception as exc:  # ImportError, or a broken CUDA install raising anything
                _cupy_import = (None, f"CuPy is not importable ({type(exc).__name__}: {exc})")
            else:
                _cupy_import = (cupy, None)
        return _cupy_import


def backend_for_device(device: torch.device) -> DeviceBackend:
    """The backend that updates tensors on ``device``."""
    if device.type == "cpu":
        return DeviceBackend(device, "NumPy views of CPU tensors (zero copy)")
    if device.type == "meta":
        raise RuntimeError("parameters on the meta device hold no data and cannot be optimized")
    if device.type == "cuda":
        cupy, why_not = _import_cupy()
        if cupy is not None:
            return _CupyBackend(device, "CuPy views through DLPack on torch's current stream", cupy)
        return _HostCopyBackend(
            device,
            f"{why_not}; {device} tensors are copied to the host, updated there and copied back "
            "(slow: install cupy-cuda12x or cupy-cuda13x)",
        )
    return _HostCopyBackend(
        device,
        f"cupylars has no kernels for device type {device.type!r}; {device} tensors are copied "
        "to the host, updated there and copied back (slow)",
    )
