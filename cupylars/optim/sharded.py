r"""The LARS step for sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them).

A sharded tensor is one layer split across ranks, and LARS needs that layer's
norms: :math:`\|p\|^2`, :math:`\|g\|^2` and :math:`\|u\|^2` are sums over all
its elements. Each rank computes the partial sums of its shard, the partial
sums are all-reduced over the mesh dimensions the tensor is sharded on, and
the step goes on with the global norms::

    local  ||p||^2, ||g||^2          -> all_reduce -> gamma, r   (helpers of cupylars.reference)
    local  d, m, u                   (elementwise, on the shard)
    local  ||u||^2                   -> all_reduce -> s          (cupylars.reference.unorm_scale)
    local  p <- p - lr s u

The scalar math is :mod:`cupylars.reference`'s own (``percentile_factor``,
``trust_ratio``, ``unorm_scale``); the elementwise work follows
``reference.apply_step`` operation for operation, in float32, on NumPy views
of CPU shards or CuPy views of CUDA shards. Two all-reduces per step and
process group cover every sharded tensor of the step. Every rank must step
the same tensors in the same order, as FSDP2 guarantees.

8-bit momentum is quantized in blocks of 256 elements of the rank's shard,
with one ``absmax1`` entry per block, itself a DTensor sharded over the same
mesh dimensions. Its layout says whether the blocks are the unsharded tensor's:

- ``(blocks,)``, the unsharded layout, when every sharded placement is
  ``Shard(0)`` and every rank's shard is the same whole number of blocks (FSDP2
  with a first dimension divisible by the ranks and rows making whole blocks).
  Gathered (``full_tensor``, or ``StateDictOptions(full_state_dict=True)``),
  codes and scales are exactly those of an unsharded optimizer, and a
  single-process optimizer loads them bit for bit.
- ``(shards, blocks per shard)`` otherwise (uneven shards, padding, blocks
  straddling shards, other shard dimensions). Gathered, the scales are in
  rank order and do not say which dimension was sharded, so the state loads
  only into a parameter sharded the same way; a single-process optimizer
  refuses it with an error instead of pairing codes with the wrong scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import quantization, reference
from ..config import LarsConfig, nonfinite_error
from ..formats import from_float32, to_float32
from . import bridge

__all__ = ["ShardedWork", "absmax_layout", "new_momentum_state", "sharded_step"]


@dataclass
class ShardedWork:
    param: DTensor
    grad: DTensor
    state: dict[str, Any]
    cfg: LarsConfig
    fmt: str
    label: str


def _reduction_groups(param: DTensor, label: str) -> tuple[Any, ...]:
    groups = []
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_partial():
            raise ValueError(f"{label} has a Partial placement; a parameter must be sharded or replicated")
        if placement.is_shard():
            groups.append(param.device_mesh.get_group(mesh_dim))
    return tuple(groups)


def _max_local_numel(param: DTensor) -> tuple[int, int]:
    """An upper bound of any rank's shard size, and the number of shards."""
    shape = list(param.shape)
    shards = 1
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            size = param.device_mesh.size(mesh_dim)
            shape[placement.dim] = -(-shape[placement.dim] // size)  # torch.chunk sizes: first is largest
            shards *= size
    return math.prod(shape), shards


def _blocks_are_unsharded(param: DTensor, shards: int, local_numel: int) -> bool:
    """Whether the shards' 256-element blocks are the unsharded tensor's blocks, in order."""
    if not all(p.is_replicate() or (type(p) is Shard and p.dim == 0) for p in param.placements):
        return False
    rows = param.shape[0] if param.dim() else 1
    return rows % shards == 0 and local_numel % quantization.BLOCK_SIZE == 0


def absmax_layout(param: DTensor) -> tuple[torch.Size, list[Any], int]:
    """Global shape and placements of a sharded 8-bit tensor's ``absmax1``, and blocks per rank.

    Every rank holds as many entries as the largest shard has blocks, so the
    DTensor is evenly sharded (checkpoint tools save it as one); see the module
    docstring for the two layouts.
    """
    numel, shards = _max_local_numel(param)
    blocks = quantization.num_blocks(numel)
    placements = [Shard(0) if p.is_shard() else Replicate() for p in param.placements]
    if _blocks_are_unsharded(param, shards, numel):
        return torch.Size([blocks * shards]), placements, blocks
    return torch.Size([shards, blocks]), placements, blocks


def new_momentum_state(param: DTensor, is_8bit: bool) -> dict[str, torch.Tensor]:
    """Momentum tensors of a sharded parameter, sharded like it."""
    if not is_8bit:
        return {"state1": torch.zeros_like(param, dtype=torch.float32)}
    codes = torch.full_like(param, quantization.ZERO_CODE, dtype=torch.uint8)
    shape, placements, blocks = absmax_layout(param)
    local_shape = (blocks,) if len(shape) == 1 else (1, blocks)
    local = torch.zeros(local_shape, dtype=torch.float32, device=bridge.local_tensor(param).device)
    absmax = DTensor.from_local(
        local,
        param.device_mesh,
        placements,
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )
    return {"state1": codes, "absmax1": absmax}


class _Arrays:
    """Arrays of one device's tensors: views, or host copies written back by :meth:`commit`."""

    def __init__(self, device: torch.device) -> None:
        self.backend = bridge.backend_for_device(device)
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.backend.array_module == "cupy":
            import cupy

            self.xp = cupy
        else:
            self.xp = np

    def __call__(self, tensor: torch.Tensor) -> Any:
        if self.backend.zero_copy:
            return self.backend.view(tensor)
        host, array = self.backend.stage(tensor)
        self._staged.append((tensor, host))
        return array

    def commit(self) -> None:
        for tensor, host in self._staged:
            self.backend.commit(tensor, host)


def _sq_norm(xp: Any, x: Any) -> float:
    # Same accumulation as the reference's norms: float64 sums of float32 values.
    x64 = x.astype(xp.float64)
    return float(xp.dot(x64, x64))


def _all_reduce(
    values: list[list[float]], groups: list[tuple[Any, ...]], devices: list[torch.device]
) -> None:
    """Sum each item's partial sums over its process groups, in place, one collective per group."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, item_groups in enumerate(groups):
        buckets.setdefault(tuple(id(g) for g in item_groups), []).append(i)
    for members in buckets.values():
        item_groups = groups[members[0]]
        if not item_groups:
            continue  # replicated on every mesh dimension: the local sums are the global ones
        flat = torch.tensor(
            [v for i in members for v in values[i]], dtype=torch.float64, device=devices[members[0]]
        )
        for group in item_groups:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        width = len(values[members[0]])
        reduced = flat.tolist()
        for j, i in enumerate(members):
            values[i] = reduced[j * width : (j + 1) * width]


def _collective_device(param: DTensor, local: torch.Tensor) -> torch.device:
    return torch.device("cpu") if param.device_mesh.device_type == "cpu" else local.device


@dataclass
class _Prepared:
    work: ShardedWork
    arrays: _Arrays
    param: Any
    p32: Any
    g32: Any
    groups: tuple[Any, ...]
    device: torch.device


def sharded_step(items: Sequence[ShardedWork]) -> None:
    """One LARS step of sharded parameters; a collective: every rank of their meshes calls it."""
    prepared: list[_Prepared] = []
    partial: list[list[float]] = []
    for w in items:
        grad = w.grad
        if grad.placements != w.param.placements:
            grad = grad.redistribute(w.param.device_mesh, w.param.placements)
        local = bridge.local_tensor(w.param)
        arrays = _Arrays(local.device)
        xp = arrays.xp
        p_arr = arrays(local)
        p32 = to_float32(xp, p_arr, w.fmt).reshape(-1)
        g32 = to_float32(xp, arrays(bridge.local_tensor(grad)), w.fmt).reshape(-1)
        prepared.append(
            _Prepared(
                w,
                arrays,
                p_arr,
                p32,
                g32,
                _reduction_groups(w.param, w.label),
                _collective_device(w.param, local),
            )
        )
        partial.append([_sq_norm(xp, p32), _sq_norm(xp, g32)])
    groups = [it.groups for it in prepared]
    devices = [it.device for it in prepared]
    _all_reduce(partial, groups, devices)

    # Non-finite gradients show as non-finite global sums (float64 sums of float32 squares
    # cannot overflow), so every rank takes the same decision.
    finite = [
        math.isfinite(g_sq) or it.work.cfg.nonfinite == "propagate"
        for it, (_, g_sq) in zip(prepared, partial)
    ]
    bad = [it.work.label for it, ok in zip(prepared, finite) if not ok and it.work.cfg.nonfinite == "raise"]
    if bad:
        raise nonfinite_error(bad)

    updates: list[Any] = []
    u_partial: list[list[float]] = []
    for it, (p_sq, g_sq), ok in zip(prepared, partial, finite):
        if not ok:
            updates.append(None)
            u_partial.append([0.0])
            continue
        u, m, t = _direction(it, math.sqrt(p_sq), math.sqrt(g_sq), g_sq)
        updates.append((u, m, t))
        clips = it.work.cfg.clips_update_norm
        u_partial.append([_sq_norm(it.arrays.xp, u) if clips else 0.0])
    _all_reduce(u_partial, groups, devices)

    for it, (p_sq, _), update, (u_sq,) in zip(prepared, partial, updates, u_partial):
        state = it.work.state
        if update is None:
            state["skipped"].add_(1)
            continue
        _apply(it, update, math.sqrt(p_sq), math.sqrt(u_sq))
        state["step"].add_(1)
        it.arrays.commit()


def _direction(it: _Prepared, p_norm: float, g_norm: float, g_sq: float) -> tuple[Any, Any, int]:
    """Steps 1-4 of the reference on the shard: the update direction u and the new momentum m."""
    w = it.work
    cfg, state = w.cfg, w.state
    t = int(state["step"].item()) + 1

    gamma = 1.0
    if cfg.clips_percentile:
        # The history holds global norms, identical on every rank; it is tiny, so it is
        # updated on the host.
        history = state["gnorm_vec"]
        host = history.detach().to("cpu", copy=history.device.type != "cpu")
        gamma = reference.percentile_factor(host.numpy(), t, g_sq, cfg.percentile_clipping)
        if host.data_ptr() != history.data_ptr():
            history.copy_(host)

    r = reference.trust_ratio(cfg, p_norm, g_norm, gamma) if cfg.uses_trust_ratio else 1.0
    m_old = _load_momentum(it) if cfg.uses_momentum and t > 1 else None
    u, m = reference.update_direction(cfg, t, it.g32, it.p32, m_old, gamma, r)
    return u, m, t


def _momentum_arrays(it: _Prepared) -> tuple[Any, Any]:
    state = it.work.state
    codes = it.arrays(bridge.local_tensor(state["state1"]))
    if "absmax1" not in state:
        return codes, None
    n = codes.size
    # (blocks,) or (1, blocks) per rank, depending on the layout: the same entries either way.
    absmax = it.arrays(bridge.local_tensor(state["absmax1"])).reshape(-1)
    if absmax.size < quantization.num_blocks(n):
        raise ValueError(
            f"{it.work.label}: absmax1 holds {absmax.size} blocks per rank, the shard needs "
            f"{quantization.num_blocks(n)}"
        )
    return codes, absmax[: quantization.num_blocks(n)]


def _load_momentum(it: _Prepared) -> Any:
    codes, absmax = _momentum_arrays(it)
    if absmax is None:
        return codes.reshape(-1)
    return quantization.dequantize_blockwise(codes, absmax).reshape(-1)


def _apply(it: _Prepared, update: tuple[Any, Any, int], p_norm: float, u_norm: float) -> None:
    """Steps 5-6: scale by s, write the shard and the momentum."""
    u, m, _ = update
    cfg, xp = it.work.cfg, it.arrays.xp
    s = reference.unorm_scale(cfg.max_unorm, p_norm, u_norm) if cfg.clips_update_norm else 1.0
    if it.p32.size:
        p_new = it.p32 - np.float32(cfg.lr * s) * u
        it.param[...] = from_float32(xp, p_new, it.work.fmt).reshape(it.param.shape)
    if m is not None and m.size:
        codes, absmax = _momentum_arrays(it)
        if absmax is None:
            codes[...] = m.reshape(codes.shape)
        else:
            new_codes, new_absmax = quantization.quantize_blockwise(m)
            codes[...] = new_codes.reshape(codes.shape)
            absmax[...] = new_absmax
