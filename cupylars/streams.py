"""Which CUDA stream an update runs on.

The contract, for :mod:`cupylars.functional` and the torch adapter alike:

* torch CUDA tensors run on torch's current stream of their device, so the step is
  ordered with the backward pass that produced the gradients and the forward pass
  that reads the parameters, and it is captured by ``torch.cuda.graph``;
* CuPy arrays run on CuPy's current stream (``with cupy.cuda.Stream(): ...``);
* an explicit ``stream=`` overrides both: a CuPy stream, or any object that
  implements the CUDA stream protocol (``__cuda_stream__``, e.g. a ``torch.cuda.Stream``).

Nothing here synchronises. A foreign stream is wrapped, never owned: CuPy keeps the
wrapped object alive and never destroys its handle.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["as_cupy_stream", "on_stream", "torch_device_scope"]


def as_cupy_stream(cupy: Any, stream: Any) -> Any:
    """``stream`` as a CuPy stream object, without taking ownership of it.

    CuPy streams pass through. Objects with ``__cuda_stream__`` (torch streams) are
    wrapped: with ``Stream.from_external`` (CuPy 14, which keeps ``stream`` alive and
    never destroys its handle), else with ``ExternalStream`` (CuPy 13, which never
    destroys its handle either).
    """
    if isinstance(stream, cupy.cuda.stream._BaseStream):
        return stream
    if not hasattr(stream, "__cuda_stream__"):
        raise TypeError(
            f"stream must be a CuPy stream or implement the CUDA stream protocol "
            f"(__cuda_stream__, e.g. a torch.cuda.Stream), got {type(stream).__name__}"
        )
    wrap = getattr(cupy.cuda.Stream, "from_external", None)
    if wrap is not None:  # CuPy >= 14
        return wrap(stream)
    version, handle = stream.__cuda_stream__()
    if version != 0:
        raise TypeError(f"__cuda_stream__() returned protocol version {version}; only 0 is supported")
    device = getattr(getattr(stream, "device", None), "index", None)
    return cupy.cuda.ExternalStream(handle, -1 if device is None else device)


@contextlib.contextmanager
def on_stream(cupy: Any, stream: Any) -> Iterator[None]:
    """Make ``stream`` (see :func:`as_cupy_stream`) CuPy's current stream for the block."""
    with as_cupy_stream(cupy, stream):
        yield


@contextlib.contextmanager
def torch_device_scope(cupy: Any, device_index: int, stream: Any = None) -> Iterator[None]:
    """The scope in which CuPy works on torch's terms for CUDA device ``device_index``.

    The device is current for torch and CuPy (DLPack export of a torch tensor requires
    it), and CuPy's current stream is ``stream``, by default torch's current stream of
    that device. Inside, ``cupy.from_dlpack`` of a tensor of that device hands torch the
    stream it already uses, so the DLPack handshake records no cross-stream event (which
    would break a ``torch.cuda.graph`` capture).
    """
    torch = sys.modules["torch"]
    with torch.cuda.device(device_index), cupy.cuda.Device(device_index):
        if stream is None:
            stream = torch.cuda.current_stream(device_index)
        with as_cupy_stream(cupy, stream):
            yield
