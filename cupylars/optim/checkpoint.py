"""Reading optimizer checkpoints: ours, bitsandbytes' and torch.optim.SGD's.

The state of one parameter, as ``LARS.state_dict()`` saves it:

=============  ==============================  ==========================================
key            tensor                          meaning
=============  ==============================  ==========================================
``step``       int64, ()                       applied steps
``skipped``    int64, ()                       steps skipped for a non-finite gradient
``state1``     float32 or uint8, param shape   momentum (32-bit), or its 8-bit codes
``absmax1``    float32, (ceil(n/256),)         8-bit only: one scale per 256 codes
``gnorm_vec``  float32, (100,)                 percentile clipping only: squared
                                               gradient norms, -1 = never recorded
=============  ==============================  ==========================================

bitsandbytes' LARS, LARS32bit and LARS8bit save ``state1`` (float32 momentum
or uint8 codes with the same signed dynamic map), ``absmax1`` (blocks of 256
since bitsandbytes 0.44, of 2048 before), ``max1``/``new_max1`` (releases with
one absmax per tensor), ``qmap1`` (the code book), ``step`` (a Python int),
``unorm_vec`` (scratch) and ``gnorm_vec`` (zeros where never recorded).
bitsandbytes 0.50.2's ``state_dict()`` moves every tensor but ``step``
into a nested dict under ``__bnb_optimizer_quant_state__`` (so that FSDP's
gathering skips them); both the nested and the flat form are read.
torch.optim.SGD saves ``momentum_buffer``. All of them are translated here;
8-bit states whose blocks or code book differ from ours are re-quantized,
with a warning.

Loading refuses (``ValueError``, naming the parameter and key) floating state
that holds NaN or Inf: one such entry of the momentum, or one absmax, makes
every later step of that tensor NaN, and skipping non-finite gradients cannot
repair it. It also refuses negative or above-float32 scales (``absmax1``) and
counters outside ``0 .. 2**53`` (:data:`cupylars.state.MAX_COUNT`).
Float32 momentum loaded for a tensor that the optimizer keeps in 8 bits is
quantized on load, with a warning (it is lossy), so the optimizer holds the
memory it was configured for.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .. import quantization
from .._warnings import warn_caller
from ..state import HISTORY_SIZE, MAX_ABSMAX, MAX_COUNT, UNRECORDED
from . import bridge

__all__ = ["BNB_WRAPPED_KEY", "CANONICAL_KEYS", "import_param_group", "import_param_state", "is_canonical"]

#: The keys of a parameter's state as this package keeps it.
CANONICAL_KEYS = frozenset({"step", "skipped", "state1", "absmax1", "gnorm_vec"})
# Keys of foreign checkpoints that are read (and translated) or dropped.
_FOREIGN_KEYS = frozenset({"qmap1", "max1", "new_max1", "unorm_vec", "momentum_buffer"})
#: bitsandbytes' key of the nested dict holding its state tensors (``Optimizer8bit.state_dict``).
BNB_WRAPPED_KEY = "__bnb_optimizer_quant_state__"
# Floating state whose values enter the step: a NaN or Inf in any of them poisons the tensor.
_FINITE_KEYS = ("state1", "momentum_buffer", "absmax1", "max1", "qmap1", "gnorm_vec")
# Older bitsandbytes releases used 2048-element blocks; the rest are for safety.
_BLOCK_SIZES = (quantization.BLOCK_SIZE, 2048, 4096, 1024, 512, 128, 64)
# Keys of torch.optim.SGD param groups that have no meaning here.
_DROPPED_GROUP_KEYS = ("differentiable", "fused")


def is_canonical(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is in this package's layout (anything else goes through the import)."""
    return state.keys() <= CANONICAL_KEYS and "skipped" in state


