"""CUDA graph capture of an optimizer step: whether one is in progress, whether this step
may be captured, and the memory a captured graph addresses.

Only a repeat of the last eager step may be captured (:mod:`cupylars.optim.step_plan`:
the plan matches): its launches are recorded and nothing else runs. Everything that
would do more (create state, prepare tables, read the device) raises
:class:`~cupylars.cuda_runtime.GraphCaptureError` here, before anything is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import backends
from ..cuda_runtime import GraphCaptureError, capturing_runtime
from . import bridge
from .manager import GlobalOptimManager

__all__ = ["KeepAlive", "capturing", "check_capturable", "not_a_repeat", "not_warm"]


def capturing() -> bool:
    """Whether this thread's current stream is capturing a CUDA graph (or an emulated one)."""
    return capturing_runtime() is not None


def not_a_repeat(owner: str) -> GraphCaptureError:
    return GraphCaptureError(
        f"{owner}: this step cannot be captured in a CUDA graph: it is not "
        "a repeat of the last step outside the capture (the first step creates the "
        "state, and a change of param groups, gradients present, dtypes, shapes, "
        "devices, parameter storage, state tensors or optim_bits/momentum/percentile "
        "switches needs new tables). Run the same step once outside the capture "
        "(warm-up), then capture"
    )


def not_warm(owner: str) -> GraphCaptureError:
    return GraphCaptureError(
        f"{owner}: the tensors of this step have not been prepared by an "
        "eager step like it; warm up with at least two eager steps before capturing "
        "(the first creates the state, the second prepares what the graph reuses)"
    )


def check_capturable(
    owner: str,
    param_groups: Sequence[dict[str, Any]],
    device_backend: Callable[[torch.device], bridge.DeviceBackend],
) -> None:
    """Raise, naming the reason, when a step cannot be captured in a CUDA graph."""
    if GlobalOptimManager.get_instance().uses_config_override:
        raise GraphCaptureError(
            f"{owner}: steps with GlobalOptimManager overrides cannot be captured in a CUDA graph "
            "(the overrides are resolved on the host at every step)"
        )
    on_torch = capturing_runtime() != "emulated-cuda"
    forced = backends.forced()
    emulated_kernels = forced is not None and forced.name == "emulated-cuda"
    for gi, group in enumerate(param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        label = f"param group {gi}"
        if not group.get("capturable", False):
            raise GraphCaptureError(
                f"{owner}: a step is being captured in a CUDA graph but {label} has "
                "capturable=False; pass capturable=True (to the optimizer or the group)"
            )
        if group["nonfinite"] == "raise":
            raise GraphCaptureError(
                f"{owner}: {label} has nonfinite='raise', which checks the gradients on the host "
                "(a synchronisation) and cannot be captured in a CUDA graph; use 'skip' or 'propagate'"
            )
        lr = group["lr"]
        for p in params:
            if bridge.is_dtensor(p):
                raise GraphCaptureError(f"{owner}: {label}: sharded (DTensor) steps cannot be captured")
            if not on_torch:
                if p.device.type != "cpu" or not emulated_kernels:
                    raise GraphCaptureError(
                        f"{owner}: emulated_capture() captures CPU tensors updated by the emulated "
                        "kernels: step inside cupylars.testing.emulated_cuda()"
                    )
                continue
            if p.device.type != "cuda":
                raise GraphCaptureError(
                    f"{owner}: {label} has a parameter on {p.device}; a CUDA graph records only work "
                    "on CUDA tensors (the host backend would run now, not at replay)"
                )
            backend = device_backend(p.device)
            if not backend.zero_copy:
                raise GraphCaptureError(
                    f"{owner}: {p.device} tensors are updated through host copies "
                    f"({backend.reason}), which a CUDA graph cannot record"
                )
            if isinstance(lr, torch.Tensor) and lr.device != p.device:
                raise GraphCaptureError(
                    f"{owner}: {label} has its lr tensor on {lr.device} and parameters on {p.device}: "
                    "a CUDA graph reads lr from device memory at each replay; put lr on "
                    f"{p.device} (or pass a float, frozen at capture)"
                )


class KeepAlive:
    """What captured CUDA graphs address (prepared batches holding tables and scratch, lr
    tensors, staging copies, gradients): kept as long as the optimizer, across
    load_state_dict and new step plans, so that no replay reads memory freed after its
    capture."""

    def __init__(self, held: list[Any]) -> None:
        self.held = held  # the optimizer's list (it survives __setstate__)

    def hold(self, *objects: Any) -> None:
        held = self.held
        known = set(map(id, held))  # identity, not equality (tensors compare elementwise)
        for obj in objects:
            if obj is not None and id(obj) not in known:
                held.append(obj)
                known.add(id(obj))
