"""The step plan: what an optimizer step checks, prepares and runs, and when it may run again.

:func:`build` reads the param groups once: it checks every gradient against its
parameter, resolves each tensor's configuration (:mod:`cupylars.optim.groups`),
refuses parameters that share memory, creates or imports the state, and groups
the tensors into buckets (:mod:`cupylars.optim.buckets`), one per group
configuration, device and storage declaration. :meth:`StepPlan.run` steps them.

:meth:`StepPlan.matches` is the adapter's one reuse rule: a later step reuses the
plan when the groups, their parameters (identity, storage, dtype, shape, strides),
which of them have a gradient and the gradients' dtype, shape, device and layout,
the state tensors (identity and storage), the overrides, the configuration's
switches and the backend a ``cupylars.backends.use`` block forces are all as the
plan found them. Everything else (lr and the other values) is read from the groups
at every step.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .. import backends
from .._warnings import warn_caller
from ..batch import sharing_pairs
from ..config import nonfinite_error
from ..quantization import ZERO_CODE, num_blocks
from ..state import HISTORY_SIZE, UNRECORDED
from . import bridge, checkpoint
from .buckets import HostCopyBucket, ShardedBucket, ViewBucket, lars_state
from .capture import KeepAlive
from .groups import ConfigSlot, Resolved, override_key, resolve
from .manager import GlobalOptimManager

__all__ = ["StepPlan", "StepResources", "build"]

Bucket = ViewBucket | HostCopyBucket

_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")
# What a gradient must share with its parameter (dtype, shape, device) and the dense layout.
_GRAD_LOOKS = attrgetter("dtype", "shape", "device", "layout")
_DATA_PTR = torch.Tensor.data_ptr
_STRIDE = torch.Tensor.stride


class StepResources:
    """What outlives step plans: each device's backend (and its warning, once), the scratch
    histories, and what captured graphs address."""

    def __init__(self, keepalive: list[Any]) -> None:
        self.device_backends: dict[torch.device, bridge.DeviceBackend] = {}
        self.warned: set[str] = set()
        self.scratch: dict[tuple[str, torch.device], Any] = {}
        self.keep = KeepAlive(keepalive)

    def backend(self, device: torch.device) -> bridge.DeviceBackend:
        backend = self.device_backends.get(device)
        if backend is None:
            backend = self.device_backends[device] = bridge.backend_for_device(device)
            if not backend.zero_copy and backend.reason not in self.warned:
                self.warned.add(backend.reason)
                warn_caller(f"cupylars.optim: {backend.reason}", RuntimeWarning)
        return backend

    def scratch_history(self, backend: bridge.DeviceBackend) -> Any:
        # States without percentile clipping keep no history tensor; the update never writes
        # the history then, so one array per device serves them all.
        key = (backend.array_module, backend.device)
        if key not in self.scratch:
            self.scratch[key] = backend.scratch_history()
        return self.scratch[key]


@dataclass(eq=False)
class _Tensor:
    """One parameter of a step, as the plan's build found it."""

    param: torch.Tensor
    grad: torch.Tensor
    slot: ConfigSlot
    resolved: Resolved  # this tensor's own (its slot's, first label's, may differ only by label)
    fmt: str
    label: str
    sharded: bool
    position: int  # among its group's parameters with a gradient


