"""Which backend runs a step, and why.

Four backends implement one interface (:class:`Backend`):

==================  ==========================================================
``reference``       the NumPy reference (:mod:`cupylars.reference`), the
                    specification every other backend is tested against
``cpu``             the native CPU backend (:mod:`cupylars.cpu`): the CUDA
                    kernels' math compiled for the host, multi-threaded
``cuda``            the CUDA kernels on CuPy arrays (:mod:`cupylars.cuda`)
``emulated-cuda``   the CUDA kernels compiled for and run on the CPU, for tests
==================  ==========================================================

NumPy arrays take ``cpu`` by default, ``reference`` when asked for
(``backend="reference"`` or ``CUPYLARS_BACKEND=reference``) or when the
native library cannot be built (one warning says why and how to get the fast
path); CuPy arrays take ``cuda``. :func:`use` overrides the choice for NumPy
arrays inside a ``with`` block (``cupylars.testing`` uses it).
"""

from __future__ import annotations

import contextvars
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import reference
from .batch import refuse_device_lr
from .config import LarsConfig
from .state import LarsState

if TYPE_CHECKING:
    from .batch import PreparedBatch

__all__ = ["BACKEND_NAMES", "Backend", "ReferenceBackend", "select", "use"]

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda")
"""What ``backend=`` and ``CUPYLARS_BACKEND`` accept (``auto``: the default choice)."""


@runtime_checkable
class Backend(Protocol):
    """A way to run :func:`cupylars.functional.lars_update_many` on validated tensors.

    Attributes:
        name: ``'reference'``, ``'cpu'``, ``'cuda'`` or ``'emulated-cuda'``.
        reason: why this backend updates these arrays (what :func:`select` saw).
        takes_addresses: whether ``update_many`` accepts gradient addresses instead of
            arrays.
        reads_device_lr: whether ``update_many`` accepts ``lr_device`` (the CUDA backends).
    """

    name: str  # "reference", "cpu", "cuda" or "emulated-cuda"
    reason: str  # why this backend updates these arrays
    takes_addresses: bool  # update_many accepts gradient addresses instead of arrays
    reads_device_lr: bool  # update_many accepts lr_device

    def update_many(
        self,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        states: Sequence[LarsState],
        cfg: LarsConfig,
        batch: PreparedBatch,
        grad_addresses: Sequence[int] | None = None,
        lr_device: Any | None = None,
    ) -> None:
        """One step of a prepared batch (:mod:`cupylars.batch`: formats, live tensors, and
        the backend's tables and scratch); ``grad_addresses`` may stand in for ``grads``
        on backends that take addresses; ``lr_device`` (an array of one float32 or float64
        element on the device, read for lr when the kernels run) may stand in for
        ``cfg.lr`` on backends that read a device lr."""
        ...



class ReferenceBackend:
    """The NumPy reference: the specification, one tensor at a time.

    Attributes:
        name: ``'reference'``.
        reason: why it was chosen (asked for, or the native backend is unavailable).
        takes_addresses: False: it needs gradient arrays.
        reads_device_lr: False: lr comes from the config.
    """

    name = "reference"
    takes_addresses = False
    reads_device_lr = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<cupylars backend 'reference': {self.reason}>"

    def update_many(
        self,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        states: Sequence[LarsState],
        cfg: LarsConfig,
        batch: PreparedBatch,
        grad_addresses: Sequence[int] | None = None,
        lr_device: Any | None = None,
    ) -> None:
        """One step of the batch, tensor by tensor (see :meth:`Backend.update_many`)."""
        refuse_device_lr(self, lr_device)
        if grads is None:
            raise TypeError("the reference backend needs gradient arrays, not addresses")
        allocating = cfg.uses_momentum and not batch.has_momentum
        reference.update_many(params, grads, states, cfg, batch.formats)
        if allocating:  # the step gave states their momentum arrays (new versions)
            batch.renew(states)


_ASKED = ReferenceBackend(
    "asked for (backend='reference' or CUPYLARS_BACKEND=reference): the NumPy reference"
)
_FORCED: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("cupylars_backend", default=None)
_fallback: ReferenceBackend | None = None
_fallback_lock = threading.Lock()


@contextmanager
def use(backend: Backend) -> Iterator[Backend]:
    """Within this block, NumPy arrays are updated by ``backend`` (unless a call names one)."""
    token = _FORCED.set(backend)
    try:
        yield backend
    finally:
        _FORCED.reset(token)


def forced() -> Backend | None:
    """The backend :func:`use` set for this context, or None."""
    return _FORCED.get()


def _native_or_fallback() -> Backend:
    global _fallback
    from . import cpu, native

    try:
        return cpu.cpu_backend()
    except native.NativeUnavailableError as exc:
        with _fallback_lock:
            if _fallback is None:
                lines = str(exc).splitlines()
                why = next((line for line in lines if "error" in line), lines[0] if lines else "")
                _fallback = ReferenceBackend(
                    f"NumPy arrays: the native CPU backend is unavailable ({why}); the NumPy reference runs "
                    "instead"
                )
                warnings.warn(
                    f"cupylars: the native CPU backend is unavailable: {exc}\nThe NumPy reference runs "
                    "instead (several times slower). Install a C++ compiler with _Float16 support "
                    "(g++ >= 12) or point CUPYLARS_CXX at one; set CUPYLARS_BACKEND=reference to choose "
                    "the reference and silence this warning.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return _fallback


def _requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("CUPYLARS_BACKEND", "auto") or "auto"
    if name not in BACKEND_NAMES:
        source = "backend" if backend is not None else "CUPYLARS_BACKEND"
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def select(module: str, backend: str | None = None) -> Backend:
    """The backend for arrays of ``module`` ("numpy" or "cupy") and a ``backend`` argument."""
    if module != "cupy" and backend is None:
        chosen = _FORCED.get()  # a `use` block outranks the environment
        if chosen is not None:
            return chosen
    name = _requested(backend)
    if module == "cupy":
        if name not in ("auto", "cuda"):
            raise ValueError(f"backend={name!r} cannot update CuPy arrays (they take 'cuda')")
        from . import cuda

        return cuda.cupy_backend()
    if name == "cuda":
        raise ValueError("backend='cuda' updates CuPy arrays (or CUDA torch tensors); these are host arrays")
    if name == "reference":
        return _ASKED
    if name == "cpu":
        from . import cpu

        return cpu.cpu_backend()  # raises NativeUnavailableError, saying why
    return _native_or_fallback()