def _unwrap(label: str, saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """bitsandbytes' nested state merged into one flat dict (a new dict; ``saved`` is untouched)."""
    if BNB_WRAPPED_KEY not in saved:
        return saved
    inner = saved[BNB_WRAPPED_KEY]
    if not isinstance(inner, Mapping):
        raise TypeError(f"{label}: state {BNB_WRAPPED_KEY!r} must be a dict, got {type(inner).__name__}")
    if BNB_WRAPPED_KEY in inner:
        raise ValueError(f"{label}: state {BNB_WRAPPED_KEY!r} is nested twice")
    both = sorted(set(inner) & set(saved))
    if both:
        # bitsandbytes moves keys into the nested dict; a key in both places is ambiguous.
        raise ValueError(f"{label}: state has {both} both inside and outside {BNB_WRAPPED_KEY!r}")
    flat = {k: v for k, v in saved.items() if k != BNB_WRAPPED_KEY}
    flat.update(inner)
    return flat


def _check_finite(label: str, saved: Mapping[str, Any]) -> None:
    for key in _FINITE_KEYS:
        value = saved.get(key)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if bridge.is_dtensor(value):
            bad = _any_nonfinite_sharded(value)
        else:
            # As the float32 it becomes: a float64 1e39 would load as Inf.
            bad = not bool(torch.isfinite(value.detach().to(torch.float32)).all())
        if bad:
            raise ValueError(
                f"{label}: state {key!r} holds NaN or Inf (or values beyond float32's range); the "
                "checkpoint is corrupt (a non-finite momentum or scale makes every later step of this "
                "tensor NaN)"
            )


def _any_nonfinite_sharded(value: Any) -> bool:  # a DTensor
    # Every rank must take the same decision, or one rank raises while the others go on:
    # the local verdicts are combined over every dimension of the mesh.
    import torch.distributed as dist

    local = bridge.local_tensor(value)
    flag = torch.tensor([0.0 if bool(torch.isfinite(local).all()) else 1.0], dtype=torch.float32)
    mesh = value.device_mesh
    flag = flag.to("cpu" if mesh.device_type == "cpu" else local.device)
    for mesh_dim in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
    return bool(flag.item() > 0)


def _count(label: str, key: str, value: Any) -> int:
    """A saved counter as an exact int in ``0 .. MAX_COUNT`` (2**53)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{label}: state {key!r} must hold one number, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool or value.device.type == "meta":
            kind = f"{value.dtype} tensor on {value.device}"
            raise TypeError(f"{label}: state {key!r} must be a count, got a {kind}")
        value = value.item()  # an int or a float, exactly as stored
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label}: state {key!r} must be a count, got {value!r}")
    if isinstance(value, numbers.Integral):
        number = int(value)  # exact: no float in between
    elif not math.isfinite(value) or value != math.floor(value):
        raise ValueError(f"{label}: state {key!r} must be a non-negative integer, got {value}")
    else:
        number = int(float(value))  # a whole float (torch's float32 step tensors)
    if not 0 <= number <= MAX_COUNT:
        raise ValueError(
            f"{label}: state {key!r} is {number}, outside 0..2**53 (cupylars.state.MAX_COUNT); "
            "the checkpoint is corrupt"
        )
    return number


def _check_scales(label: str, key: str, absmax: torch.Tensor) -> None:
    """8-bit scales must be finite float32 values >= 0 (see cupylars.state.MAX_ABSMAX)."""
    values = absmax.to("cpu", torch.float64)  # compared before any rounding to float32
    if values.numel() and not bool(((values >= 0) & (values <= MAX_ABSMAX)).all()):
        raise ValueError(
            f"{label}: state {key!r} holds a negative, NaN, Inf or above-float32 scale; the checkpoint "
            "is corrupt (a negative scale flips the momentum's sign, a non-finite one makes every step NaN)"
        )


def _tensor(label: str, key: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{label}: state {key!r} must be a tensor, got {type(value).__name__}")
    if bridge.is_dtensor(value):
        raise TypeError(f"{label}: state {key!r} is a DTensor but the parameter is not")
    return value.detach()


def _requantize(label: str, codes: torch.Tensor, book: np.ndarray, scale: np.ndarray, block: int, why: str):
    """Decode foreign 8-bit momentum and quantize it again in our layout."""
    warn_caller(
        f"{label}: 8-bit momentum {why}; it is re-quantized to blocks of "
        f"{quantization.BLOCK_SIZE} (close, not bit-exact)"
    )
    flat = codes.to("cpu").numpy().reshape(-1)
    n = flat.size
    m = book[flat] * np.repeat(scale, block)[:n]
    new_codes, absmax = quantization.quantize_blockwise(m.astype(np.float32))
    return torch.from_numpy(new_codes).reshape(codes.shape), torch.from_numpy(absmax)


def _import_8bit(label: str, param: torch.Tensor, codes: torch.Tensor, saved: Mapping[str, Any]):
    n = param.numel()
    ours = quantization.dynamic_map()
    book = ours
    same_book = True
    if saved.get("qmap1") is not None:
        qmap = _tensor(label, "qmap1", saved["qmap1"]).to("cpu", torch.float32).numpy().reshape(-1)
        if qmap.size != 256:
            raise ValueError(f"{label}: qmap1 has {qmap.size} entries, an 8-bit code book has 256")
        book, same_book = qmap, bool(np.array_equal(qmap, ours))
    if saved.get("absmax1") is not None:
        absmax = _tensor(label, "absmax1", saved["absmax1"])
        if absmax.dim() != 1:
            # cupylars.optim.sharded keeps absmax1 as (shards, blocks per shard) when the shards'
            # blocks are not the unsharded tensor's; which dimension was sharded is not saved,
            # so the codes cannot be matched with their scales here.
            raise ValueError(
                f"{label}: absmax1 has shape {tuple(absmax.shape)}: 8-bit momentum of a tensor "
                f"sharded {absmax.shape[0] if absmax.dim() else 0} ways whose shards are not whole "
                "256-element blocks of the unsharded tensor; it loads only into an optimizer whose "
                "parameter is sharded the same way (see docs/torch.md, Distributed training)"
            )
        _check_scales(label, "absmax1", absmax)
        absmax = absmax.to("cpu", torch.float32)
        blocks = absmax.numel()
        if blocks == quantization.num_blocks(n) and same_book:
            return codes, absmax  # our layout: taken bit for bit
        for block in _BLOCK_SIZES:
            if -(-n // block) == blocks:
                why = "uses another code book" if not same_book else f"was saved in blocks of {block}"
                return _requantize(label, codes, book, absmax.numpy(), block, why)
        raise ValueError(f"{label}: absmax1 has {blocks} entries, which fits no block size for {n} codes")
    if saved.get("max1") is not None:
        max1 = _tensor(label, "max1", saved["max1"]).to("cpu", torch.float32).reshape(-1)
        if max1.numel() != 1:
            raise ValueError(f"{label}: max1 must hold one number, got {max1.numel()}")
        _check_scales(label, "max1", max1)
        return _requantize(label, codes, book, max1.numpy(), max(n, 1), "has one absmax for the tensor")
    raise ValueError(f"{label}: 8-bit state1 without absmax1 or max1 cannot be decoded")


def _import_history(label: str, saved: Mapping[str, Any], step: int, ours: bool) -> torch.Tensor:
    history = _tensor(label, "gnorm_vec", saved["gnorm_vec"]).to("cpu", torch.float32, copy=True).reshape(-1)
    if history.numel() != HISTORY_SIZE:
        raise ValueError(f"{label}: gnorm_vec has {history.numel()} entries, expected {HISTORY_SIZE}")
    if ours:
        return history
    # bitsandbytes starts from zeros and records step t at t % 100; we fill every entry with
    # the first record. Rewrite the never-recorded entries so the next steps clip the same way.
    if step == 0:
        history.fill_(UNRECORDED)
    elif step < HISTORY_SIZE:
        recorded = torch.zeros(HISTORY_SIZE, dtype=torch.bool)
        recorded[1 : step + 1] = True
        history[~recorded] = history[1]
    return history


def import_param_state(
    param: torch.Tensor, saved: Mapping[str, Any], *, label: str, eight_bit: bool = False
) -> dict[str, Any]:
    """One parameter's saved state as new tensors in our layout on the parameter's device.

    ``eight_bit`` says that the optimizer keeps this tensor's momentum in 8 bits
    (``optim_bits == 8`` and at least ``min_8bit_size`` elements): float32
    momentum is then quantized, with a warning. Raises ``TypeError``/``ValueError``
    naming the problem for a state that does not fit the parameter or holds
    NaN/Inf; the saved tensors are never modified.
    """
    if not isinstance(saved, Mapping):
        raise TypeError(f"{label}: state must be a dict, got {type(saved).__name__}")
    saved = _unwrap(label, saved)
    unknown = set(saved) - CANONICAL_KEYS - _FOREIGN_KEYS
    if unknown:
        raise ValueError(
            f"{label}: state has keys {sorted(unknown)} that a LARS state does not have "
            "(is this checkpoint from another optimizer?)"
        )
    _check_finite(label, saved)
    if bridge.is_dtensor(param):
        return _import_sharded(param, saved, label=label)
    device = param.device
    step = _count(label, "step", saved.get("step", 0))
    out: dict[str, Any] = {
        "step": torch.tensor(step, dtype=torch.int64, device=device),
        "skipped": torch.tensor(
            _count(label, "skipped", saved.get("skipped", 0)), dtype=torch.int64, device=device
        ),
    }
    if "state1" in saved and saved.get("momentum_buffer") is not None:
        raise ValueError(f"{label}: state has both state1 and momentum_buffer")
    momentum = saved.get("state1", saved.get("momentum_buffer"))
    if momentum is not None:
        momentum = _tensor(label, "state1", momentum)
        if tuple(momentum.shape) != tuple(param.shape):
            raise ValueError(
                f"{label}: momentum state has shape {tuple(momentum.shape)}, "
                f"the parameter {tuple(param.shape)}"
            )
        if momentum.dtype == torch.uint8:
            codes, absmax = _import_8bit(label, param, momentum, saved)
            out["state1"] = codes.to(device, copy=True).contiguous()
            out["absmax1"] = absmax.to(device, copy=True)
        elif momentum.is_floating_point() and eight_bit:
            warn_caller(
                f"{label}: float32 momentum loaded for a tensor this optimizer keeps in 8 bits; "
                f"it is quantized to 8-bit blocks of {quantization.BLOCK_SIZE} (close, not bit-exact)"
            )
            m32 = momentum.to("cpu", torch.float32).numpy()
            codes, absmax = quantization.quantize_blockwise(np.ascontiguousarray(m32))
            out["state1"] = torch.from_numpy(codes).reshape(momentum.shape).to(device)
            out["absmax1"] = torch.from_numpy(absmax).to(device)
        elif momentum.is_floating_point():
            out["state1"] = momentum.to(device, torch.float32, copy=True).contiguous()
        else:
            raise TypeError(f"{label}: momentum state has dtype {momentum.dtype}, expected float32 or uint8")
        if "momentum_buffer" in saved and "step" not in saved:
            # torch.optim.SGD keeps no step count; its buffer exists after the first step.
            out["step"].fill_(1)
    elif "absmax1" in saved:
        raise ValueError(f"{label}: state has absmax1 but no state1")
    if saved.get("gnorm_vec") is not None:
        out["gnorm_vec"] = _import_history(label, saved, step, "skipped" in saved).to(device)
    return out


def _import_sharded(param: Any, saved: Mapping[str, Any], *, label: str) -> dict[str, Any]:  # a DTensor
    # Sharded state is only reloaded as it was saved: the same DTensor placements.
    if not is_canonical(saved):
        raise ValueError(
            f"{label}: a sharded (DTensor) parameter loads only cupylars state saved with the same sharding"
        )
    local_device = bridge.local_tensor(param).device
    out: dict[str, Any] = {}
    for key, value in saved.items():
        if key in ("state1", "absmax1"):
            if not bridge.is_dtensor(value):
                raise ValueError(f"{label}: state {key!r} of a sharded parameter must be a DTensor")
            if key == "state1" and (value.shape != param.shape or value.placements != param.placements):
                raise ValueError(
                    f"{label}: state1 is {tuple(value.shape)} {value.placements}, the parameter "
                    f"{tuple(param.shape)} {param.placements}"
                )
            if key == "absmax1":
                from .sharded import absmax_layout

                shape, placements, _ = absmax_layout(param)
                if value.shape != shape or list(value.placements) != placements:
                    raise ValueError(
                        f"{label}: absmax1 is {tuple(value.shape)} {value.placements}; with the "
                        f"parameter's sharding it must be {tuple(shape)} {tuple(placements)}"
                    )
            out[key] = value.detach().clone()
        elif key in ("step", "skipped"):
            out[key] = torch.tensor(_count(label, key, value), dtype=torch.int64, device=local_device)
        else:
            out[key] = _import_history(label, saved, 0, True).to(local_device)
    return out


def import_param_group(saved: Mapping[str, Any], current: Mapping[str, Any], *, label: str) -> dict[str, Any]:
    """A saved param group merged over the current one (the current ``params`` are kept).

    Hyperparameters missing from ``saved`` keep their current values; so do the
    current ``param_names`` where ``saved`` has none (saved names win, as in
    torch). bitsandbytes' ``betas`` is its ``(momentum, dampening)``; its ``eps``
    is unused by its LARS and is not taken (ours is the trust-ratio epsilon).
    """
    saved = {k: v for k, v in saved.items() if k != "params"}
    names = saved.get("param_names")
    if names is not None and len(names) != len(current["params"]):
        # The step and skipped_steps() label parameters by these names, one each.
        raise ValueError(
            f"{label}: the loaded param_names hold {len(names)} name(s) for the group's "
            f"{len(current['params'])} parameters"
        )
    if "betas" in saved:
        betas = saved.pop("betas")
        saved.pop("eps", None)
        if "momentum" not in saved:
            saved["momentum"], saved["dampening"] = float(betas[0]), float(betas[1])
    if saved.pop("maximize", False):
        raise ValueError(f"{label}: maximize=True is not supported by LARS")
    for key in _DROPPED_GROUP_KEYS:
        saved.pop(key, None)
    merged = {k: v for k, v in current.items() if k != "params"}
    merged.update(saved)
    merged["params"] = current["params"]
    return merged