@dataclass(eq=False)
class _GroupRecord:
    """What a step of one param group depends on, as the plan's build found it."""

    index: int
    group: dict[str, Any]
    params: list[torch.Tensor]  # group["params"], all of them
    present: list[bool]  # which had a gradient
    with_grad: list[torch.Tensor]
    grad_index: list[int]  # their positions in group["params"]
    overrides: list[dict[str, Any] | None]
    grads: list[torch.Tensor]  # this step's
    ptrs: list[int] | None = None
    grad_looks: list[tuple[Any, ...]] | None = None  # what each gradient must look like
    dtypes: list[torch.dtype] | None = None
    shapes: list[torch.Size] | None = None
    strides: list[tuple[int, ...]] | None = None
    state_dicts: list[dict[str, Any]] | None = None
    state_keys: list[str] | None = None
    state_values: list[torch.Tensor] | None = None
    state_ptrs: list[int] | None = None

    def snapshot(self, state: dict[Any, dict[str, Any]]) -> bool:
        """Record the parameters' storages and their state tensors; False where they cannot
        be compared at a later step (a DTensor, a value that is not a tensor)."""
        params = self.with_grad
        dicts = [state[p] for p in params]
        values = list(chain.from_iterable(d.values() for d in dicts))
        if not all(isinstance(v, torch.Tensor) and not bridge.is_dtensor(v) for v in values):
            return False
        if any(map(bridge.is_dtensor, params)):
            return False
        self.ptrs = list(map(_DATA_PTR, params))
        self.dtypes = list(map(_DTYPE, params))
        self.shapes = list(map(_SHAPE, params))
        self.strides = list(map(_STRIDE, params))
        self.grad_looks = [(p.dtype, p.shape, p.device, torch.strided) for p in params]
        self.state_dicts = dicts
        self.state_keys = list(chain.from_iterable(dicts))
        self.state_values = values
        self.state_ptrs = list(map(_DATA_PTR, values))
        return True

    def matches(
        self, state: dict[Any, dict[str, Any]], manager: GlobalOptimManager | None, dtensor_module: Any
    ) -> bool:
        """Whether this step of the group is one the plan holds for; records its gradients."""
        params = self.group["params"]
        if len(params) != len(self.params) or not all(map(is_, params, self.params)):
            return False
        grads = list(map(_GRAD, params))
        if list(map(is_not, grads, repeat(None))) != self.present:
            return False
        if not self.with_grad:
            return True
        grads = list(compress(grads, self.present))
        params = self.with_grad
        if (
            list(map(_DATA_PTR, params)) != self.ptrs
            or list(map(_DTYPE, params)) != self.dtypes
            or list(map(_SHAPE, params)) != self.shapes
            or list(map(_STRIDE, params)) != self.strides
        ):
            return False  # a parameter's storage was replaced (p.data = ...)
        if list(map(_GRAD_LOOKS, grads)) != self.grad_looks:
            return False
        if dtensor_module is not None and any(map(isinstance, grads, repeat(dtensor_module.DTensor))):
            return False
        known = self.state_dicts
        assert known is not None
        if not all(map(is_, map(state.get, params), known)):
            return False
        if list(chain.from_iterable(known)) != self.state_keys:
            return False
        values = list(chain.from_iterable(map(dict.values, known)))
        known_values: list[torch.Tensor] = self.state_values  # type: ignore[assignment]  # snapshot taken
        if not (all(map(is_, values, known_values)) and list(map(_DATA_PTR, values)) == self.state_ptrs):
            return False
        if manager is not None:
            gi = self.index
            current = [manager.config_for(gi, pi, p) for pi, p in zip(self.grad_index, params)]
            if current != self.overrides:
                return False
        self.grads = grads
        return True


