"""The ```python examples of README.md and docs/*.md run as written.

Convention (for whoever writes a page):

- Every ```python block runs. The blocks of one page run in order, in one namespace, so a
  later block may use what an earlier one defined.
- A block needing a GPU is preceded by ``<!-- needs: gpu -->`` and is skipped without a
  CUDA device (CuPy and torch both seeing one); ``<!-- needs: bitsandbytes -->`` skips
  it where bitsandbytes does not import.
- A block that is not a program (a signature listing) or needs more than one process is
  preceded by ``<!-- not run: reason -->``; the reason is required.
- The placeholders pages use without defining them are defined here, not in the pages:
  ``compute_grad(param)`` (a random gradient like ``param``), ``model`` (a small torch
  module with ``embed`` and ``head`` layers), ``loader`` (a few (x, y) batches for it),
  ``loss_fn``, ``x`` and ``y``.

Blocks in other languages (```bash) are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def code_blocks(page: Path) -> list[tuple[int, str | None, str]]:
    """(line number, marker or None, code) of every ```python block of ``page``."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("marker"), m.group("code"))
        for m in _BLOCK.finditer(text)
    ]


def _has_gpu() -> bool:
    try:
        import cupy
        import torch

        return torch.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean no GPU here
        return False


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _skip_reason(marker: str | None) -> str | None:
    """Why a block with ``marker`` does not run here (None: it runs)."""
    if marker is None:
        return None
    if marker.startswith("not run:"):
        reason = marker.removeprefix("not run:").strip()
        assert reason, "a <!-- not run: ... --> marker must give its reason"
        return reason
    if marker == "needs: gpu":
        return None if _has_gpu() else "needs a CUDA GPU"
    if marker == "needs: bitsandbytes":
        return None if _has_bitsandbytes() else "needs bitsandbytes"
    raise AssertionError(f"unknown example marker <!-- {marker} -->")


def _placeholders() -> dict[str, object]:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)

    def compute_grad(param):
        if isinstance(param, torch.Tensor):
            return torch.randn_like(param) * 0.1
        return (rng.standard_normal(param.shape) * 0.1).astype(param.dtype)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(8, 16)
            self.norm = torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.embed(x))))

    torch.manual_seed(0)
    loader = [(torch.randn(32, 8), torch.randint(0, 4, (32,))) for _ in range(3)]
    x, y = loader[0]
    return {
        "compute_grad": compute_grad,
        "model": Model(),
        "loader": loader,
        "loss_fn": torch.nn.functional.cross_entropy,
        "x": x,
        "y": y,
    }


PAGES = [page for page in ALL_PAGES if code_blocks(page)]


def test_the_pages_have_examples():
    assert len(code_blocks(ROOT / "README.md")) >= 3
    assert len(code_blocks(ROOT / "docs" / "functional.md")) >= 4


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page, capsys):
    blocks = code_blocks(page)
    namespace: dict[str, object] = {"__name__": f"example_{page.stem}", **_placeholders()}
    skipped = []
    for line, marker, code in blocks:
        reason = _skip_reason(marker)
        if reason is not None:
            skipped.append(f"line {line}: {reason}")
            continue
        try:
            # padded so that a traceback gives the page's own line numbers
            exec(compile("\n" * (line - 1) + code, str(page.relative_to(ROOT)), "exec"), namespace)
        except Exception as exc:
            where = f"{page.relative_to(ROOT)} line {line}"
            raise AssertionError(f"the example at {where} failed: {exc!r}") from exc
    if skipped and len(skipped) == len(blocks):
        pytest.skip("; ".join(skipped))
