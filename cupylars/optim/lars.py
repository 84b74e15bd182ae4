r"""torch.optim LARS optimizers backed by :mod:`cupylars.functional`."""

from __future__ import annotations

import inspect
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass, replace
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import torch
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from .. import functional as F
from .._interrupts import interrupts_deferred
from .._warnings import warn_caller
from ..batch import PreparedBatch, sharing_pairs
from ..config import (
    HYPERPARAMETERS,
    LarsConfig,
    nonfinite_error,
    validate_min_8bit_size,
    validate_optim_bits,
)
from ..cuda_runtime import GraphCaptureError, emulated_capture_active
from ..quantization import ZERO_CODE, num_blocks
from ..state import HISTORY_SIZE, UNRECORDED, LarsState
from ..testing import active_emulation
from . import bridge, checkpoint
from .manager import GlobalOptimManager

__all__ = ["HYPERPARAMETERS", "LARS", "GraphCaptureError", "LARS8bit", "LARS32bit"]

# Attributes of bitsandbytes' ``args`` object that override the keyword arguments.
_ARGS_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "max_unorm")
# Values that cannot be an ``args`` object: most likely optim_bits given positionally to a
# fixed-bits class, whose seventh positional argument is ``args``.
_NOT_ARGS = (bool, int, float, str, bytes)

_DOC = r"""Implements LARS with {bits}momentum state: {summary}

    For each parameter tensor (one layer) with gradient :math:`g` at applied
    step :math:`t`:

    .. math::
        \begin{{aligned}}
        &\gamma = \text{{percentile clip factor of }} \|g\| \text{{ over the last 100 steps}}
            \quad (\text{{percentile\_clipping}} < 100, \text{{ else }} 1) \\
        &d = \gamma g + \lambda p \\
        &d \leftarrow r d, \quad r = \frac{{\eta \|p\|}}{{\gamma \|g\| + \lambda \|p\| + \epsilon}}
            \quad (\eta > 0;\ r \leftarrow \min(r / \text{{lr}}, 1) \text{{ with trust\_clip}}) \\
        &m = d \ (t = 1), \quad m = \mu m + (1 - \delta) d \ (t > 1) \quad (\mu > 0) \\
        &u = d + \mu m \ \text{{(nesterov)}}, \quad u = m, \quad u = d \ (\mu = 0) \\
        &s = \min\left(1, \frac{{\text{{max\_unorm}}\, \|p\|}}{{\|u\|}}\right) \quad (\|p\| > 0) \\
        &p \leftarrow p - \text{{lr}}\, s\, u
        \end{{aligned}}

    with :math:`\lambda` = ``weight_decay``, :math:`\eta` = ``trust_coefficient``,
    :math:`\mu` = ``momentum`` and :math:`\delta` = ``dampening``. Norms are taken
    over the whole tensor before the step (over all shards of a DTensor).

    Args:
        params: iterable of parameters or param-group dicts; every argument
            below except ``args`` and ``foreach`` can be set per group, and per
            tensor through :class:`~cupylars.optim.GlobalOptimManager`.
        lr: learning rate, read from the group at every step (schedulers work).
        momentum: :math:`\mu \in [0, 1)`; 0 keeps no momentum state.
        dampening: :math:`\delta \in [0, 1)`.
        weight_decay: :math:`\lambda \geq 0`, coupled (added to the gradient).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
{bits_arg}        args: an object whose attributes ``optim_bits``, ``min_8bit_size``,
            ``percentile_clipping`` and ``max_unorm``, where present, override
            the keyword values (as bitsandbytes' ``args``).
        min_8bit_size: tensors with fewer elements keep 32-bit momentum.
        percentile_clipping: clip :math:`\|g\|` at this percentile of its last
            100 values; 100 turns it off.
        max_unorm: cap on :math:`\|\text{{update}}\| / \|p\|`; 0 turns it off.
        trust_coefficient: :math:`\eta` of the classic LARS trust ratio
            (keyword only); 0 (the default, as in bitsandbytes) turns it off.
        trust_clip: LARC clipping of the trust ratio (keyword only).
        eps: :math:`\epsilon` of the trust ratio (keyword only).
        nonfinite: a tensor whose gradient holds NaN/Inf is ``"skip"``-ped
            (``state["skipped"]`` counts it, :meth:`skipped_steps` reports it,
            and the optimizer warns once, see below), or the step ``"raise"``-s
            ``FloatingPointError`` before updating anything, or ``"propagate"``-s
            (keyword only).
        foreach: ``None``/``True`` updates the tensors of one device, format and
            hyperparameters in one call (a constant number of kernel launches on
            CUDA); ``False`` updates them one by one. Results are identical.
        capturable: the step may be captured in a CUDA graph (keyword only, per
            group too). A tensor ``lr`` is then read by the kernels from device
            memory at every step and replay (a scheduler that updates it in place
            reaches the graph), never on the host; a float ``lr`` is frozen in a
            graph at capture. See docs/torch.md, "CUDA graphs".

    State per tensor (torch tensors on the parameter's device, see
    :mod:`cupylars.optim.checkpoint`): ``step``, ``skipped``, ``state1``
    (float32 momentum, or uint8 codes with ``absmax1``), ``gnorm_vec`` (with
    percentile clipping). 8-bit momentum of ``n`` elements takes
    ``n + 4 * ceil(n / 256)`` bytes.

    :attr:`backends` maps each device to the backend that updated it at the
    last step, and why.

    Skipped tensors are reported without reading the device at every step:
    the skip counters are read on the host after steps 1, 2, 4, ..., 64 and
    then every :attr:`skip_check_interval` steps (100; one device sync per
    look on CUDA, none in between), and the first look that finds a new skip
    issues one ``RuntimeWarning`` naming the tensors. A skip is thus reported
    up to ``skip_check_interval`` steps late; :meth:`skipped_steps` reads the
    counters at any time.
    """