class StepPlan:
    """One step's work, built once and run while :meth:`matches` holds."""

    def __init__(
        self,
        records: list[_GroupRecord],
        slots: list[ConfigSlot],
        buckets: list[tuple[Bucket, _GroupRecord, list[int] | None]],
        sharded: tuple[ShardedBucket, list[tuple[_GroupRecord, int]]] | None,
        raise_checks: list[tuple[_GroupRecord, int, str, ConfigSlot]],
        stepped: list[torch.Tensor],
        reusable: bool,
        uses_overrides: bool,
    ) -> None:
        self.records = records
        self.slots = slots
        self.buckets = buckets
        self.sharded = sharded
        self.raise_checks = raise_checks
        self.stepped = stepped  # the parameters a step writes (for autograd's version counters)
        self.reusable = reusable
        self.uses_overrides = uses_overrides
        self.forced = backends.forced()
        self.eager_runs = 0  # runs outside a CUDA graph capture

    @property
    def warm(self) -> bool:
        """Whether an eager step reused the plan: what a capture may then record is prepared
        (the first step creates the state; the second is the one a graph repeats)."""
        return self.eager_runs >= 2

    def matches(self, param_groups: Sequence[dict[str, Any]], state: dict[Any, dict[str, Any]]) -> bool:
        """The adapter's reuse rule (see the module's docstring); gathers this step's gradients
        and configuration on the way."""
        if not self.reusable or len(param_groups) != len(self.records):
            return False
        if backends.forced() is not self.forced:
            return False  # another backend updates the arrays: new batches
        manager = GlobalOptimManager.get_instance()
        looks = manager if (manager.uses_config_override or self.uses_overrides) else None
        dtensor_module = sys.modules.get("torch.distributed.tensor")
        for group, record in zip(param_groups, self.records):
            if group is not record.group or not record.matches(state, looks, dtensor_module):
                return False
        return all(slot.refresh() for slot in self.slots)

    def run(self, report: dict[str, str], keep: KeepAlive, capturing: bool, owner: str) -> None:
        """Step every bucket; a "raise" gradient that is not finite stops it before any."""
        if self.raise_checks and any(slot.resolved.cfg.nonfinite == "raise" for slot in self.slots):
            # A step makes one update call per bucket: every "raise" tensor is checked up
            # front, before any call updates.
            bad = [
                label
                for record, k, label, slot in self.raise_checks
                if slot.resolved.cfg.nonfinite == "raise" and not bool(torch.isfinite(record.grads[k]).all())
            ]
            if bad:
                raise nonfinite_error(bad)
        if self.sharded is not None:
            # Runs before the dense buckets so that its "raise" leaves every tensor untouched.
            bucket, where = self.sharded
            bucket.run([record.grads[k] for record, k in where], capturing, keep, owner)
            report[bucket.report_key] = bucket.report
        for dense, record, positions in self.buckets:
            grads = record.grads if positions is None else [record.grads[k] for k in positions]
            dense.run(grads, capturing, keep, owner)
            report[dense.report_key] = dense.report
        # The arrays wrote the parameters behind autograd's back: tell it, so a backward
        # through a graph that saved the old values fails loudly instead of silently.
        torch.autograd.graph.increment_version(self.stepped)
        if not capturing:
            self.eager_runs += 1


# -- building a plan ---------------------------------------------------------------------


def _check_grad(owner: str, label: str, p: torch.Tensor, grad: torch.Tensor) -> tuple[str, bool]:
    """A gradient's checks against its parameter; the storage format, and whether sharded."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(
            f"{owner} does not support sparse gradients: {label} has a "
            f"{grad.layout} gradient (use sparse=False in the embedding, or a sparse optimizer)"
        )
    fmt = bridge.storage_format(p, label)
    if grad.dtype != p.dtype:
        raise TypeError(f"{label} is {p.dtype} but its gradient is {grad.dtype}")
    if grad.shape != p.shape:
        raise ValueError(f"{label} has shape {tuple(p.shape)}, its gradient {tuple(grad.shape)}")
    if grad.device != p.device:
        raise ValueError(f"{label} is on {p.device}, its gradient on {grad.device}")
    is_sharded = bridge.is_dtensor(p)
    if is_sharded != bridge.is_dtensor(grad):
        raise TypeError(f"{label}: the parameter and its gradient must both be DTensors or neither")
    return fmt, is_sharded


def _address_view(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy array at ``tensor``'s address, of its shape and byte strides, whose elements
    are opaque bytes: what cupylars.batch's overlap check compares. Its memory is never
    read (on a GPU it is device memory), only its addresses."""
    itemsize = tensor.element_size()
    interface = {
        "version": 3,
        "data": (tensor.data_ptr(), False),
        "shape": tuple(tensor.shape),
        "strides": tuple(s * itemsize for s in tensor.stride()),
        "typestr": f"|V{itemsize}",
    }
    return np.asarray(SimpleNamespace(__array_interface__=interface))


