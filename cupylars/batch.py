"""A prepared batch: params and states validated once, bound to the backend that steps them.

:func:`prepare` checks a list of parameters against their states (formats,
shapes, array modules, writeable memory, no parameter twice, no overlapping
memory) and picks the backend. The :class:`PreparedBatch` it returns steps the
list any number of times (:meth:`PreparedBatch.update`), checking per step only
what can change between steps: the gradients, and that the parameters and
states are still those it was prepared for. It owns everything a backend
derives from them (the CUDA and CPU tables, the CUDA scratch), so two batches
share nothing and may be stepped from two threads at once.

A batch holds no reference to the arrays. It applies to parameters of the same
types, dtypes and shapes and to the same :class:`~cupylars.state.LarsState`
objects at the same versions (a state's version changes whenever one of its
attributes is assigned, so a replaced momentum array is seen); arrays changed
in place (reshaped, made read-only) are not seen: assign them instead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, is_
from typing import Any, cast

import numpy as np

from .backends import Backend, ReferenceBackend
from .config import LarsConfig
from .formats import resolve_format
from .plan import first_overlap, overlap_error
from .state import LarsState, array_module

__all__ = ["PreparedBatch", "module_of", "prepare", "validate_grads", "validate_members"]

_VERSION = attrgetter("_version")
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")


# -- validation --------------------------------------------------------------------------
def module_of(params: Sequence[Any]) -> str:
    """``"cupy"`` or ``"numpy"``: the array module of every parameter."""
    modules = {array_module(p).__name__ for p in params}
    if len(modules) > 1:
        raise TypeError(f"params mix array modules {sorted(modules)}; update each module separately")
    return "cupy" if modules == {"cupy"} else "numpy"


def _check_same_module(name: str, array: Any, xp: Any, index: int) -> None:
    if array_module(array) is not xp:
        raise TypeError(
            f"{name}[{index}] is a {type(array).__module__}.{type(array).__name__}, but params[{index}] "
            f"is a {xp.__name__} array: param, grad and state must live in the same array module"
        )


def _writeable(array: Any) -> bool:
    # CuPy arrays have no read-only flag (cupy.ndarray.flags has no `writeable`).
    return getattr(array.flags, "writeable", True)


def validate_members(params: Sequence[Any], states: Sequence[LarsState], dtype: str | None) -> list[str]:
    """Check every parameter against its state; return their storage formats."""
    if len(params) != len(states):
        raise ValueError(f"params and states differ in length: {len(params)}, {len(states)}")
    formats = []
    seen: set[int] = set()
    for i, (param, state) in enumerate(zip(params, states)):
        if not isinstance(state, LarsState):
            raise TypeError(f"states[{i}] is a {type(state).__name__}, expected a LarsState")
        fmt = resolve_format(param, dtype, name=f"params[{i}]")
        if tuple(state.shape) != tuple(param.shape):
            raise ValueError(
                f"states[{i}] was made for shape {state.shape}, params[{i}] has {tuple(param.shape)}"
            )
        if state.param_format != fmt:
            raise TypeError(f"states[{i}] was made for {state.param_format} params, params[{i}] is {fmt}")
        xp = array_module(param)
        for name, array in state.arrays().items():
            _check_same_module(f"states.{name}", array, xp, i)
        state.check()
        if not _writeable(param):
            raise ValueError(
                f"params[{i}] is read-only (a NumPy array without the write flag, or an immutable "
                "array such as JAX's): LARS updates parameters in place"
            )
        for name, array in state.arrays().items():
            if not _writeable(array):
                raise ValueError(f"states[{i}].{name} is read-only: the step writes it")
        if id(param) in seen:
            raise ValueError(f"params[{i}] appears twice in one update")
        seen.add(id(param))
        formats.append(fmt)
    return formats


def validate_grads(
    params: Sequence[Any], grads: Sequence[Any], formats: Sequence[str], dtype: str | None
) -> None:
    """Check every gradient against its (validated) parameter."""
    if len(grads) != len(params):
        raise ValueError(f"params and grads differ in length: {len(params)}, {len(grads)}")
    for i, (param, grad, fmt) in enumerate(zip(params, grads, formats)):
        grad_fmt = resolve_format(grad, dtype, name=f"grads[{i}]")
        if grad_fmt != fmt:
            raise TypeError(f"grads[{i}] is {grad_fmt} but params[{i}] is {fmt}")
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(
                f"grads[{i}] has shape {tuple(grad.shape)}, params[{i}] has {tuple(param.shape)}"
            )
        _check_same_module("grads", grad, array_module(param), i)


def _extent(array: Any) -> tuple[int, int]:
    """[first byte, last byte + 1) of an array's elements."""
    if array.size == 0:
        return (0, 0)
    interface = getattr(array, "__array_interface__", None) or array.__cuda_array_interface__
    start = end = int(interface["data"][0])
    for n, stride in zip(array.shape, array.strides):
        reach = (n - 1) * stride
        start, end = (start + reach, end) if reach < 0 else (start, end + reach)
    return (start, end + array.itemsize)


