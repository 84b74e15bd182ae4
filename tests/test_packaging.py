"""First contact: the licence ships, and a missing torch says what to install."""

from __future__ import annotations

import configparser
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs before anything imports torch, so that every later ``import torch`` fails as it does
# where torch is not installed (ModuleNotFoundError naming torch).
HIDE_TORCH = "import sys; sys.modules['torch'] = None\n"


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HIDE_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_license_is_mit_and_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the cupylars developers" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    assert cfg["metadata"]["license_files"].split() == ["LICENSE"]


def test_optim_without_torch_says_what_to_install():
    result = run_without_torch(
        """
        import cupylars  # needs no torch
        try:
            import cupylars.optim
        except ImportError as exc:
            print(type(exc).__name__, "|", exc, "|", type(exc.__cause__).__name__, exc.__cause__.name)
        """
    )
    assert result.returncode == 0, result.stderr
    kind, message, cause = (part.strip() for part in result.stdout.split("|"))
    assert kind == "ImportError"
    assert message == (
        'cupylars.optim needs torch, which is not installed: pip install torch '
        '(from a cupylars checkout: pip install ".[torch]")'
    )
    assert cause == "ModuleNotFoundError torch"  # chained to the original error


def test_demo_without_torch_says_what_to_install():
    result = run_without_torch(
        """
        from cupylars.demo import main
        main(["--epochs", "1"])
        """
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    want = 'cupylars-demo needs torch, which is not installed: pip install "cupylars[torch]"'
    assert last == f"ImportError: {want}"
    assert "ModuleNotFoundError" in result.stderr  # the cause is shown above it


def test_demo_help_needs_no_torch():
    result = run_without_torch("from cupylars.demo import main; main(['--help'])")
    assert result.returncode == 0, result.stderr
    assert "--batch-size" in result.stdout