def check_disjoint(owner: str, param_groups: Sequence[dict[str, Any]]) -> None:
    """Refuse parameters that share memory, across every param group: each is updated
    on its own, so a shared element would be stepped twice (or raced on)."""
    labels: list[str] = []
    tensors: list[torch.Tensor] = []
    for gi, group in enumerate(param_groups):
        names = group.get("param_names")
        for pi, p in enumerate(group["params"]):
            if bridge.local_tensor(p).device.type == "meta":
                continue  # no memory
            tensors.append(p)
            name = f"parameter {names[pi]!r}" if names else f"parameter {pi}"
            labels.append(f"{name} of param group {gi}")
    views = [_address_view(bridge.local_tensor(p)) for p in tensors]
    for a, b in sharing_pairs(views):
        what = "is the same tensor as" if tensors[a] is tensors[b] else "overlaps in memory with"
        raise ValueError(
            f"{owner}: {labels[b]} {what} {labels[a]}: each parameter must own its "
            "memory, or a step would update the shared elements twice"
        )


def prepare_state(state_map: dict[Any, dict[str, Any]], t: _Tensor) -> dict[str, Any]:
    """Create, translate or move ``t``'s state so that the update can take views of it."""
    p = t.param
    resolved = t.resolved
    state = state_map[p]
    is_8bit = resolved.eight_bit(p.numel())
    if state and not checkpoint.is_canonical(state):
        # Written directly (ZeroRedundancyOptimizer.load_state_dict does) in a foreign layout.
        state = checkpoint.import_param_state(p, state, label=t.label, eight_bit=is_8bit)
        state_map[p] = state
    device = bridge.local_tensor(p).device
    for key, value in state.items():
        # Zero-dim counters may have been moved to the CPU (ZeroRedundancyOptimizer does),
        # or the model moved after the state was created.
        if isinstance(value, torch.Tensor) and not bridge.is_dtensor(value) and value.device != device:
            state[key] = value.to(device)
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.int64, device=device)
        state["skipped"] = torch.zeros((), dtype=torch.int64, device=device)
    if resolved.cfg.uses_momentum and "state1" not in state:
        if t.sharded:
            from . import sharded

            state.update(sharded.new_momentum_state(p, is_8bit))  # type: ignore[arg-type]  # a DTensor
        elif is_8bit:
            state["state1"] = torch.full(p.shape, ZERO_CODE, dtype=torch.uint8, device=device)
            state["absmax1"] = torch.zeros(num_blocks(p.numel()), dtype=torch.float32, device=device)
        else:
            state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=device)
    if resolved.cfg.clips_percentile and "gnorm_vec" not in state:
        state["gnorm_vec"] = torch.full((HISTORY_SIZE,), UNRECORDED, dtype=torch.float32, device=device)
    return state


