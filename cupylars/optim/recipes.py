"""Parameter-group recipes for LARS."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["exclude_bias_and_norm"]


def exclude_bias_and_norm(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups for the usual LARS recipe.

    Weight matrices and convolution kernels (``ndim > 1``) get ``weight_decay``
    and the optimizer's adaptation; biases and normalisation parameters
    (``ndim <= 1``) get neither: ``weight_decay=0``, ``max_unorm=0`` and
    ``trust_coefficient=0``, so they train as plain momentum SGD. Frozen
    parameters (``requires_grad=False``) are left out, each shared parameter
    appears once, and an empty group is omitted::

        opt = LARS8bit(exclude_bias_and_norm(model, 1e-4), lr=0.2, momentum=0.9,
                       trust_coefficient=0.001)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"exclude_bias_and_norm expects a torch.nn.Module, got {type(model).__name__}")
    decay: list[torch.Tensor] = []
    plain: list[torch.Tensor] = []
    for p in model.parameters():  # parameters() yields each shared tensor once
        if p.requires_grad:
            (decay if p.ndim > 1 else plain).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "max_unorm": 0.0, "trust_coefficient": 0.0})
    if not groups:
        raise ValueError("the model has no parameter that requires a gradient")
    return groups
