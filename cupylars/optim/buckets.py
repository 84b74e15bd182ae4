"""The tensors of a step that one update call takes, one kind per way of stepping them.

* :class:`ViewBucket`: zero-copy array views (NumPy views of CPU tensors, CuPy views of
  CUDA tensors) and the batches prepared for them, held for the plan's life; a step
  hands the kernels only the gradients (their addresses where the backend takes them).
* :class:`HostCopyBucket`: tensors of a device without kernels, staged on the host,
  updated there and committed back, with Ctrl-C held back in between.
* :class:`ShardedBucket`: DTensor shards (:mod:`cupylars.optim.sharded`).

Each has ``run(grads, ...)``; the step plan (:mod:`cupylars.optim.step_plan`) says when
they may run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import functional as F
from .._interrupts import interrupts_deferred
from ..batch import PreparedBatch
from ..config import LarsConfig
from ..cuda_runtime import GraphCaptureError
from ..state import LarsState
from . import bridge
from .capture import KeepAlive
from .groups import ConfigSlot

__all__ = ["HostCopyBucket", "ShardedBucket", "ViewBucket", "lars_state"]

_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


def lars_state(
    shape: torch.Size, fmt: str, optim_bits: int, arrays: dict[str, Any], history: Any
) -> LarsState:
    """A LarsState around arrays of a parameter's state tensors (keyed like the state)."""
    s1 = arrays.get("state1")
    is_8bit = s1.dtype == "uint8" if s1 is not None else optim_bits == 8
    return LarsState(
        shape=tuple(shape),
        param_format=fmt,
        is_8bit=bool(is_8bit),
        step_count=arrays["step"],
        skip_count=arrays["skipped"],
        history=arrays.get("gnorm_vec", history),
        momentum=None if is_8bit else s1,
        codes=s1 if is_8bit else None,
        absmax=arrays.get("absmax1"),
    )


def _parts(foreach: bool, *lists: list[Any]) -> list[tuple[list[Any], ...]]:
    """One batch of every tensor (foreach), or one per tensor."""
    if foreach:
        return [lists]
    return [tuple([x] for x in items) for items in zip(*lists)]


@dataclass(eq=False)
class ViewBucket:
    """Tensors of one device, storage declaration and configuration, stepped through views."""

    backend: bridge.DeviceBackend
    dtype: str | None  # the functional API's dtype argument
    slot: ConfigSlot
    arrays: list[Any]  # array views of the parameters (of their staging copy for strided ones)
    states: list[LarsState]
    staging: list[tuple[torch.Tensor, torch.Tensor]]  # (strided parameter, its contiguous copy)
    report_key: str = ""
    # The batches prepared at the first run (one, or one per tensor), owned here (not
    # remembered by lars_update_many) so that a captured CUDA graph can keep the batches
    # whose memory it addresses.
    batches: list[PreparedBatch] | None = None
    report: str = ""
    _parts: list[tuple[list[Any], ...]] = field(default_factory=list)
    _lr: tuple[torch.Tensor, int, Any] | None = None  # a device lr, its address and its view

    def run(self, grads: list[torch.Tensor], capturing: bool, keep: KeepAlive, owner: str) -> None:
        resolved = self.slot.resolved
        cfg = resolved.cfg
        if not all(map(_IS_CONTIGUOUS, grads)):
            if capturing:
                # .contiguous() would copy into memory allocated inside the capture, at another
                # address than the tables hold: name the cause rather than the table rebuild.
                raise GraphCaptureError(
                    f"{owner}: a non-contiguous gradient cannot be captured in a CUDA graph"
                )
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        backend = self.backend
        # Strided parameters are written back after the step: Ctrl-C is held back until then
        # (cupylars._interrupts), so that the bucket is either not stepped or stepped.
        with backend.context(), interrupts_deferred() if self.staging else nullcontext():
            for param, staging in self.staging:
                staging.copy_(param.detach())
            batches = self.batches
            if batches is None:
                batches = self._prepare(resolved.foreach)
            chosen = batches[0].backend
            lr_array = None
            if resolved.lr_tensor is not None:
                if chosen.reads_device_lr:
                    lr_array = self._lr_view(resolved.lr_tensor)  # read by the kernels when they run
                else:
                    cfg = replace(cfg, lr=resolved.lr_tensor.item())  # a host backend: lr on the CPU
            self._step(batches, chosen.takes_addresses, grads, cfg, lr_array)
            if capturing:
                # The gradients too: a backward inside the capture allocated them (after
                # zero_grad(set_to_none=True)) and the graph's lars_set_grads launches write
                # their addresses at every replay, so they must outlive any p.grad = None.
                keep.hold(*batches, resolved.lr_tensor, lr_array, *(s for _, s in self.staging), *grads)
            for param, staging in self.staging:
                param.detach().copy_(staging)

    def _prepare(self, foreach: bool) -> list[PreparedBatch]:
        self._parts = _parts(foreach, self.arrays, self.states)
        batches = [F.prepare(arrays, states, dtype=self.dtype) for arrays, states in self._parts]
        chosen = batches[0].backend
        self.report = f"{chosen.name}: {chosen.reason}; {self.backend.reason}"
        self.batches = batches
        return batches

    def _step(
        self,
        batches: list[PreparedBatch],
        takes_addresses: bool,
        grads: list[torch.Tensor],
        cfg: LarsConfig,
        lr_array: Any,
    ) -> None:
        # The plan vouches that the arrays and states are those the batches were prepared for.
        if takes_addresses:
            # The kernels need only the gradients' addresses: no array views of them.
            addresses = list(map(_DATA_PTR, grads))
            if len(batches) == 1:
                arrays, states = self._parts[0]
                batches[0].step(arrays, None, states, cfg, addresses, lr_array)
            else:
                for batch, (arrays, states), address in zip(batches, self._parts, addresses):
                    batch.step(arrays, None, states, cfg, [address], lr_array)
            return
        views = list(map(self.backend.view, grads))
        if len(batches) == 1:
            arrays, states = self._parts[0]
            batches[0].step(arrays, views, states, cfg)
        else:
            for batch, (arrays, states), view in zip(batches, self._parts, views):
                batch.step(arrays, [view], states, cfg)

    def _lr_view(self, lr: torch.Tensor) -> Any:
        """An array view of a capturable group's lr tensor, kept while its storage stays."""
        known = self._lr
        address = lr.data_ptr()
        if known is not None and known[0] is lr and known[1] == address:
            return known[2]
        view = self.backend.view(lr.detach())
        self._lr = (lr, address, view)
        return view