@dataclass
class _Work:
    """One tensor of a step: what to update and how."""

    param: torch.Tensor
    grad: torch.Tensor
    cfg: LarsConfig
    optim_bits: int
    min_8bit_size: int
    fmt: str
    label: str
    sharded: bool
    foreach: bool
    lr_tensor: torch.Tensor | None = None  # a capturable group's tensor lr, read on the device


def _fingerprint(tensor: torch.Tensor | None) -> Any:
    # What a cached array view depends on: the same memory, seen the same way.
    if tensor is None:
        return None
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device)


_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")
_DEVICE = attrgetter("device")
_LAYOUT = attrgetter("layout")
_DATA_PTR = torch.Tensor.data_ptr
_STRIDE = torch.Tensor.stride
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


@dataclass(eq=False)
class _Bucket:
    """The tensors of one param group on one device and storage declaration: one update call."""

    backend: bridge.DeviceBackend
    dtype: str | None  # the functional API's dtype argument
    index: list[int]  # positions in the group's list of parameters with a gradient
    arrays: list[Any]  # array views of the parameters (of ``staging`` for strided ones)
    states: list[LarsState]
    staging: list[tuple[torch.Tensor, torch.Tensor]]  # (strided parameter, its contiguous copy)
    # The arrays and states prepared at the first fast step: one batch (foreach), or one per
    # tensor. Owned here (not remembered by lars_update_many) so that a captured CUDA graph
    # can keep the batches whose memory it addresses.
    batches: list[PreparedBatch] | None = None


@dataclass(eq=False)
class _GroupPlan:
    """What a step of one param group depends on, as the last full step found it.

    A step whose group, parameters, gradients' presence, dtypes, shapes and
    devices, parameter storages, configuration switches and state tensors are
    all as recorded here takes :meth:`LARS._fast_step`: the buckets' array views
    and states are reused and only the gradients are gathered.
    """

    group: dict[str, Any]
    params: list[torch.Tensor]  # group["params"], all of them
    present: list[bool]  # which had a gradient
    struct: tuple  # the configuration that decides which state tensors exist
    foreach: bool
    with_grad: list[torch.Tensor]
    labels: list[str]
    ptrs: list[int]
    dtypes: list[torch.dtype]
    shapes: list[torch.Size]
    strides: list[tuple[int, ...]]
    devices: list[torch.device]
    state_dicts: list[dict[str, Any]]
    state_keys: list[str]  # every state dict's keys, in order
    state_values: list[torch.Tensor]  # ... and tensors
    state_ptrs: list[int]
    buckets: list[_Bucket]


def _struct(cfg: LarsConfig, optim_bits: int, min_8bit_size: int, foreach: bool) -> tuple:
    # Everything but these is read from the group at each step (a scheduler's lr included).
    return (cfg.uses_momentum, cfg.clips_percentile, optim_bits, min_8bit_size, foreach)


def _read_args(args: Any) -> dict[str, Any]:
    return {key: getattr(args, key) for key in _ARGS_KEYS if hasattr(args, key)}


