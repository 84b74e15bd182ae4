"""A param group and its per-tensor overrides, resolved into one step configuration.

:func:`resolve` turns a group's hyperparameters (and, for one tensor, its
:class:`~cupylars.optim.GlobalOptimManager` overrides) into a :class:`Resolved`:
the validated :class:`~cupylars.config.LarsConfig`, the momentum's bit width and
size threshold, ``foreach``, ``capturable`` and a capturable group's device lr.
:class:`ConfigSlot` does it once per step for the tensors that share a
configuration, reusing the last result while the group holds the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import repeat
from operator import is_
from typing import Any

import torch

from ..config import HYPERPARAMETERS, LarsConfig, validate_min_8bit_size, validate_optim_bits

__all__ = ["ConfigSlot", "Resolved", "group_config", "resolve"]

# The group's keys a step reads, in this order (ConfigSlot compares them by identity).
_KEYS = (*HYPERPARAMETERS, "optim_bits", "min_8bit_size", "foreach", "capturable")


@dataclass(frozen=True, eq=False)
class Resolved:
    """What a step of one tensor is told by its group and overrides."""

    cfg: LarsConfig
    optim_bits: int
    min_8bit_size: int
    foreach: bool  # None in the group means True
    capturable: bool
    lr_tensor: torch.Tensor | None  # a capturable group's tensor lr, read on the device

    @property
    def switches(self) -> tuple[bool, bool, int, int, bool]:
        """What decides which state tensors exist and how the tensors are batched: a change
        needs a new step plan. Everything else is read from the group at every step."""
        cfg = self.cfg
        return (cfg.uses_momentum, cfg.clips_percentile, self.optim_bits, self.min_8bit_size, self.foreach)

    def eight_bit(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` elements keeps 8-bit momentum."""
        return self.optim_bits == 8 and numel >= self.min_8bit_size


def _scalar(key: str, value: Any) -> Any:
    # A scheduler may hold lr as a tensor; the step needs a number. (The caller adds the
    # group's label; the message starts as torch.optim's.)
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise ValueError(f"{key} is a meta tensor, which holds no value; pass a number")
        if value.numel() != 1:
            raise ValueError(f"Tensor {key} must be 1-element, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    return value


def _check_device_lr(label: str, lr: torch.Tensor) -> None:
    if lr.device.type == "meta":
        raise ValueError(f"{label}: lr is a meta tensor, which holds no value; pass a number")
    if lr.numel() != 1:
        raise ValueError(
            f"{label}: Tensor lr must be 1-element, got a tensor of shape {tuple(lr.shape)} (a "
            "capturable group's lr tensor must hold one float32 or float64 element)"
        )
    if lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{label}: a tensor lr of a capturable group must hold one float32 or float64 element "
            f"(the kernels read it from device memory), got {lr.dtype} of shape {tuple(lr.shape)}"
        )
    if lr.requires_grad:
        raise ValueError(f"{label}: the lr tensor requires grad; pass a tensor that does not")


def _device_lr(group: Mapping[str, Any], override: Mapping[str, Any] | None) -> torch.Tensor | None:
    """A capturable group's tensor lr, which the kernels read from device memory (None: lr is
    a number, or a per-tensor override replaces it)."""
    lr = group["lr"]
    if not group.get("capturable", False) or not isinstance(lr, torch.Tensor):
        return None
    if override and "lr" in override:
        return None
    return lr


def group_config(
    group: Mapping[str, Any], override: Mapping[str, Any] | None, label: str
) -> tuple[LarsConfig, int, int]:
    """The validated step configuration of a group (with per-tensor overrides)."""
    values = {key: group[key] for key in (*HYPERPARAMETERS, "optim_bits", "min_8bit_size")}
    capturable = group.get("capturable", False)
    if not isinstance(capturable, bool):
        raise TypeError(f"{label}: capturable must be a bool, got {capturable!r}")
    lr = values["lr"]
    if capturable and isinstance(lr, torch.Tensor) and not (override and "lr" in override):
        _check_device_lr(label, lr)
        if lr.device.type != "cpu":
            # Read by the kernels on the device (Resolved.lr_tensor): reading it here would
            # synchronise (and cannot be captured). Its value is therefore not validated (lr >= 0).
            values["lr"] = 0.0
    if override:
        values.update(override)
    try:
        optim_bits = validate_optim_bits(values.pop("optim_bits"))
        min_8bit_size = validate_min_8bit_size(values.pop("min_8bit_size"))
        cfg = LarsConfig(**{k: _scalar(k, v) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{label}: {exc}") from None
    foreach = group.get("foreach")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"{label}: foreach must be None or a bool, got {foreach!r}")
    return cfg, optim_bits, min_8bit_size


def resolve(group: Mapping[str, Any], override: Mapping[str, Any] | None, label: str) -> Resolved:
    """A group's (and overrides') configuration of a step; raises naming ``label``."""
    cfg, optim_bits, min_8bit_size = group_config(group, override, label)
    return Resolved(
        cfg=cfg,
        optim_bits=optim_bits,
        min_8bit_size=min_8bit_size,
        foreach=group.get("foreach", None) is not False,
        capturable=group.get("capturable", False),
        lr_tensor=_device_lr(group, override),
    )


def override_key(override: Mapping[str, Any] | None) -> tuple:
    """A hashable form of a tensor's overrides (their values are validated scalars)."""
    return () if not override else tuple(sorted(override.items()))


class ConfigSlot:
    """The configuration shared by some tensors of one group (and one set of overrides), read
    from the group at every step.

    The last :class:`Resolved` is reused while the group holds the very same values
    (identity) and none of them is a tensor, whose value may change in place (a
    scheduler's tensor lr is read at every step).
    """

    __slots__ = ("_cacheable", "_switches", "_values", "group", "label", "override", "resolved")

    def __init__(
        self, group: dict[str, Any], override: dict[str, Any] | None, label: str, resolved: Resolved
    ) -> None:
        self.group = group
        self.override = override
        self.label = label
        self.resolved = resolved
        self._switches = resolved.switches
        self._values = list(map(group.get, _KEYS))
        self._cacheable = not any(map(isinstance, self._values, repeat(torch.Tensor)))

    def refresh(self) -> bool:
        """Read the group again; False when the configuration is invalid or its switches
        changed (a new plan is needed, and building it raises where it should)."""
        values = list(map(self.group.get, _KEYS))
        if self._cacheable and all(map(is_, values, self._values)):
            return True
        try:
            resolved = resolve(self.group, self.override, self.label)
        except (TypeError, ValueError):
            return False
        if resolved.switches != self._switches:
            return False
        self.resolved = resolved
        self._values = values
        self._cacheable = not any(map(isinstance, values, repeat(torch.Tensor)))
        return True
