"""Warnings attributed to the user's line, however deep in cupylars or torch they arise.

A fixed ``stacklevel`` counts frames that torch's decorators (``no_grad``, the
``torch.compile`` graph break, optimizer hooks) add or remove from one torch
release to the next; walking out of both packages names the caller's line in all.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import FrameType

__all__ = ["warn_caller"]

_CUPYLARS = str(Path(__file__).resolve().parent)


def _internal(filename: str) -> bool:
    if filename.startswith(_CUPYLARS):
        return True
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    return torch_file is not None and filename.startswith(str(Path(torch_file).resolve().parent))


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside cupylars and torch."""
    frame: FrameType | None = sys._getframe(1)  # warn's stacklevel 2: who called warn_caller
    level = 2
    while frame is not None and _internal(str(Path(frame.f_code.co_filename).resolve())):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