class LARS(Optimizer):
    #: Steps between two looks at the skip counters once 64 steps have run (see the class
    #: docstring); an instance may set its own, 1 looks after every step.
    skip_check_interval: int = 100

    __doc__ = _DOC.format(
        bits="",
        summary="32-bit, or 8-bit blockwise for tensors of at least ``min_8bit_size`` "
        "elements when ``optim_bits=8``.",
        bits_arg="        optim_bits: 32, or 8 for 8-bit blockwise momentum.\n",
    )

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        max_unorm: float = 0.02,
        *,
        trust_coefficient: float = 0.0,
        trust_clip: bool = False,
        eps: float = 1e-8,
        nonfinite: str = "skip",
        foreach: bool | None = None,
        capturable: bool = False,
    ) -> None:
        options = {
            "optim_bits": optim_bits,
            "min_8bit_size": min_8bit_size,
            "percentile_clipping": percentile_clipping,
            "max_unorm": max_unorm,
        }
        if args is not None:
            if isinstance(args, _NOT_ARGS):
                raise TypeError(
                    f"{type(self).__name__}: args must be an object whose attributes override "
                    f"{', '.join(_ARGS_KEYS)} (as bitsandbytes' args), got {type(args).__name__} "
                    f"{args!r}; the bit width is optim_bits=... of LARS, or the class LARS8bit / LARS32bit"
                )
            options.update(_read_args(args))
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coefficient": trust_coefficient,
            "trust_clip": trust_clip,
            "eps": eps,
            "nonfinite": nonfinite,
            "foreach": foreach,
            "capturable": capturable,
            **options,
        }
        # Validate before anything is built; errors name the class called (LARS8bit, ...).
        _group_config(defaults, None, type(self).__name__)
        self._init_runtime()
        super().__init__(params, defaults)

    # -- construction and pickling ---------------------------------------------------

    def _init_runtime(self) -> None:
        # Caches and reports that are rebuilt, never saved.
        self._views: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._scratch: dict[tuple[str, torch.device], Any] = {}
        self._device_backends: dict[torch.device, bridge.DeviceBackend] = {}
        self._warned: set[str] = set()
        # Per param group, what the last full step found (see _GroupPlan); None: no fast step.
        self._plans: list[_GroupPlan] | None = None
        # What captured CUDA graphs address (prepared batches holding tables and scratch, lr
        # tensors): kept as long as the optimizer, across load_state_dict, so that no replay
        # reads memory freed after its capture.
        self._graph_keepalive: list[Any] = getattr(self, "_graph_keepalive", [])
        #: Device -> the backend that updated its tensors at the last step, and why.
        self.backends: dict[str, str] = {}
        # The skip warning: steps since (re)initialisation, the skips already known then, and
        # whether it was issued.
        self._steps_run = 0
        self._skips_known = 0
        self._skip_warned = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_runtime()  # also drops every cached view after load_state_dict

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters and tensors are validated first."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        label = f"param group {len(self.param_groups) - 1}"
        try:
            _group_config(group, None, label)
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                bridge.storage_format(p, f"parameter {names[i]!r}" if names else f"{label} parameter {i}")
                if p.is_sparse:
                    raise TypeError(f"{label} parameter {i} is sparse; LARS updates dense tensors")
        except Exception:
            self.param_groups.pop()
            raise

    # -- the step --------------------------------------------------------------------

    # NumPy, CuPy and the native library are opaque to dynamo: under torch.compile the
    # step is a graph break and runs eagerly (as torch.optim's load_state_dict does).
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: reevaluates the model and returns the loss (optional).

        Everything (hyperparameters, gradients, states) is checked before any
        tensor is written; parameters without a gradient are skipped.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if _capturing():
            # Inside a CUDA graph capture only the fast step, launches and nothing else, may
            # run; whatever else this step would do raises here, before anything is recorded.
            self._check_capturable()
            if not self._fast_step(capturing=True):
                raise GraphCaptureError(
                    f"{type(self).__name__}: this step cannot be captured in a CUDA graph: it is not "
                    "a repeat of the last step outside the capture (the first step creates the "
                    "state, and a change of param groups, gradients present, dtypes, shapes, "
                    "devices, parameter storage, state tensors or optim_bits/momentum/percentile "
                    "switches needs new tables). Run the same step once outside the capture "
                    "(warm-up), then capture"
                )
            return loss  # no look at the skip counters: that reads the device
        if self._fast_step():
            self._look_for_skips()
            return loss
        self._plans = None  # rebuilt below once this step has succeeded
        work = self._collect()
        if not work:
            return loss
        self._check_disjoint()  # before any state is created
        for w in work:
            self._prepare_state(w)
        dense = [w for w in work if not w.sharded]
        _raise_on_nonfinite((w.label, w.grad, w.cfg) for w in dense)
        shards = [w for w in work if w.sharded]
        if shards:
            from . import sharded  # needs torch.distributed, which only DTensor users have

            # Runs before the dense update so that its "raise" leaves every tensor untouched.
            sharded.sharded_step(
                [
                    sharded.ShardedWork(
                        cast(Any, w.param), cast(Any, w.grad), self.state[w.param], w.cfg, w.fmt, w.label
                    )  # DTensors
                    for w in shards
                ]
            )
            self.backends["sharded"] = "reference math on shards with all-reduced norms"
        if dense:
            self._update_dense(dense)
        # The arrays wrote the parameters behind autograd's back: tell it, so a backward
        # through a graph that saved the old values fails loudly instead of silently.
        torch.autograd.graph.increment_version([bridge.local_tensor(w.param) for w in work])
        if not shards:
            self._plans = self._plan_groups(work)
        self._look_for_skips()
        return loss

    def _check_capturable(self) -> None:
        """Raise, naming the reason, when a step cannot be captured in a CUDA graph."""
        name = type(self).__name__
        if GlobalOptimManager.get_instance().uses_config_override:
            raise GraphCaptureError(
                f"{name}: steps with GlobalOptimManager overrides cannot be captured in a CUDA graph "
                "(the overrides are resolved on the host at every step)"
            )
        on_torch = not emulated_capture_active()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            label = f"param group {gi}"
            if not group.get("capturable", False):
                raise GraphCaptureError(
                    f"{name}: a step is being captured in a CUDA graph but {label} has "
                    "capturable=False; pass capturable=True (to the optimizer or the group)"
                )
            if group["nonfinite"] == "raise":
                raise GraphCaptureError(
                    f"{name}: {label} has nonfinite='raise', which checks the gradients on the host "
                    "(a synchronisation) and cannot be captured in a CUDA graph; use 'skip' or 'propagate'"
                )
            lr = group["lr"]
            for p in params:
                if bridge.is_dtensor(p):
                    raise GraphCaptureError(f"{name}: {label}: sharded (DTensor) steps cannot be captured")
                if not on_torch:
                    if p.device.type != "cpu" or active_emulation() is None:
                        raise GraphCaptureError(
                            f"{name}: emulated_capture() captures CPU tensors updated by the emulated "
                            "kernels: step inside cupylars.testing.emulated_cuda()"
                        )
                    continue
                if p.device.type != "cuda":
                    raise GraphCaptureError(
                        f"{name}: {label} has a parameter on {p.device}; a CUDA graph records only work "
                        "on CUDA tensors (the host backend would run now, not at replay)"
                    )
                if not self._backend(p.device).zero_copy:
                    raise GraphCaptureError(
                        f"{name}: {p.device} tensors are updated through host copies "
                        f"({self._backend(p.device).reason}), which a CUDA graph cannot record"
                    )
                if isinstance(lr, torch.Tensor) and lr.device != p.device:
                    raise GraphCaptureError(
                        f"{name}: {label} has its lr tensor on {lr.device} and parameters on {p.device}: "
                        "a CUDA graph reads lr from device memory at each replay; put lr on "
                        f"{p.device} (or pass a float, frozen at capture)"
                    )

    # -- skipped tensors -------------------------------------------------------------

    def skipped_steps(self) -> dict[str | int, int]:
        """How many steps each tensor skipped for a non-finite gradient (``nonfinite="skip"``).

        Keys are the parameters' names where the param groups carry them
        (``param_names``), else their indices in :meth:`state_dict`; every
        tensor with state is listed, 0 included. Reads the ``skipped``
        counters: one host transfer per device (a sync on CUDA).
        """
        keys: list[str | int] = []
        counters: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                counter = self.state.get(p, {}).get("skipped")
                if isinstance(counter, torch.Tensor):
                    counter = bridge.local_tensor(counter)
                    counters.setdefault(counter.device, []).append((len(keys), counter))
                    keys.append(names[pi] if names else index)
                index += 1
        counts = [0] * len(keys)
        for items in counters.values():
            values = torch.stack([c.reshape(()) for _, c in items]).tolist()
            for (k, _), value in zip(items, values):
                counts[k] = int(value)
        return dict(zip(keys, counts))

    def _look_for_skips(self) -> None:
        """Warn once when a tensor was skipped, reading the counters only now and then."""
        if self._skip_warned:
            return
        self._steps_run += 1
        n = self._steps_run
        early = n <= 64 and n & (n - 1) == 0  # steps 1, 2, 4, ..., 64: a bad start shows at once
        if not (early or n % self.skip_check_interval == 0):
            return
        skipped = {k: v for k, v in self.skipped_steps().items() if v}
        if sum(skipped.values()) <= self._skips_known:
            return
        self._skip_warned = True
        listed = ", ".join(f"{k!r}: {v}" for k, v in list(skipped.items())[:8])
        more = f" and {len(skipped) - 8} more tensors" if len(skipped) > 8 else ""
        warn_caller(
            f"{type(self).__name__} skipped the update of tensors whose gradient held NaN or Inf "
            f"(nonfinite='skip'); steps skipped so far: {listed}{more}. skipped_steps() reads the "
            "counts; nonfinite='raise' stops at the first one. This warning is issued once per optimizer.",
            RuntimeWarning,
        )

    # -- the fast step ---------------------------------------------------------------

    def _plan_groups(self, work: list[_Work]) -> list[_GroupPlan] | None:
        """What the next step may reuse of this one, or None where a step must run in full."""
        if GlobalOptimManager.get_instance().uses_config_override:
            return None  # overrides may follow module attributes and dead registrations
        by_param = {id(w.param): w for w in work}
        plans = []
        for group in self.param_groups:
            params = list(group["params"])
            present = [p.grad is not None for p in params]
            found = [by_param.get(id(p)) for p in params if p.grad is not None]
            items = [w for w in found if w is not None]
            if len(items) != len(found):
                return None  # a gradient appeared after _collect (a hook): no plan
            # Without overrides a group's tensors share one configuration (unused without items).
            struct: tuple = ()
            foreach = False
            if items:
                w = items[0]
                struct = _struct(w.cfg, w.optim_bits, w.min_8bit_size, w.foreach)
                foreach = w.foreach
            with_grad = [w.param for w in items]
            dicts = [self.state[p] for p in with_grad]
            values = list(chain.from_iterable(d.values() for d in dicts))
            if not all(isinstance(v, torch.Tensor) and not bridge.is_dtensor(v) for v in values):
                return None
            buckets: dict[tuple[torch.device, str | None], _Bucket] = {}
            for k, w in enumerate(items):
                backend = self._backend(w.param.device)
                if not backend.zero_copy:
                    return None
                dtype = bridge.dtype_argument(w.fmt)
                bucket = buckets.get((w.param.device, dtype))
                if bucket is None:
                    bucket = buckets[(w.param.device, dtype)] = _Bucket(backend, dtype, [], [], [], [])
                with backend.context():
                    array, state = self._cached_views(backend, w)
                    if array is None:
                        staging = torch.empty_like(w.param.detach(), memory_format=torch.contiguous_format)
                        bucket.staging.append((w.param, staging))
                        array = backend.view(staging)
                bucket.index.append(k)
                bucket.arrays.append(array)
                bucket.states.append(state)
            plans.append(
                _GroupPlan(
                    group=group,
                    params=params,
                    present=present,
                    struct=struct,
                    foreach=foreach,
                    with_grad=with_grad,
                    labels=[w.label for w in items],
                    ptrs=list(map(_DATA_PTR, with_grad)),
                    dtypes=list(map(_DTYPE, with_grad)),
                    shapes=list(map(_SHAPE, with_grad)),
                    strides=list(map(_STRIDE, with_grad)),
                    devices=list(map(_DEVICE, with_grad)),
                    state_dicts=dicts,
                    state_keys=list(chain.from_iterable(dicts)),
                    state_values=values,
                    state_ptrs=list(map(_DATA_PTR, values)),
                    buckets=list(buckets.values()),
                )
            )
        return plans

    def _fast_step(self, capturing: bool = False) -> bool:
        """The step over what the last full step planned, if nothing it relied on changed.

        Checks what a full step would (gradients' layout, dtype, shape and device,
        the group's hyperparameters) and that the parameters' storages and the state
        tensors are those the views were taken of; on any difference it does nothing
        and returns False, and the full step runs (and raises where it should).
        """
        plans = self._plans
        if plans is None or len(plans) != len(self.param_groups):
            return False
        if GlobalOptimManager.get_instance().uses_config_override:
            return False
        dtensor_module = sys.modules.get("torch.distributed.tensor")
        steps = []
        for gi, (group, plan) in enumerate(zip(self.param_groups, plans)):
            params = group["params"]
            if group is not plan.group or len(params) != len(plan.params):
                return False
            if not all(map(is_, params, plan.params)):
                return False
            grads = list(map(_GRAD, params))
            if list(map(is_not, grads, repeat(None))) != plan.present:
                return False
            if not plan.with_grad:
                continue
            grads = list(compress(grads, plan.present))
            try:
                cfg, bits, min8 = _group_config(group, None, f"param group {gi}")
            except (TypeError, ValueError):
                return False  # the full step raises it
            foreach = group.get("foreach", None) is not False
            if _struct(cfg, bits, min8, foreach) != plan.struct:
                return False
            if not self._unchanged(plan, grads, dtensor_module):
                return False
            steps.append((plan, grads, cfg, _device_lr(group, None)))
        if not steps:
            return False
        _raise_on_nonfinite(
            (label, g, cfg) for plan, grads, cfg, _ in steps for label, g in zip(plan.labels, grads)
        )
        for plan, grads, cfg, lr_tensor in steps:
            for bucket in plan.buckets:
                self._update_bucket(
                    bucket, [grads[k] for k in bucket.index], cfg, plan.foreach, lr_tensor, capturing
                )
        torch.autograd.graph.increment_version([p for plan, _, _, _ in steps for p in plan.with_grad])
        return True

    def _unchanged(self, plan: _GroupPlan, grads: list[torch.Tensor], dtensor_module: Any) -> bool:
        params = plan.with_grad
        if (
            list(map(_DATA_PTR, params)) != plan.ptrs
            or list(map(_DTYPE, params)) != plan.dtypes
            or list(map(_SHAPE, params)) != plan.shapes
            or list(map(_STRIDE, params)) != plan.strides
        ):
            return False  # a parameter's storage was replaced (p.data = ...)
        if (
            list(map(_DTYPE, grads)) != plan.dtypes
            or list(map(_SHAPE, grads)) != plan.shapes
            or list(map(_DEVICE, grads)) != plan.devices
            or not all(map(is_, map(_LAYOUT, grads), repeat(torch.strided)))
        ):
            return False
        if dtensor_module is not None and any(map(isinstance, grads, repeat(dtensor_module.DTensor))):
            return False
        if not all(map(is_, map(self.state.get, params), plan.state_dicts)):
            return False
        known: list[dict[str, Any]] = plan.state_dicts  # the same dicts (C-level maps: a hot path)
        if list(chain.from_iterable(known)) != plan.state_keys:
            return False
        values = list(chain.from_iterable(map(dict.values, known)))
        return all(map(is_, values, plan.state_values)) and list(map(_DATA_PTR, values)) == plan.state_ptrs

    def _update_bucket(
        self,
        bucket: _Bucket,
        grads: list[torch.Tensor],
        cfg: LarsConfig,
        foreach: bool,
        lr_tensor: torch.Tensor | None = None,
        capturing: bool = False,
    ) -> None:
        if not all(map(_IS_CONTIGUOUS, grads)):
            if capturing:
                # .contiguous() would copy into memory allocated inside the capture, at another
                # address than the tables hold: name the cause rather than the table rebuild.
                raise GraphCaptureError(
                    f"{type(self).__name__}: a non-contiguous gradient cannot be captured in a CUDA graph"
                )
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        backend = bucket.backend
        arrays, states = bucket.arrays, bucket.states
        # Strided parameters are written back after the step: Ctrl-C is held back until then
        # (cupylars._interrupts), so that the bucket is either not stepped or stepped.
        deferred = interrupts_deferred() if bucket.staging else nullcontext()
        with backend.context(), deferred:
            for param, staging in bucket.staging:
                staging.copy_(param.detach())
            # One batch of every tensor (foreach), or one per tensor.
            if foreach:
                parts = [(arrays, states, grads)]
            else:
                parts = [([a], [s], [g]) for a, s, g in zip(arrays, states, grads)]
            batches = bucket.batches
            if batches is None or not all(
                b.holds_for(part[0], part[1]) for b, part in zip(batches, parts)
            ):
                if capturing:
                    raise GraphCaptureError(
                        f"{type(self).__name__}: the tensors of this step have not been prepared by an "
                        "eager step like it; warm up with at least two eager steps before capturing "
                        "(the first creates the state, the second prepares what the graph reuses)"
                    )
                batches = bucket.batches = [
                    F.prepare(part[0], part[1], dtype=bucket.dtype) for part in parts
                ]
            chosen = batches[0].backend
            lr_array = None
            if lr_tensor is not None:
                if chosen.takes_addresses:
                    lr_array = self._lr_view(backend, lr_tensor)  # read by the kernels when they run
                else:
                    cfg = replace(cfg, lr=lr_tensor.item())  # a host backend: lr on the CPU
            # (They hold for the arrays and states: stepped without checking again.)
            for batch, (part_arrays, part_states, part_grads) in zip(batches, parts):
                if batch.backend.takes_addresses:
                    # The kernels need only the gradients' addresses: no array views of them.
                    addresses = list(map(_DATA_PTR, part_grads))
                    batch.step(part_arrays, None, part_states, cfg, addresses, lr_array)
                else:
                    views = [backend.view(g) for g in part_grads]
                    batch.step(part_arrays, views, part_states, cfg)
            if capturing:
                # The gradients too: a backward inside the capture allocated them (after
                # zero_grad(set_to_none=True)) and the graph's lars_set_grads launches write
                # their addresses at every replay, so they must outlive any p.grad = None.
                self._keep_for_graphs(
                    *batches, lr_tensor, lr_array, *(s for _, s in bucket.staging), *grads
                )
            for param, staging in bucket.staging:
                param.detach().copy_(staging)
        self.backends[str(backend.device)] = f"{chosen.name}: {chosen.reason}; {backend.reason}"

    def _keep_for_graphs(self, *objects: Any) -> None:
        held = self._graph_keepalive
        known = set(map(id, held))  # identity, not equality (tensors compare elementwise)
        for obj in objects:
            if obj is not None and id(obj) not in known:
                held.append(obj)
                known.add(id(obj))

    def _lr_view(self, backend: bridge.DeviceBackend, lr: torch.Tensor) -> Any:
        """An array view of a capturable group's lr tensor (cached while its storage stays)."""
        key = (backend.array_module, "lr", _fingerprint(lr))
        cached = self._views.get(lr)
        if cached is not None and cached[0] == key:
            return cached[1]
        view = backend.view(lr.detach())
        self._views[lr] = (key, view)
        return view

    def _collect(self) -> list[_Work]:
        manager = GlobalOptimManager.get_instance()
        work: list[_Work] = []
        for gi, group in enumerate(self.param_groups):
            base: tuple[LarsConfig, int, int] | None = None
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                label = f"parameter {names[pi]!r}" if names else f"parameter {pi} of param group {gi}"
                if grad.is_sparse or grad.layout != torch.strided:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients: {label} has a "
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
                    raise TypeError(
                        f"{label}: the parameter and its gradient must both be DTensors or neither"
                    )
                override = manager.config_for(gi, pi, p)
                if override is None:
                    if base is None:
                        base = _group_config(group, None, f"param group {gi}")
                    config = base
                else:
                    config = _group_config(group, override, f"{label} (with GlobalOptimManager overrides)")
                foreach = group.get("foreach", None) is not False
                lr_tensor = _device_lr(group, override)
                work.append(_Work(p, grad, *config, fmt, label, is_sharded, foreach, lr_tensor))
        return work

    def _check_disjoint(self) -> None:
        """Refuse parameters that share memory, across every param group: each is updated
        on its own, so a shared element would be stepped twice (or raced on)."""
        labels: list[str] = []
        tensors: list[torch.Tensor] = []
        for gi, group in enumerate(self.param_groups):
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
                f"{type(self).__name__}: {labels[b]} {what} {labels[a]}: each parameter must own its "
                "memory, or a step would update the shared elements twice"
            )

    def _prepare_state(self, w: _Work) -> None:
        """Create, translate or move ``w``'s state so that the update can take views of it."""
        p = w.param
        state = self.state[p]
        if state and not checkpoint.is_canonical(state):
            # Written directly (ZeroRedundancyOptimizer.load_state_dict does) in a foreign layout.
            is_8bit = w.optim_bits == 8 and p.numel() >= w.min_8bit_size
            state = checkpoint.import_param_state(p, state, label=w.label, eight_bit=is_8bit)
            self.state[p] = state
        device = bridge.local_tensor(p).device
        for key, value in state.items():
            # Zero-dim counters may have been moved to the CPU (ZeroRedundancyOptimizer does),
            # or the model moved after the state was created.
            if isinstance(value, torch.Tensor) and not bridge.is_dtensor(value) and value.device != device:
                state[key] = value.to(device)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=device)
            state["skipped"] = torch.zeros((), dtype=torch.int64, device=device)
        if w.cfg.uses_momentum and "state1" not in state:
            is_8bit = w.optim_bits == 8 and p.numel() >= w.min_8bit_size
            if w.sharded:
                from . import sharded

                state.update(sharded.new_momentum_state(cast(Any, p), is_8bit))  # a DTensor
            elif is_8bit:
                state["state1"] = torch.full(p.shape, ZERO_CODE, dtype=torch.uint8, device=device)
                state["absmax1"] = torch.zeros(num_blocks(p.numel()), dtype=torch.float32, device=device)
            else:
                state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=device)
        if w.cfg.clips_percentile and "gnorm_vec" not in state:
            state["gnorm_vec"] = torch.full((HISTORY_SIZE,), UNRECORDED, dtype=torch.float32, device=device)

    # -- dense tensors ---------------------------------------------------------------

    def _backend(self, device: torch.device) -> bridge.DeviceBackend:
        backend = self._device_backends.get(device)
        if backend is None:
            backend = self._device_backends[device] = bridge.backend_for_device(device)
            if not backend.zero_copy and backend.reason not in self._warned:
                self._warned.add(backend.reason)
                warn_caller(f"cupylars.optim: {backend.reason}", RuntimeWarning)
        return backend

    def _update_dense(self, dense: list[_Work]) -> None:
        # Group per device, hyperparameters and dtype argument: each group is one update call
        # (float32 and float16 tensors share one; bfloat16 must be declared, so it has its own).
        # A device lr is part of the key by identity (its value is not known on the host).
        buckets: dict[tuple[torch.device, str | None, LarsConfig, bool, int], list[_Work]] = {}
        for w in dense:
            key = (w.param.device, bridge.dtype_argument(w.fmt), w.cfg, w.foreach, id(w.lr_tensor))
            buckets.setdefault(key, []).append(w)
        for (device, dtype, cfg, foreach, _), items in buckets.items():
            backend = self._backend(device)
            lr_tensor = items[0].lr_tensor
            if backend.zero_copy:
                self._update_views(backend, items, cfg, dtype, foreach, lr_tensor)
            else:
                if lr_tensor is not None:
                    cfg = replace(cfg, lr=lr_tensor.item())  # updated on the host: lr on the host
                self._update_host_copies(backend, items, cfg, dtype, foreach)

    def _update_views(
        self,
        backend: bridge.DeviceBackend,
        items: list[_Work],
        cfg: LarsConfig,
        dtype: str | None,
        foreach: bool,
        lr_tensor: torch.Tensor | None = None,
    ) -> None:
        with backend.context():
            params, grads, states, copied = [], [], [], []
            for w in items:
                param, state = self._cached_views(backend, w)
                if param is None:
                    # The CUDA kernels address dense memory: a strided parameter (channels_last,
                    # a slice) is updated in a contiguous copy and copied back.
                    dense_copy = w.param.detach().contiguous()
                    copied.append((w.param, dense_copy))
                    param = backend.view(dense_copy)
                grad = w.grad if w.grad.is_contiguous() else w.grad.contiguous()
                params.append(param)
                grads.append(backend.view(grad))
                states.append(state)
            lr_array = None
            if lr_tensor is not None:
                if F.backend_for(params[:1]).takes_addresses:
                    lr_array = self._lr_view(backend, lr_tensor)
                else:
                    cfg = replace(cfg, lr=lr_tensor.item())
            _run(params, grads, states, cfg, dtype, foreach, lr_array)
            for param, dense_copy in copied:
                param.detach().copy_(dense_copy)
        chosen = F.backend_for(params[:1])
        self.backends[str(backend.device)] = f"{chosen.name}: {chosen.reason}; {backend.reason}"

    def _cached_views(self, backend: bridge.DeviceBackend, w: _Work) -> tuple[Any, LarsState]:
        """Array views of a parameter and its state, rebuilt only when a storage changed."""
        p = w.param.detach()
        state = self.state[w.param]
        tensors = (p, *(state.get(k) for k in ("step", "skipped", "state1", "absmax1", "gnorm_vec")))
        key = (backend.array_module, w.fmt, *map(_fingerprint, tensors))
        cached = self._views.get(w.param)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        param = backend.view(p) if p.is_contiguous() else None
        arrays = {k: backend.view(v) for k, v in state.items()}
        lars_state = self._lars_state(w, arrays, self._scratch_history(backend))
        self._views[w.param] = (key, param, lars_state)
        return param, lars_state

    def _scratch_history(self, backend: bridge.DeviceBackend) -> Any:
        # States without percentile clipping keep no history tensor; the update never writes
        # the history then, so one array per device serves them all.
        key = (backend.array_module, backend.device)
        if key not in self._scratch:
            self._scratch[key] = backend.scratch_history()
        return self._scratch[key]

    @staticmethod
    def _lars_state(w: _Work, arrays: dict[str, Any], history: Any) -> LarsState:
        """A LarsState around arrays of the state tensors (keyed like the state)."""
        s1 = arrays.get("state1")
        is_8bit = s1.dtype == "uint8" if s1 is not None else w.optim_bits == 8
        return LarsState(
            shape=tuple(w.param.shape),
            param_format=w.fmt,
            is_8bit=bool(is_8bit),
            step_count=arrays["step"],
            skip_count=arrays["skipped"],
            history=arrays.get("gnorm_vec", history),
            momentum=None if is_8bit else s1,
            codes=s1 if is_8bit else None,
            absmax=arrays.get("absmax1"),
        )

    def _update_host_copies(
        self,
        backend: bridge.DeviceBackend,
        items: list[_Work],
        cfg: LarsConfig,
        dtype: str | None,
        foreach: bool,
    ) -> None:
        params, grads, states, written = [], [], [], []
        for w in items:
            host_param, param = backend.stage(w.param)
            written.append((w.param, host_param))
            params.append(param)
            grads.append(backend.stage(w.grad)[1])
            state = self.state[w.param]
            host_state = {k: backend.stage(v) for k, v in state.items()}
            written.extend((state[k], host) for k, (host, _) in host_state.items())
            arrays = {k: array for k, (_, array) in host_state.items()}
            states.append(self._lars_state(w, arrays, backend.scratch_history()))
        _run(params, grads, states, cfg, dtype, foreach)
        for tensor, host in written:
            backend.commit(tensor, host)
        chosen = F.backend_for(params[:1])
        self.backends[str(backend.device)] = f"{chosen.name}: {chosen.reason}; {backend.describe()}"

    # -- checkpoints -----------------------------------------------------------------

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class, bitsandbytes' LARS or torch.optim.SGD.

        Tensors are copied to each parameter's device, in the dtypes the state
        needs (unlike torch's default, floating state is never cast to the
        parameter's dtype and uint8 codes stay uint8). The whole state dict is
        checked before the optimizer changes; a mismatch raises naming it.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer "
                f"{len(self.param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {i} has {len(group['params'])} parameters, the loaded state dict "
                    f"{len(saved['params'])}"
                )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        groups = []
        # Whether each tensor's momentum is kept in 8 bits under the loaded hyperparameters
        # (and per-tensor overrides), as _prepare_state would create it.
        eight_bit: dict[int, bool] = {}
        changed_bits: list[str] = []
        manager = GlobalOptimManager.get_instance()
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            merged = checkpoint.import_param_group(saved, group, label=f"param group {i}")
            _, group_bits, group_min_size = _group_config(merged, None, f"loaded param group {i}")
            groups.append(merged)
            if merged["optim_bits"] != group["optim_bits"]:
                # Saved hyperparameters win, as in torch; for optim_bits that changes the memory
                # the optimizer holds, so it is said (a LARS8bit loading a LARS32bit checkpoint).
                changed_bits.append(
                    f"param group {i}: the checkpoint sets optim_bits={merged['optim_bits']} "
                    f"(this optimizer had {group['optim_bits']}); loaded momentum keeps its format "
                    "and new momentum follows the checkpoint"
                )
            for j, p in enumerate(merged["params"]):
                override = manager.config_for(i, j, p)
                bits, min_size = group_bits, group_min_size
                if override:
                    _, bits, min_size = _group_config(merged, override, f"loaded param group {i}")
                eight_bit[id(p)] = bits == 8 and p.numel() >= min_size
        state: dict[Any, Any] = {}
        for key, value in state_dict["state"].items():
            if key in id_map:
                p = id_map[key]
                state[p] = checkpoint.import_param_state(
                    p, value, label=f"state of parameter {key}", eight_bit=eight_bit[id(p)]
                )
            else:
                state[key] = value  # kept as is, as torch does, for state not tied to a parameter
        new_state: defaultdict[Any, Any] = defaultdict(dict)
        new_state.update(state)
        self.__setstate__({"state": new_state, "param_groups": groups})
        for message in changed_bits:
            warn_caller(message)
        # Skips recorded in the checkpoint were reported (or not) by the optimizer that made it.
        self._skips_known = sum(self.skipped_steps().values())
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _raise_on_nonfinite(items: Iterable[tuple[str, torch.Tensor, LarsConfig]]) -> None:
    """nonfinite='raise' across the whole step: a step makes one update call per device and
    configuration, so every "raise" tensor is checked up front, before any call updates."""
    bad = [label for label, g, cfg in items if cfg.nonfinite == "raise" and not bool(torch.isfinite(g).all())]
    if bad:
        raise nonfinite_error(bad)


