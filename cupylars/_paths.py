"""Where the CUDA sources live.

``rawkernels/`` sits at the top of the repository; ``cupylars/rawkernels`` is
a link to it, so the sources ship inside wheels (as package data) and are
found the same way from a checkout, an editable install or a wheel.
``CUPYLARS_KERNEL_DIR`` overrides the location (to try modified sources).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["kernel_dir"]


def kernel_dir() -> Path:
    """The directory holding the ``.cu``/``.cuh`` sources (and ``cpu_shim/``)."""
    override = os.environ.get("CUPYLARS_KERNEL_DIR")
    path = Path(override) if override else Path(__file__).resolve().parent / "rawkernels"
    if not path.is_dir():
        raise FileNotFoundError(f"CUDA kernel sources not found at {path} (set CUPYLARS_KERNEL_DIR)")
    return path
