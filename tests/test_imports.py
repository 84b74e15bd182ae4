"""Every module of cupylars imports on its own, in a fresh interpreter: an import cycle that
only bites in some orders (module A first imports B, which needs a name of A not defined yet)
fails here, whichever module a program happens to import first."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import cupylars

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(cupylars.__path__, prefix="cupylars.")
    if info.name != "cupylars.__main__"
)


def test_every_module_is_listed():
    assert {
        "cupylars.batch",
        "cupylars.backends",
        "cupylars.cpu",
        "cupylars.cuda",
        "cupylars.optim.lars",
    } <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_the_module_imports_first(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_the_core_modules_import_no_backend_back():
    """The layering the step relies on: batch (validation, overlap, the prepared batch) below
    the backends; the backends load cpu and cuda only when selecting one."""
    script = (
        "import sys, cupylars.batch, cupylars.backends\n"
        "loaded = {m for m in sys.modules if m in ('cupylars.cpu', 'cupylars.cuda', 'cupylars.native')}\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