def _run(
    params: list[Any],
    grads: list[Any],
    states: list[LarsState],
    cfg: LarsConfig,
    dtype: str | None,
    foreach: bool,
    lr_device: Any | None = None,
) -> None:
    """The multi-tensor path (one call) or the per-tensor path (one call per tensor)."""
    if lr_device is not None:
        # lars_update_many reads lr from the config only: prepared batches take a device lr.
        parts = [range(len(params))] if foreach else [range(k, k + 1) for k in range(len(params))]
        for ks in parts:
            p, g, s = [params[k] for k in ks], [grads[k] for k in ks], [states[k] for k in ks]
            F.prepare(p, s, dtype=dtype).update(p, g, s, cfg, lr_device=lr_device)
        return
    if foreach:
        F.lars_update_many(params, grads, states, config=cfg, dtype=dtype)
    else:
        for param, grad, state in zip(params, grads, states):
            F.lars_update_many([param], [grad], [state], config=cfg, dtype=dtype)


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


def _capturing() -> bool:
    """Whether this thread's current stream is capturing a CUDA graph (or an emulated one)."""
    if emulated_capture_active():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _device_lr(group: dict[str, Any], override: dict[str, Any] | None) -> torch.Tensor | None:
    """A capturable group's tensor lr, which the kernels read from device memory (None: lr is
    a number, or a per-tensor override replaces it)."""
    lr = group["lr"]
    if not group.get("capturable", False) or not isinstance(lr, torch.Tensor):
        return None
    if override and "lr" in override:
        return None
    return lr


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


