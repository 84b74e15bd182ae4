"""Per-tensor LARS optimizer state, passed explicitly to every update.

A :class:`LarsState` holds arrays of the same array module as its parameter
(NumPy or CuPy), so on a GPU everything a step reads or writes, the step
counter included, stays on the device and a step needs no host round trip:

============  ==========================  =========================================
array         dtype, shape                meaning
============  ==========================  =========================================
step_count    int64, ()                   applied steps ``t``
skip_count    int64, ()                   steps skipped for a non-finite gradient
history       float32, (100,)             squared gradient norms for percentile
                                          clipping; -1.0 = never recorded
momentum      float32, param's shape      m (32-bit state), allocated on first use
codes         uint8, param's shape        m as 8-bit codes (8-bit state)
absmax        float32, (ceil(n/256),)     one scale per block of 256 codes
============  ==========================  =========================================

The momentum arrays are allocated by the first step that uses momentum, so a
state without momentum costs 416 bytes whatever the tensor size.

Both counters stay within ``0 ..`` :data:`MAX_COUNT` (2**53): a state holding
a larger count is refused, and so is a step that would take a counter past it.
The scales in ``absmax`` are finite float32 values ``>= 0``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import quantization
from .config import validate_min_8bit_size, validate_optim_bits
from .formats import FORMATS

__all__ = ["HISTORY_SIZE", "MAX_ABSMAX", "MAX_COUNT", "LarsState", "array_module", "check_values"]

#: Length of the percentile-clipping history of squared gradient norms.
HISTORY_SIZE = 100
#: Largest value of a state's step and skip counters. Every count up to 2**53 is exact in
#: a float64 (checkpoints that hold the count as a float, JSON, torch's float step tensors),
#: and it lies far below int64's 2**63, so ``step + 1`` never wraps in any backend. At a
#: million steps a second it takes 285 years to reach.
MAX_COUNT = 2**53
#: Largest scale a block of 8-bit momentum may have: absmax is the largest |m| of the
#: block, and m is a finite float32, so every finite float32 >= 0 is a scale some momentum
#: produces (1e38 included: dequantized, code * absmax stays finite). Larger, NaN or
#: negative scales (a negative one flips the momentum's sign) come only from corruption.
MAX_ABSMAX = float(np.finfo(np.float32).max)
#: History entry meaning "never recorded": squared norms are never negative.
UNRECORDED = -1.0

# Process-wide, so that no two states (or two moments of one state) share a version.
_VERSIONS = itertools.count(1)


def array_module(array: Any) -> Any:
    """``cupy`` for CuPy arrays, else ``numpy``."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


