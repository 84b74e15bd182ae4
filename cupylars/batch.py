"""A prepared batch: params and states validated once, bound to the backend that steps them.

:func:`prepare` checks a list of parameters against their states (formats,
shapes, array modules, writeable memory, no parameter or state twice, no
overlapping memory between parameters and state arrays, the states' counters and
scales) and picks the backend. The :class:`PreparedBatch` it returns steps the
list any number of times (:meth:`PreparedBatch.update`), checking per step only
what can change between steps: the gradients, that the parameters and states
are still those it was prepared for, and that NumPy parameters and state arrays
are still writeable. It owns everything a backend
derives from them (the CUDA and CPU tables, the CUDA scratch), so two batches
share nothing and may be stepped from two threads at once.

A batch holds no reference to the arrays. It applies to parameters of the same
types, dtypes and shapes and to the same :class:`~cupylars.state.LarsState`
objects at the same versions (a state's version changes whenever one of its
attributes is assigned, so a replaced momentum array is seen); arrays reshaped
in place are not seen: assign them instead.

The counters stay within :data:`~cupylars.state.MAX_COUNT`: a batch reads them
when it is prepared, and again (one read; a synchronisation on a GPU) only once
its own steps could have taken one of them to the bound, where a step that would
pass it raises before anything is written.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, pairwise, repeat
from operator import attrgetter, is_, is_not
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import LarsConfig
from .formats import resolve_format
from .state import MAX_COUNT, LarsState, array_module, check_values

if TYPE_CHECKING:
    from .backends import Backend
    from .cpu import CpuPlan, CpuPlanKey
    from .cuda import CudaPlan, CudaPlanKey, CudaScratch

__all__ = [
    "PreparedBatch",
    "check_no_overlap",
    "module_of",
    "prepare",
    "refuse_device_lr",
    "sharing_pairs",
    "validate_grads",
    "validate_members",
]

_VERSION = attrgetter("_version")
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_WRITEABLE = attrgetter("flags.writeable")
# The arrays of a state that a step writes (every one of them), in LarsState.arrays' order.
_STATE_ARRAYS_OF = attrgetter("step_count", "skip_count", "history", "momentum", "codes", "absmax")
_IS_ARRAY = partial(is_not, None)  # filters out the state arrays not allocated yet


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
    """Check every parameter against its state; return their storage formats.

    Reads the states' counters and scales (:func:`~cupylars.state.check_values`).
    """
    return _validate_members(params, states, dtype)[0]


def _validate_members(
    params: Sequence[Any], states: Sequence[LarsState], dtype: str | None
) -> tuple[list[str], np.ndarray]:
    """:func:`validate_members`, and the counters read: int64 (steps, skips) per state."""
    if len(params) != len(states):
        raise ValueError(f"params and states differ in length: {len(params)}, {len(states)}")
    formats = []
    seen: set[int] = set()
    seen_states: dict[int, int] = {}
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
        state.check_layout(f"states[{i}]")
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
        if id(state) in seen_states:
            raise ValueError(
                f"states[{i}] appears twice in one update (it is states[{seen_states[id(state)]}]): a state "
                "belongs to one parameter, or its counter would step twice and its momentum be shared"
            )
        seen_states[id(state)] = i
        formats.append(fmt)
    counters = check_values(states, [f"states[{i}]" for i in range(len(states))])
    return formats, counters


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


def _share_memory(a: Any, b: Any) -> bool:
    """Whether two arrays whose extents overlap share an element."""
    if array_module(a) is np and not (a.flags.c_contiguous and b.flags.c_contiguous):
        return bool(np.shares_memory(a, b))  # interleaved strided views share no element
    return True  # contiguous arrays fill their extents; CuPy: taken as shared


def first_overlap(extents: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """Indices of two entries of ``extents`` ([start, end) byte ranges) that overlap, or None."""
    nonempty = [e for e in range(len(extents)) if extents[e][1] > extents[e][0]]
    for a, b in pairwise(sorted(nonempty, key=extents.__getitem__)):
        if extents[b][0] < extents[a][1]:
            return (min(a, b), max(a, b))
    return None


def overlap_error(i: int, j: int) -> ValueError:
    return ValueError(
        f"params[{i}] and params[{j}] overlap in memory (views of one buffer): each parameter "
        "must own its memory, or the result would depend on the order of the updates"
    )


def check_no_overlap(params: Sequence[Any], live: Sequence[int]) -> None:
    """Two parameters of one call must not share memory: the update would race on it.

    The one check of every backend (the reference at every step, the others when they
    build tables for new parameter addresses): extents first, and where two overlap, whether
    they share an element (interleaved strided views do not)."""
    pair = first_overlap([_extent(params[i]) for i in live])
    if pair is None:
        return
    i, j = live[pair[0]], live[pair[1]]
    if _share_memory(params[i], params[j]):
        raise overlap_error(i, j)
    # A false alarm (interleaved strided views) may hide another pair: look at every pair.
    check_no_aliasing(params, [], live)


def sharing_pairs(arrays: Sequence[Any]) -> Iterator[tuple[int, int]]:
    """Pairs (a, b), a < b, of ``arrays`` that share memory, by increasing start address of b.

    A sweep over the extents sorted by start: each array meets only those whose extent
    is still open, so arrays that share nothing cost O(n log n).
    """
    extents = [_extent(a) for a in arrays]
    order = sorted((e for e in range(len(arrays)) if extents[e][1] > extents[e][0]), key=extents.__getitem__)
    open_: list[int] = []
    for b in order:
        start = extents[b][0]
        open_ = [a for a in open_ if extents[a][1] > start]
        for a in open_:
            if _share_memory(arrays[a], arrays[b]):
                yield (min(a, b), max(a, b))
        open_.append(b)


def check_no_aliasing(params: Sequence[Any], states: Sequence[LarsState], live: Sequence[int]) -> int | None:
    """Refuse memory shared between the live parameters and the arrays of their states
    (``states`` may be empty: parameters only): a step would write it twice.

    The histories are the exception: a history is read and written only with percentile
    clipping, so histories may share one array when clipping is off (the torch adapter
    shares one scratch history between the states that keep none). Returns the index of a
    state whose history is shared with another's (to refuse a clipping step), or None.
    """
    names: list[tuple[str, int]] = []
    arrays: list[Any] = []
    for i in live:
        names.append(("params", i))
        arrays.append(params[i])
        if states:
            for name, array in states[i].arrays().items():
                names.append((name, i))
                arrays.append(array)
    shared_history = None
    for a, b in sharing_pairs(arrays):
        (what_a, i), (what_b, j) = names[a], names[b]
        if what_a == what_b == "params":
            raise overlap_error(i, j)
        if what_a == what_b == "history":
            shared_history = max(i, j) if shared_history is None else shared_history
            continue
        first = f"params[{i}]" if what_a == "params" else f"states[{i}].{what_a}"
        second = f"params[{j}]" if what_b == "params" else f"states[{j}].{what_b}"
        raise ValueError(
            f"{first} and {second} share memory: a step writes both, so each parameter and each "
            "state array must own its memory"
        )
    return shared_history


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
    has_momentum: bool  # every live state holds its momentum arrays
    #: Steps this batch may take before a counter could pass MAX_COUNT (then read again).
    headroom: int = MAX_COUNT
    #: A state whose history is shared with another's (None: none): no clipping step.
    shared_history: int | None = None
    host_arrays: bool = False  # NumPy arrays, whose write flags are checked at every step
    grad_types: list[type] | None = None  # of the gradients last validated
    #: The backends' own: tables per (context, chunk, switches), CUDA scratch per context.
    cuda_plans: dict[CudaPlanKey, CudaPlan] = field(default_factory=dict)
    cuda_scratch: dict[tuple, CudaScratch] = field(default_factory=dict)
    cpu_plans: dict[CpuPlanKey, CpuPlan] = field(default_factory=dict)
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

    def give_momentum(self, states: Sequence[LarsState], xp: Any) -> list[int]:
        """Zeroed momentum arrays (in array module ``xp``) for the live states that have none,
        then :meth:`renew`; returns the indices of the states that got them."""
        allocated = [i for i in self.live if not states[i].has_momentum]
        for i in allocated:
            states[i].ensure_momentum(xp)
        self.renew(states)
        return allocated

    def renew(self, states: Sequence[LarsState]) -> None:
        """After the backend gave states their (zeroed) momentum arrays: the states' new
        versions, and no tables of the old arrays."""
        self.versions = list(map(_VERSION, states))
        self.has_momentum = all(states[i].has_momentum for i in self.live)
        self.cuda_plans.clear()
        self.cpu_plans.clear()

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
        takes_addresses = self.backend.takes_addresses
        if lr_device is not None and not self.backend.reads_device_lr:
            refuse_device_lr(self.backend, lr_device)  # before anything is read or written
        if grads is not None:
            self.check_grads(params, grads)
        elif grad_addresses is None or not takes_addresses:
            raise TypeError(f"the {self.backend.name} backend needs gradient arrays")
        elif len(grad_addresses) != len(self.versions):
            raise ValueError(f"{len(grad_addresses)} gradient addresses for {len(self.versions)} params")
        reference = self.backend.name == "reference"
        if self.host_arrays:
            # What a remembered validation cannot vouch for: NumPy arrays made read-only in
            # place (the native and emulated backends check the parameters themselves).
            check_writeable(params, states, self.live, params_too=reference)
        if reference:
            check_no_overlap(params, self.live)  # the others check it when they build tables
        if self.shared_history is not None and config.clips_percentile:
            raise ValueError(
                f"states[{self.shared_history}].history is shared with another state's: percentile "
                "clipping records each tensor's gradient norms in its own history"
            )
        if self.headroom <= 0:
            if not self._capturing():
                self.read_counters(states)
            if self.headroom <= 0:
                raise ValueError(
                    f"a counter of these states is at the maximum 2**53 (cupylars.state.MAX_COUNT): "
                    f"{self.names_at_bound(states)}; no step can follow, nothing was updated"
                )
        self.backend.update_many(
            params, grads, states, config, self, grad_addresses=grad_addresses, lr_device=lr_device
        )
        # Each step adds at most one to each counter (the step or the skip).
        self.headroom -= 1

    def read_counters(self, states: Sequence[LarsState]) -> np.ndarray:
        """Read (and check) the live states' counters; the headroom follows them. One
        transfer on a GPU."""
        counters = check_values([states[i] for i in self.live], [f"states[{i}]" for i in self.live])
        self.note_counters(counters)
        return counters

    def note_counters(self, counters: np.ndarray) -> None:
        """The headroom left by ``counters`` (int64 (steps, skips) of the live states)."""
        self.headroom = MAX_COUNT - (int(counters.max()) if counters.size else 0)

    def names_at_bound(self, states: Sequence[LarsState]) -> str:
        return ", ".join(
            f"states[{i}].{name}"
            for i in self.live
            for name in ("step_count", "skip_count")
            if int(getattr(states[i], name)) >= MAX_COUNT
        )

    def _capturing(self) -> bool:
        # A read would synchronise, which a CUDA graph capture refuses.
        runtime = getattr(self.backend, "runtime", None)
        return bool(runtime is not None and runtime.is_capturing())


def prepare(
    params: Sequence[Any], states: Sequence[LarsState], dtype: str | None, backend: Backend
) -> PreparedBatch:
    """Validate params against states (raising on bad input) and bind them to ``backend``."""
    formats, counters = _validate_members(params, states, dtype)
    live = [i for i, p in enumerate(params) if p.size > 0]
    shared_history = check_no_aliasing(params, states, live)
    batch = PreparedBatch(
        backend=backend,
        dtype=dtype,
        versions=list(map(_VERSION, states)),
        param_types=list(map(type, params)),
        dtypes=list(map(_DTYPE, params)),
        shapes=list(map(_SHAPE, params)),
        formats=formats,
        live=live,
        has_momentum=all(states[i].has_momentum for i in live),
        shared_history=shared_history,
        host_arrays=all(array_module(p) is np for p in params),
    )
    batch.note_counters(counters[live])
    return batch


def refuse_device_lr(backend: Backend, lr_device: Any | None) -> None:
    """The error of a backend that reads lr from the config and was given ``lr_device``."""
    if lr_device is not None:
        raise TypeError(
            f"the {backend.name} backend reads lr from the config; lr_device needs a CUDA backend"
        )


def check_writeable(
    params: Sequence[Any], states: Sequence[LarsState], live: Sequence[int], *, params_too: bool
) -> None:
    """Raise ValueError naming the first read-only array of the live NumPy states (and
    parameters, with ``params_too``); nothing is written."""
    arrays = chain.from_iterable(map(_STATE_ARRAYS_OF, map(states.__getitem__, live)))
    if all(map(_WRITEABLE, filter(_IS_ARRAY, arrays))) and (
        not params_too or all(map(_WRITEABLE, map(params.__getitem__, live)))
    ):
        return
    for i in live:
        if params_too and not params[i].flags.writeable:
            raise ValueError(f"params[{i}] is read-only: LARS updates parameters in place")
        for name, array in states[i].arrays().items():
            if not array.flags.writeable:
                raise ValueError(f"states[{i}].{name} is read-only: the step writes it")
