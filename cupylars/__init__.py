"""cupylars: LARS optimizers with fused CUDA kernels and 8-bit state.

``cupylars.functional`` holds the framework-agnostic update functions (NumPy
or CuPy arrays); ``cupylars.optim`` the torch.optim adapter. Neither CuPy nor
torch is imported by ``import cupylars``. ``python -m cupylars`` (or
:func:`show_config`) shows what runs here and checks it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"
"""The package version (PEP 440), also the wheel's."""
__all__ = ["__version__", "functional", "optim", "show_config", "testing"]


def show_config(*args: Any, **kwargs: Any) -> None:
    """Print versions, backends and a self-test (:func:`cupylars.diagnostics.show_config`)."""
    from .diagnostics import show_config as show

    show(*args, **kwargs)


def __getattr__(name: str) -> Any:
    # Submodules load on first use, so importing the package never imports torch or CuPy.
    if name in ("functional", "optim", "testing", "reference", "quantization", "cuda", "diagnostics"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cupylars' has no attribute {name!r}")
