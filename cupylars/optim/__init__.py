"""Drop-in torch.optim LARS optimizers (bitsandbytes' API) over cupylars' kernels.

::

    import cupylars.optim

    opt = cupylars.optim.LARS8bit(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

CUDA tensors are updated by the CUDA kernels through zero-copy CuPy views
(DLPack) on torch's current stream; CPU tensors by the native CPU backend (the
kernels' math compiled for the host; the NumPy reference without a C++ compiler
or with ``CUPYLARS_BACKEND=reference``) through zero-copy NumPy views.
``opt.backends`` names the backend of each device and why. See docs/torch.md.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ModuleNotFoundError as _exc:
    if _exc.name != "torch":
        raise  # torch is there but something it needs is not: that error says what
    raise ImportError(
        "cupylars.optim needs torch, which is not installed: pip install torch "
        '(from a cupylars checkout: pip install ".[torch]")'
    ) from _exc

from .lars import LARS, LARS8bit, LARS32bit
from .manager import GlobalOptimManager
from .recipes import exclude_bias_and_norm

__all__ = ["LARS", "GlobalOptimManager", "LARS8bit", "LARS32bit", "exclude_bias_and_norm"]
