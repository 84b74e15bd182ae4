"""Hyperparameters of one LARS step, validated once, up front.

Every entry point (functional API, CUDA backend, torch adapter) builds a
:class:`LarsConfig` before touching any array, so a bad argument raises before
a parameter or a piece of optimizer state has been written.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

__all__ = [
    "NONFINITE_POLICIES",
    "LarsConfig",
    "nonfinite_error",
    "validate_min_8bit_size",
    "validate_optim_bits",
]

#: What a step does with a gradient holding NaN or Inf: ``skip`` leaves that tensor
#: and its state as they were and counts the skip; ``raise`` checks every gradient
#: of the step first and raises :func:`nonfinite_error` before anything is written;
#: ``propagate`` applies the step as it comes.
NONFINITE_POLICIES = ("skip", "raise", "propagate")
"""What ``nonfinite=`` accepts: ``skip`` (the default), ``raise`` or ``propagate``."""


def nonfinite_error(where: Sequence[int] | Sequence[str]) -> FloatingPointError:
    """The error of ``nonfinite='raise'``: every offending tensor by index or label."""
    if all(isinstance(w, int) for w in where):
        names = f"tensor(s) {list(where)}"
    else:
        names = ", ".join(map(str, where))
    return FloatingPointError(f"non-finite gradient in {names}; nothing was updated")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _non_negative(name: str, value: object) -> float:
    value = _real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _unit_interval(name: str, value: object) -> float:
    value = _real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def validate_optim_bits(optim_bits: object) -> int:
    bits = _integer("optim_bits", optim_bits)
    if bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {bits}")
    return bits


def validate_min_8bit_size(min_8bit_size: object) -> int:
    size = _integer("min_8bit_size", min_8bit_size)
    if size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {size}")
    return size


@dataclass(frozen=True)
class LarsConfig:
    """The hyperparameters of a LARS step (see docs/algorithm.md).

    Construction validates and normalises every field (floats become ``float``,
    ``percentile_clipping`` an ``int``); an invalid value raises ``TypeError`` or
    ``ValueError`` naming the argument. The fields are the keyword arguments of
    :func:`cupylars.functional.lars_update`, with the same defaults.

    Attributes:
        lr: learning rate, >= 0 (required).
        momentum: mu in [0, 1); 0 keeps no momentum state.
        dampening: delta in [0, 1): the new direction enters the momentum times 1 - delta.
        weight_decay: lambda >= 0, coupled L2 decay (``g + lambda p``).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening 0.
        max_unorm: cap on ||update|| / ||param|| (0.02: at most 2% of the weight norm
            per step, before lr); 0 turns it off.
        percentile_clipping: clip ||g|| at this percentile (1..100) of the last 100
            gradient norms; 100 turns it off.
        trust_coefficient: eta of the classic LARS trust ratio, >= 0; 0 turns it off.
        trust_clip: LARC clipping of the trust ratio, r = min(r / lr, 1).
        eps: >= 0, added to the trust ratio's denominator.
        nonfinite: one of :data:`NONFINITE_POLICIES`.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    max_unorm: float = 0.02
    percentile_clipping: int = 100
    trust_coefficient: float = 0.0
    trust_clip: bool = False
    eps: float = 1e-8
    nonfinite: str = "skip"

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen dataclass: normalise in place once
        fix(self, "lr", _non_negative("lr", self.lr))
        fix(self, "momentum", _unit_interval("momentum", self.momentum))
        fix(self, "dampening", _unit_interval("dampening", self.dampening))
        fix(self, "weight_decay", _non_negative("weight_decay", self.weight_decay))
        fix(self, "max_unorm", _non_negative("max_unorm", self.max_unorm))
        fix(self, "trust_coefficient", _non_negative("trust_coefficient", self.trust_coefficient))
        fix(self, "eps", _non_negative("eps", self.eps))
        for flag in ("nesterov", "trust_clip"):
            value = getattr(self, flag)
            if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
            fix(self, flag, bool(value))
        percentile = _integer("percentile_clipping", self.percentile_clipping)
        if not 1 <= percentile <= 100:
            raise ValueError(f"percentile_clipping must be in 1..100, got {percentile}")
        fix(self, "percentile_clipping", percentile)
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")

    # Switches, named as in docs/algorithm.md.
    @property
    def clips_percentile(self) -> bool:
        """Whether percentile clipping is on (``percentile_clipping < 100``)."""
        return self.percentile_clipping < 100

    @property
    def uses_trust_ratio(self) -> bool:
        """Whether the trust ratio is on (``trust_coefficient > 0``)."""
        return self.trust_coefficient > 0.0

    @property
    def uses_momentum(self) -> bool:
        """Whether the step keeps momentum (``momentum > 0``)."""
        return self.momentum > 0.0

    @property
    def clips_update_norm(self) -> bool:
        """Whether the update norm is capped (``max_unorm > 0``)."""
        return self.max_unorm > 0.0

    def as_dict(self) -> dict[str, object]:
        """The fields by name, e.g. ``LarsConfig(**cfg.as_dict())`` rebuilds ``cfg``."""
        return asdict(self)


#: Names of the step's hyperparameters (the fields of :class:`LarsConfig`).
HYPERPARAMETERS = tuple(f.name for f in fields(LarsConfig))