@dataclass(eq=False)
class LarsState:
    """Optimizer state of one tensor (see the module docstring for the arrays).

    Create it with :func:`cupylars.functional.init_state`; save it with
    :meth:`to_dict` and restore it with :meth:`from_dict`.

    Attributes:
        shape: the parameter's shape.
        param_format: the parameter's storage format: ``'float32'``, ``'float16'`` or
            ``'bfloat16'``.
        is_8bit: whether the momentum is kept as 8-bit codes (``optim_bits=8`` and at
            least ``min_8bit_size`` elements).
        step_count: int64 array of shape ``()``: applied steps (see :attr:`step`).
        skip_count: int64 array of shape ``()``: steps skipped for a non-finite gradient.
        history: float32 array of shape ``(100,)``: squared gradient norms for percentile
            clipping, -1 where never recorded.
        momentum: float32 array of the parameter's shape (32-bit state), or None before
            the first step with momentum.
        codes: uint8 array of the parameter's shape (8-bit state), or None.
        absmax: float32 array of one scale per block of 256 codes (8-bit state), or None.
    """

    shape: tuple[int, ...]
    param_format: str
    is_8bit: bool
    step_count: Any
    skip_count: Any
    history: Any
    momentum: Any = None
    codes: Any = None
    absmax: Any = None

    # -- versions ------------------------------------------------------------------
    # Every assignment to a state (a replaced array, a new shape or mode) gives it a new
    # version, unique in the process: a validation remembered for the old version
    # (cupylars.functional) then no longer applies, and the next update checks again.
    # Arrays changed in place (reshaped, made read-only) keep the version.

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_version", next(_VERSIONS))

    def __getstate__(self) -> dict[str, Any]:
        # A copy (or an unpickled state) holds other arrays: it must not inherit the version.
        state = dict(self.__dict__)
        state.pop("_version", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_version", next(_VERSIONS))

    @classmethod
    def create(
        cls,
        xp: Any,
        shape: tuple[int, ...],
        param_format: str,
        *,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
    ) -> LarsState:
        """A fresh state in array module ``xp`` (what :func:`cupylars.functional.init_state`
        returns; that function also checks the parameter)."""
        optim_bits = validate_optim_bits(optim_bits)
        min_8bit_size = validate_min_8bit_size(min_8bit_size)
        size = int(np.prod(shape, dtype=np.int64))
        return cls(
            shape=tuple(int(s) for s in shape),
            param_format=param_format,
            is_8bit=optim_bits == 8 and size >= min_8bit_size,
            step_count=xp.zeros((), dtype=xp.int64),
            skip_count=xp.zeros((), dtype=xp.int64),
            history=xp.full(HISTORY_SIZE, UNRECORDED, dtype=xp.float32),
        )

    # -- what users read -------------------------------------------------------------
    @property
    def size(self) -> int:
        """Elements of the parameter."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def step(self) -> int:
        """Applied steps (reading it from a GPU state synchronises)."""
        return int(self.step_count)

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite gradient."""
        return int(self.skip_count)

    @property
    def has_momentum(self) -> bool:
        """Whether the momentum arrays exist (allocated by the first step with momentum)."""
        return self.momentum is not None or self.codes is not None

    def momentum_buffer(self) -> Any:
        """A float32 copy of m (dequantized for 8-bit state).

        ``None`` before the first applied step and while momentum is unused.
        """
        if not self.has_momentum or self.step == 0:
            return None
        if self.is_8bit:
            return quantization.dequantize_blockwise(self.codes, self.absmax)
        return self.momentum.copy()

    def nbytes(self) -> int:
        """Bytes held by the state's arrays."""
        arrays = (self.step_count, self.skip_count, self.history, self.momentum, self.codes, self.absmax)
        return sum(int(a.nbytes) for a in arrays if a is not None)

    # -- used by the backends --------------------------------------------------------
    def ensure_momentum(self, xp: Any) -> None:
        """Allocate the momentum arrays (zeros) if this state has none yet."""
        if self.has_momentum:
            return
        if self.is_8bit:
            self.codes = xp.full(self.shape, quantization.ZERO_CODE, dtype=xp.uint8)
            self.absmax = xp.zeros(quantization.num_blocks(self.size), dtype=xp.float32)
        else:
            self.momentum = xp.zeros(self.shape, dtype=xp.float32)

    def drop_momentum(self) -> None:
        """Back to no momentum arrays (a step that allocated them and then refused to run)."""
        self.momentum = self.codes = self.absmax = None

    def arrays(self) -> dict[str, Any]:
        """The state's arrays by name (momentum arrays only once allocated)."""
        names = ("step_count", "skip_count", "history", "momentum", "codes", "absmax")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    # -- persistence -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of arrays (the state's own arrays, not copies)."""
        out = dict(self.arrays())
        out["shape"] = np.asarray(self.shape, dtype=np.int64)
        out["param_format"] = np.asarray(self.param_format)
        out["is_8bit"] = np.asarray(self.is_8bit)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LarsState:
        """Rebuild a state from :meth:`to_dict` output, checking its consistency."""
        missing = {"step_count", "skip_count", "history", "shape", "param_format", "is_8bit"} - set(data)
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        shape = tuple(int(s) for s in np.asarray(data["shape"]).reshape(-1))
        param_format = str(np.asarray(data["param_format"]))
        if param_format not in FORMATS:
            raise ValueError(f"state dict has unknown param_format {param_format!r}")
        state = cls(
            shape=shape,
            param_format=param_format,
            is_8bit=bool(np.asarray(data["is_8bit"])),
            step_count=data["step_count"],
            skip_count=data["skip_count"],
            history=data["history"],
            momentum=data.get("momentum"),
            codes=data.get("codes"),
            absmax=data.get("absmax"),
        )
        state.check()
        return state

    def check(self, label: str = "state") -> None:
        """Raise ValueError if the arrays do not fit this state's shape and mode, or hold
        values no step can produce (see :func:`check_values`). ``label`` names the state
        in the message."""
        self.check_layout(label)
        check_values([self], [label])

    def check_layout(self, label: str = "state") -> None:
        """Raise ValueError if the arrays do not fit this state's shape and mode (no values
        are read)."""

        def expect(name: str, shape: tuple[int, ...], dtype: Any) -> None:
            a = getattr(self, name)
            if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dtype):
                raise ValueError(
                    f"{label}: state array {name!r} is {np.dtype(a.dtype)}{tuple(a.shape)}, "
                    f"expected {np.dtype(dtype)}{shape}"
                )

        expect("step_count", (), np.int64)
        expect("skip_count", (), np.int64)
        expect("history", (HISTORY_SIZE,), np.float32)
        if self.is_8bit:
            if self.momentum is not None:
                raise ValueError(f"{label}: an 8-bit state holds codes and absmax, not a float32 momentum")
            if (self.codes is None) != (self.absmax is None):
                raise ValueError(f"{label}: an 8-bit state needs both codes and absmax")
            if self.codes is not None:
                expect("codes", self.shape, np.uint8)
                expect("absmax", (quantization.num_blocks(self.size),), np.float32)
        else:
            if self.codes is not None or self.absmax is not None:
                raise ValueError(f"{label}: a 32-bit state holds a float32 momentum, not codes")
            if self.momentum is not None:
                expect("momentum", self.shape, np.float32)