@dataclass(eq=False)
class HostCopyBucket:
    """Tensors of a device without kernels: copied to the host, updated, copied back."""

    backend: bridge.DeviceBackend
    dtype: str | None
    slot: ConfigSlot
    params: list[torch.Tensor]
    state_dicts: list[dict[str, Any]]
    formats: list[str]
    report_key: str = ""
    report: str = ""

    def run(self, grads: list[torch.Tensor], capturing: bool, keep: KeepAlive, owner: str) -> None:
        resolved = self.slot.resolved
        cfg = resolved.cfg
        if resolved.lr_tensor is not None:
            cfg = replace(cfg, lr=resolved.lr_tensor.item())  # updated on the host: lr on the host
        backend = self.backend
        # Ctrl-C is held back from the first copy to the last write-back (cupylars._interrupts):
        # the tensors are either not stepped or stepped, never half.
        with interrupts_deferred():
            params, host_grads, states, written = [], [], [], []
            for param, grad, state, fmt in zip(self.params, grads, self.state_dicts, self.formats):
                host_param, array = backend.stage(param)
                written.append((param, host_param))
                params.append(array)
                host_grads.append(backend.stage(grad)[1])
                host_state = {k: backend.stage(v) for k, v in state.items()}
                written.extend((state[k], host) for k, (host, _) in host_state.items())
                arrays = {k: a for k, (_, a) in host_state.items()}
                history = backend.scratch_history()
                states.append(lars_state(param.shape, fmt, resolved.optim_bits, arrays, history))
            chosen = None
            for part_params, part_grads, part_states in _parts(resolved.foreach, params, host_grads, states):
                batch = F.prepare(part_params, part_states, dtype=self.dtype)
                batch.step(part_params, part_grads, part_states, cfg)
                chosen = batch.backend
            for tensor, host in written:
                backend.commit(tensor, host)
        if chosen is not None:
            self.report = f"{chosen.name}: {chosen.reason}; {backend.describe()}"


@dataclass(eq=False)
class ShardedBucket:
    """DTensor parameters: reference math on the shards with all-reduced norms."""

    params: list[Any]  # DTensors
    slots: list[ConfigSlot]
    state_dicts: list[dict[str, Any]]
    formats: list[str]
    labels: list[str]
    report_key: str = "sharded"
    report: str = "reference math on shards with all-reduced norms"

    def run(self, grads: Sequence[Any], capturing: bool, keep: KeepAlive, owner: str) -> None:
        from . import sharded  # needs torch.distributed, which only DTensor users have

        sharded.sharded_step(
            [
                sharded.ShardedWork(p, g, state, slot.resolved.cfg, fmt, label)
                for p, g, state, slot, fmt, label in zip(
                    self.params, grads, self.state_dicts, self.slots, self.formats, self.labels
                )
            ]
        )
