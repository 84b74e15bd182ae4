r"""torch.optim LARS optimizers backed by :mod:`cupylars.functional`.

The public classes live here; a step is a plan (:mod:`cupylars.optim.step_plan`)
built from the param groups (:mod:`cupylars.optim.groups`) and run bucket by
bucket (:mod:`cupylars.optim.buckets`), reused while it matches; CUDA graph
capture is :mod:`cupylars.optim.capture`.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from .._warnings import warn_caller
from ..config import HYPERPARAMETERS
from ..cuda_runtime import GraphCaptureError
from . import bridge, capture, checkpoint, step_plan
from .groups import group_config
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
        group_config(defaults, None, type(self).__name__)
        self._init_runtime()
        super().__init__(params, defaults)

    # -- construction and pickling ---------------------------------------------------

    def _init_runtime(self) -> None:
        # What is rebuilt, never saved.
        # The plan of the last step, reused while it matches (None: the next step builds one).
        self._plan: step_plan.StepPlan | None = None
        # What captured CUDA graphs address: kept as long as the optimizer, across
        # load_state_dict, so that no replay reads memory freed after its capture.
        self._graph_keepalive: list[Any] = getattr(self, "_graph_keepalive", [])
        self._resources = step_plan.StepResources(self._graph_keepalive)
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
            group_config(group, None, label)
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
        owner = type(self).__name__
        capturing = capture.capturing()
        if capturing:
            # Inside a CUDA graph capture only a repeat of the last step, launches and nothing
            # else, may run; whatever else this step would do raises here, before anything
            # is recorded.
            capture.check_capturable(owner, self.param_groups, self._resources.backend)
        plan = self._plan
        if plan is None or not plan.matches(self.param_groups, self.state):
            self._plan = None
            if capturing:
                raise capture.not_a_repeat(owner)
            plan = step_plan.build(owner, self.param_groups, self.state, self._resources)
            if plan is None:
                return loss  # no gradients
        elif capturing and not plan.warm:
            raise capture.not_warm(owner)
        plan.run(self.backends, self._resources.keep, capturing, owner)
        self._plan = plan if plan.reusable else None
        if not capturing:  # (a look at the skip counters reads the device)
            self._look_for_skips()
        return loss

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
            _, group_bits, group_min_size = group_config(merged, None, f"loaded param group {i}")
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
                    _, bits, min_size = group_config(merged, override, f"loaded param group {i}")
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