def _collect(
    owner: str, param_groups: Sequence[dict[str, Any]], manager: GlobalOptimManager
) -> tuple[list[_GroupRecord], list[ConfigSlot], list[_Tensor]]:
    records: list[_GroupRecord] = []
    slots: dict[tuple, ConfigSlot] = {}
    tensors: list[_Tensor] = []
    for gi, group in enumerate(param_groups):
        names = group.get("param_names")
        params = list(group["params"])
        grads = list(map(_GRAD, params))  # read once: a hook may set one meanwhile
        record = _GroupRecord(gi, group, params, [g is not None for g in grads], [], [], [], [])
        records.append(record)
        for pi, (p, grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            label = f"parameter {names[pi]!r}" if names else f"parameter {pi} of param group {gi}"
            fmt, is_sharded = _check_grad(owner, label, p, grad)
            override = manager.config_for(gi, pi, p)
            key = (gi, override_key(override))
            if override is None:
                slot = slots.get(key)
                if slot is None:
                    group_label = f"param group {gi}"
                    resolved = resolve(group, None, group_label)
                    slot = slots[key] = ConfigSlot(group, None, group_label, resolved)
                resolved = slot.resolved
            else:
                where = f"{label} (with GlobalOptimManager overrides)"
                resolved = resolve(group, override, where)
                slot = slots.get(key)
                if slot is None:
                    slot = slots[key] = ConfigSlot(group, override, where, resolved)
            tensors.append(_Tensor(p, grad, slot, resolved, fmt, label, is_sharded, len(record.with_grad)))
            record.with_grad.append(p)
            record.grad_index.append(pi)
            record.overrides.append(override)
            record.grads.append(grad)
    return records, list(slots.values()), tensors


def build(
    owner: str,
    param_groups: Sequence[dict[str, Any]],
    state: dict[Any, dict[str, Any]],
    resources: StepResources,
) -> StepPlan | None:
    """Check this step's inputs, create the state and group the tensors; None when no
    parameter has a gradient. Raises on bad input before any tensor is written."""
    manager = GlobalOptimManager.get_instance()
    records, slots, tensors = _collect(owner, param_groups, manager)
    if not tensors:
        return None
    check_disjoint(owner, param_groups)  # before any state is created
    states = [prepare_state(state, t) for t in tensors]
    sharded_items: list[tuple[_Tensor, dict[str, Any]]] = []
    keyed: dict[tuple, list[tuple[_Tensor, dict[str, Any]]]] = {}
    records_of_tensor: dict[int, _GroupRecord] = {}
    for record in records:
        for p in record.with_grad:
            records_of_tensor[id(p)] = record
    for t, s in zip(tensors, states):
        if t.sharded:
            sharded_items.append((t, s))
        else:
            key = (id(t.slot), t.param.device, bridge.dtype_argument(t.fmt))
            keyed.setdefault(key, []).append((t, s))
    buckets: list[tuple[Bucket, _GroupRecord, list[int] | None]] = []
    for (_, device, dtype), items in keyed.items():
        record = records_of_tensor[id(items[0][0].param)]
        positions: list[int] | None = [t.position for t, _ in items]
        if positions == list(range(len(record.with_grad))):
            positions = None  # the whole group: its gradients as they are
        backend = resources.backend(device)
        slot = items[0][0].slot
        bucket: Bucket
        if backend.zero_copy:
            bucket = _view_bucket(backend, dtype, slot, items, resources)
        else:
            params, dicts = [t.param for t, _ in items], [s for _, s in items]
            bucket = HostCopyBucket(backend, dtype, slot, params, dicts, [t.fmt for t, _ in items])
        bucket.report_key = str(device)
        buckets.append((bucket, record, positions))
    sharded_work = None
    if sharded_items:
        sharded_work = (
            ShardedBucket(
                [t.param for t, _ in sharded_items],
                [t.slot for t, _ in sharded_items],
                [s for _, s in sharded_items],
                [t.fmt for t, _ in sharded_items],
                [t.label for t, _ in sharded_items],
            ),
            [(records_of_tensor[id(t.param)], t.position) for t, _ in sharded_items],
        )
    raise_checks = [
        (records_of_tensor[id(t.param)], t.position, t.label, t.slot) for t in tensors if not t.sharded
    ]
    reusable = not sharded_items and all(r.snapshot(state) for r in records)
    return StepPlan(
        records,
        slots,
        buckets,
        sharded_work,
        raise_checks,
        [bridge.local_tensor(t.param) for t in tensors],
        reusable,
        uses_overrides=any(o is not None for r in records for o in r.overrides),
    )


def _view_bucket(
    backend: bridge.DeviceBackend,
    dtype: str | None,
    slot: ConfigSlot,
    items: list[tuple[_Tensor, dict[str, Any]]],
    resources: StepResources,
) -> ViewBucket:
    arrays, states, staging = [], [], []
    with backend.context():
        history = resources.scratch_history(backend)
        for t, state in items:
            p = t.param.detach()
            if p.is_contiguous():
                array = backend.view(p)
            else:
                # The CUDA kernels address dense memory: a strided parameter (channels_last,
                # a slice) is updated in a contiguous copy and copied back.
                copy = torch.empty_like(p, memory_format=torch.contiguous_format)
                staging.append((t.param, copy))
                array = backend.view(copy)
            views = {k: backend.view(v) for k, v in state.items()}
            arrays.append(array)
            states.append(lars_state(p.shape, t.fmt, t.resolved.optim_bits, views, history))
    return ViewBucket(backend, dtype, slot, arrays, states, staging)