def check_no_overlap(params: Sequence[Any], live: Sequence[int]) -> None:
    """Two parameters of one call must not share memory: the update would race on it."""
    pair = first_overlap([_extent(params[i]) for i in live])
    if pair is None:
        return
    i, j = live[pair[0]], live[pair[1]]
    a, b = params[i], params[j]
    if array_module(a) is np and not (a.flags.c_contiguous and b.flags.c_contiguous):
        if not np.shares_memory(a, b):  # interleaved strided views share no element
            return
    raise overlap_error(i, j)


# -- the batch -----------------------------------------------------------------------------
@dataclass(eq=False)
class PreparedBatch:
    """Params and states validated together, and what their backend derived from them.

    Make it with :func:`prepare` (or let :func:`~cupylars.functional.lars_update_many`
    make and remember one); step it with :meth:`update`. The other fields are the
    backend's bookkeeping.

    Attributes:
        backend: the backend the batch is bound to (its ``reason`` says why).
    """

    backend: Backend
    dtype: str | None
    versions: list[int]
    param_types: list[type]
    dtypes: list[Any]
    shapes: list[tuple[int, ...]]
    formats: list[str]
    live: list[int]  # tensors with at least one element
    nbytes: list[int]  # bytes of each parameter
    has_momentum: bool  # every live state holds its momentum arrays
    grad_types: list[type] | None = None  # of the gradients last validated
    #: The backend's own: tables per (context, chunk, switches), scratch per context.
    tables: dict[tuple, Any] = field(default_factory=dict)
    scratch: dict[tuple, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Device arrays that a captured CUDA graph addresses: kept as long as the batch is, so
    #: that replacing tables or scratch in a later step never frees what a graph replays.
    graph_memory: list[Any] = field(default_factory=list)

    def pin(self, *arrays: Any) -> None:
        """Keep ``arrays`` (a captured launch's) for the batch's life; None is skipped."""
        held = self.graph_memory
        for a in arrays:
            if a is not None and not any(a is h for h in held):
                held.append(a)

    @property
    def captured(self) -> bool:
        """Whether a step of this batch was captured into a CUDA graph."""
        return bool(self.graph_memory)

    def __repr__(self) -> str:
        return f"<PreparedBatch of {len(self.versions)} tensors on {self.backend.name!r}>"

    @property
    def size(self) -> int:
        """Tensors in the batch."""
        return len(self.versions)

    def holds_for(self, params: Sequence[Any], states: Sequence[Any]) -> bool:
        """Whether these params and states are those the batch was prepared for."""
        n = len(self.versions)
        if len(params) != n or len(states) != n:
            return False
        # Versions are unique per LarsState, not across every object with a _version.
        if not all(map(is_, map(type, states), repeat(LarsState))):
            return False
        return (
            list(map(_VERSION, states)) == self.versions
            and list(map(type, params)) == self.param_types
            and list(map(_SHAPE, params)) == self.shapes
            and list(map(_DTYPE, params)) == self.dtypes
            and len(set(map(id, params))) == n
        )

    def check_grads(self, params: Sequence[Any], grads: Sequence[Any]) -> None:
        """Validate ``grads`` unless they look like the last gradients validated."""
        if (
            self.grad_types is not None
            and len(grads) == len(self.grad_types)
            and list(map(type, grads)) == self.grad_types
            and list(map(_SHAPE, grads)) == self.shapes
            and list(map(_DTYPE, grads)) == self.dtypes
        ):
            return
        validate_grads(params, grads, self.formats, self.dtype)
        self.grad_types = list(map(type, grads))

    def renew(self, states: Sequence[LarsState]) -> None:
        """After the backend gave states their (zeroed) momentum arrays: the states' new
        versions, and no tables of the old arrays."""
        self.versions = list(map(_VERSION, states))
        self.has_momentum = all(states[i].has_momentum for i in self.live)
        self.tables.clear()

    def update(
        self,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        states: Sequence[LarsState],
        config: LarsConfig,
        *,
        grad_addresses: Sequence[int] | None = None,
        lr_device: Any | None = None,
    ) -> None:
        """One LARS step of the batch.

        ``grad_addresses`` may stand in for ``grads`` (then None) on backends that
        take addresses (``backend.takes_addresses``): one address per parameter, of
        a contiguous gradient the caller checked against the parameter (dtype,
        shape, device), as the torch adapter does.

        ``lr_device`` (CUDA backends only): an array of one float32 or float64
        element on the device, read by the kernels for lr instead of ``config.lr``
        when they run, so that a captured CUDA graph uses its value at each replay.
        """
        if not self.holds_for(params, states):
            raise ValueError(
                "these params and states are not those the batch was prepared for (or a state was "
                "assigned since): prepare a new batch"
            )
        self.step(params, grads, states, config, grad_addresses, lr_device)

    def step(
        self,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        states: Sequence[LarsState],
        config: LarsConfig,
        grad_addresses: Sequence[int] | None = None,
        lr_device: Any | None = None,
    ) -> None:
        """:meth:`update` for a caller that checked :meth:`holds_for` itself."""
        takes_addresses = getattr(self.backend, "takes_addresses", False)
        if lr_device is not None and not takes_addresses:
            raise TypeError(
                f"the {self.backend.name} backend reads lr from the config; lr_device needs a CUDA backend"
            )
        if grads is not None:
            self.check_grads(params, grads)
        elif grad_addresses is None or not takes_addresses:
            raise TypeError(f"the {self.backend.name} backend needs gradient arrays")
        elif len(grad_addresses) != len(self.versions):
            raise ValueError(f"{len(grad_addresses)} gradient addresses for {len(self.versions)} params")
        if isinstance(self.backend, ReferenceBackend):
            check_no_overlap(params, self.live)  # the others check it when they build tables
        if lr_device is None:
            self.backend.update_many(params, grads, states, config, self, grad_addresses=grad_addresses)
        else:
            # Only the CUDA backend takes it (checked above); the Backend protocol has no such keyword.
            cast(Any, self.backend).update_many(
                params, grads, states, config, self, grad_addresses=grad_addresses, lr_device=lr_device
            )


def prepare(
    params: Sequence[Any], states: Sequence[LarsState], dtype: str | None, backend: Backend
) -> PreparedBatch:
    """Validate params against states (raising on bad input) and bind them to ``backend``."""
    formats = validate_members(params, states, dtype)
    live = [i for i, p in enumerate(params) if p.size > 0]
    check_no_overlap(params, live)
    return PreparedBatch(
        backend=backend,
        dtype=dtype,
        versions=list(map(_VERSION, states)),
        param_types=list(map(type, params)),
        dtypes=list(map(_DTYPE, params)),
        shapes=list(map(_SHAPE, params)),
        formats=formats,
        live=live,
        nbytes=[int(p.nbytes) for p in params],
        has_momentum=all(states[i].has_momentum for i in live),
    )