# -- values ----------------------------------------------------------------------------------
def _summary(xp: Any, states: Sequence[LarsState]) -> np.ndarray:
    """Per state (rows): step count, skip count, and 1 where every absmax scale is sane,
    as one int64 host array (on a GPU: one transfer for the whole list)."""

    def sane_scales(state: LarsState) -> Any:
        a = state.absmax
        if a is None or a.size == 0:
            return xp.ones((), dtype=xp.int64)
        # NaN fails both comparisons; -0.0 >= 0 holds.
        return ((a >= 0) & (a <= MAX_ABSMAX)).all().astype(xp.int64)

    if xp is np:
        return np.array(
            [(int(s.step_count), int(s.skip_count), int(sane_scales(s))) for s in states], dtype=np.int64
        ).reshape(-1, 3)
    stream = xp.cuda.get_current_stream()
    if getattr(stream, "is_capturing", lambda: False)():
        from .cuda_runtime import GraphCaptureError

        raise GraphCaptureError(
            "cupylars: checking the states reads their counters on the host, which a CUDA graph capture "
            "cannot record; prepare the batch (run one step) outside the capture"
        )
    out = np.empty((len(states), 3), dtype=np.int64)
    by_device: dict[int, list[int]] = {}
    for k, s in enumerate(states):
        by_device.setdefault(int(s.step_count.data.device_id), []).append(k)
    for device, ks in by_device.items():
        with xp.cuda.Device(device):  # one transfer per device
            rows = xp.stack(
                [xp.stack([s.step_count, s.skip_count, sane_scales(s)]) for s in map(states.__getitem__, ks)]
            )
            out[ks] = rows.get()
    return out


def check_values(states: Sequence[LarsState], labels: Sequence[str]) -> np.ndarray:
    """Raise ValueError, naming the state by its label, for counters outside
    ``0 .. MAX_COUNT`` or absmax scales that are negative, NaN, Inf or above
    :data:`MAX_ABSMAX`; return the counters read, int64 (steps, skips) per state.

    Reads the counters and scales: on a GPU one synchronising transfer for the list.
    The states' layouts must have been checked (:meth:`LarsState.check_layout`).
    """
    if not states:
        return np.zeros((0, 2), dtype=np.int64)
    summary = _summary(array_module(states[0].step_count), states)
    for label, (step, skipped, sane) in zip(labels, summary.tolist()):
        for name, count in (("step_count", step), ("skip_count", skipped)):
            if not 0 <= count <= MAX_COUNT:
                raise ValueError(
                    f"{label}.{name} is {count}, outside 0..2**53 (cupylars.state.MAX_COUNT): "
                    "the state is corrupt"
                )
        if not sane:
            raise ValueError(
                f"{label}.absmax holds a negative, NaN, Inf or above-float32 scale: the 8-bit momentum "
                "is corrupt (a negative scale flips its sign, a non-finite one makes every step NaN)"
            )
    return summary[:, :2]
