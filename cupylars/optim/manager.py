"""Per-parameter hyperparameter overrides, with bitsandbytes' GlobalOptimManager usage.

::

    mng = cupylars.optim.GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())
    opt = cupylars.optim.LARS8bit(model.parameters(), lr=0.1, momentum=0.9)
    mng.override_config(model.fc1.weight, "optim_bits", 32)      # keep 32-bit momentum
    mng.override_config(model.fc2.weight, key_value_dict={"max_unorm": 0.0})

Overrides are found by the parameter itself, so unlike bitsandbytes the order
of ``register_parameters`` and ``override_config`` does not matter. The
positions recorded by ``register_parameters`` still apply, as in bitsandbytes,
to tensors that replaced a registered one (``p = p.cuda()`` on a plain
tensor). Overrides are validated when made and again at every step.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..config import HYPERPARAMETERS, LarsConfig, validate_min_8bit_size, validate_optim_bits

__all__ = ["OVERRIDABLE", "GlobalOptimManager"]

#: Keys that ``override_config`` accepts: every per-group hyperparameter of the LARS optimizers.
OVERRIDABLE = frozenset((*HYPERPARAMETERS, "optim_bits", "min_8bit_size"))


def _validate(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(config) - OVERRIDABLE
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)}: LARS hyperparameters are {sorted(OVERRIDABLE)}")
    config = dict(config)
    if "optim_bits" in config:
        validate_optim_bits(config["optim_bits"])
    if "min_8bit_size" in config:
        validate_min_8bit_size(config["min_8bit_size"])
    # Check each value on its own against the config rules (cross-field rules such as
    # nesterov's need for momentum are checked at the step, with the group's values).
    probe = {k: v for k, v in config.items() if k not in ("optim_bits", "min_8bit_size", "nesterov")}
    probe.setdefault("lr", 0.0)
    LarsConfig(**probe)
    if "nesterov" in config and not isinstance(config["nesterov"], (bool, int)):
        raise TypeError(f"nesterov must be a bool, got {config['nesterov']!r}")
    return config


class GlobalOptimManager:
    """Process-wide registry of per-parameter hyperparameter overrides.

    Get it with :meth:`get_instance` (constructing it directly raises, as in
    bitsandbytes). Every cupylars LARS optimizer consults it at every step.
    """

    _instance: GlobalOptimManager | None = None

    def __init__(self) -> None:
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        """The process's manager (created at the first call)."""
        if cls._instance is None:
            instance = cls.__new__(cls)
            instance.initialize()
            cls._instance = instance
        return cls._instance

    def initialize(self) -> None:
        """Forget every override and registration."""
        self._by_param: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # (group index, param index) -> weak reference to the registered tensor.
        self._positions: dict[tuple[int, int], weakref.ref[torch.Tensor]] = {}
        # Overrides a registered tensor had when it was registered, kept by position for the
        # tensor that replaces it (the registered one may be gone by the step).
        self._position_configs: dict[tuple[int, int], dict[str, Any]] = {}
        self._module_overrides: list[tuple[weakref.ref[torch.nn.Module], str, dict[str, Any]]] = []
        self.uses_config_override = False

    # -- bitsandbytes' API -------------------------------------------------------------

    def register_parameters(self, params: Iterable[Any]) -> None:
        """Record the positions of ``params`` (tensors or param-group dicts).

        A tensor later found at a registered position of an optimizer takes the
        overrides of the tensor registered there.
        """
        groups = list(params)
        if not groups:
            return
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g, group in enumerate(groups):
            tensors = group["params"]
            tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            for i, p in enumerate(tensors):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"register_parameters got a {type(p).__name__}, expected tensors")
                self._positions[(g, i)] = weakref.ref(p)
                if p in self._by_param:
                    self._position_configs[(g, i)] = self._by_param[p]
                else:
                    self._position_configs.pop((g, i), None)

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: Mapping[str, Any] | None = None,
    ) -> None:
        """Override hyperparameters of ``parameters`` in every LARS optimizer.

        Give either ``key`` and ``value`` or ``key_value_dict``. Keys are the
        optimizer's hyperparameters (see :data:`OVERRIDABLE`), e.g.
        ``optim_bits`` (which takes effect when the tensor's state is created),
        ``max_unorm``, ``lr`` or ``weight_decay``.
        """
        if key is not None and key_value_dict is not None:
            raise ValueError("give either key and value, or key_value_dict, not both")
        if key is not None:
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config needs key and value, or a non-empty key_value_dict")
        config = _validate(key_value_dict)
        tensors = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"override_config got a {type(p).__name__}, expected tensors")
        for p in tensors:
            self._by_param.setdefault(p, {}).update(config)
        self.uses_config_override = True

    def register_module_override(
        self, module: torch.nn.Module, param_name: str, config: Mapping[str, Any]
    ) -> None:
        """Override ``module.<param_name>``'s hyperparameters, whatever tensor it holds at the step."""
        if not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise ValueError(f"{type(module).__name__} has no tensor attribute {param_name!r}")
        self._module_overrides.append((weakref.ref(module), param_name, _validate(config)))
        self.uses_config_override = True

    # -- used by the optimizers --------------------------------------------------------

    def config_for(self, group_index: int, param_index: int, param: torch.Tensor) -> dict[str, Any] | None:
        """The overrides that apply to ``param`` at this position, or None."""
        if not self.uses_config_override:
            return None
        config: dict[str, Any] = {}
        position = (group_index, param_index)
        ref = self._positions.get(position)
        if ref is not None and ref() is not param:
            registered = ref()
            if registered is not None and registered in self._by_param:
                config.update(self._by_param[registered])
            elif position in self._position_configs:
                config.update(self._position_configs[position])
        for module_ref, name, module_config in self._module_overrides:
            module = module_ref()
            if module is not None and getattr(module, name, None) is param:
                config.update(module_config)
        if param in self._by_param:
            config.update(self._by_param[param])
        return config or None