def _group_config(
    group: dict[str, Any], override: dict[str, Any] | None, label: str
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
            # Read by the kernels on the device (_device_lr): reading it here would synchronise
            # (and cannot be captured). Its value is therefore not validated (lr >= 0).
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


def _fixed_bits_init(
    self: LARS,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float | torch.Tensor,
    momentum: float = 0,
    dampening: float = 0,
    weight_decay: float = 0,
    nesterov: bool = False,
    args: Any = None,
    min_8bit_size: int = 4096,
    percentile_clipping: int = 100,
    max_unorm: float = 0.02,
    *,
    trust_coefficient: float = 0.0,
    trust_clip: bool = False,
    eps: float = 1e-8,
    nonfinite: str = "skip",
    foreach: bool | None = None,
    capturable: bool = False,
) -> None:
    """The signature of LARS8bit and LARS32bit: bitsandbytes' LARS less optim_bits."""


_FIXED_BITS_SIGNATURE = inspect.signature(_fixed_bits_init)
# What inspect.signature shows for the classes: the same without self.
_FIXED_BITS_CLASS_SIGNATURE = _FIXED_BITS_SIGNATURE.replace(
    parameters=list(_FIXED_BITS_SIGNATURE.parameters.values())[1:],
    return_annotation=inspect.Signature.empty,
)


class _FixedBitsLARS(LARS):
    """LARS with ``optim_bits`` fixed by the subclass (bitsandbytes' signature less optim_bits).

    The arguments are bound here rather than by Python so that a wrong call names the
    public class (LARS8bit, LARS32bit) instead of this shared base.
    """

    _OPTIM_BITS: int
    __signature__ = _FIXED_BITS_CLASS_SIGNATURE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        if "optim_bits" in kwargs:
            other = 32 if self._OPTIM_BITS == 8 else 8
            raise TypeError(
                f"{name} fixes the bit width of its momentum at {self._OPTIM_BITS} and takes no "
                f"optim_bits argument (got optim_bits={kwargs['optim_bits']!r}); use "
                f"LARS{other}bit for {other}-bit momentum, or LARS(..., optim_bits=...) to choose"
            )
        try:
            bound = _FIXED_BITS_SIGNATURE.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        bound.apply_defaults()
        a = bound.arguments
        super().__init__(
            a["params"],
            a["lr"],
            a["momentum"],
            a["dampening"],
            a["weight_decay"],
            a["nesterov"],
            self._OPTIM_BITS,
            a["args"],
            a["min_8bit_size"],
            a["percentile_clipping"],
            a["max_unorm"],
            trust_coefficient=a["trust_coefficient"],
            trust_clip=a["trust_clip"],
            eps=a["eps"],
            nonfinite=a["nonfinite"],
            foreach=a["foreach"],
            capturable=a["capturable"],
        )


class LARS8bit(_FixedBitsLARS):
    __doc__ = _DOC.format(
        bits="8-bit ",
        summary="blockwise 8-bit codes for tensors of at least ``min_8bit_size`` elements, "
        "float32 for smaller ones.",
        bits_arg="",
    )
    _OPTIM_BITS = 8


class LARS32bit(_FixedBitsLARS):
    __doc__ = _DOC.format(bits="32-bit ", summary="float32 momentum for every tensor.", bits_arg="")
    _OPTIM_BITS = 32
