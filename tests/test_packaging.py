"""First contact: the licence ships, a missing torch says what to install, and the wheel
works without the source tree."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

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


# ---- the wheel, installed where the checkout is not ---------------------------------------------------
# What the wheel must carry for every backend to run: the kernel sources, the math they share
# with the native CPU backend and the CPU shim of the emulator (rawkernels/ in the checkout,
# cupylars/rawkernels -> ../rawkernels a symbolic link to it).
KERNEL_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "rawkernels").rglob("*") if p.is_file())

STEP_ON_EACH_BACKEND = """
    import os, sys
    import numpy as np
    import cupylars
    from cupylars import functional as F, testing
    from cupylars._paths import kernel_dir

    assert cupylars.__file__.startswith(sys.prefix), cupylars.__file__  # the installed wheel
    assert not os.path.islink(kernel_dir()), kernel_dir()
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(5000).astype(np.float32)
    g = rng.standard_normal(5000).astype(np.float32)
    results = {}
    for name, scope in (("reference", testing.reference), ("cpu", testing.native_cpu),
                        ("emulated-cuda", testing.emulated_cuda)):
        p = p0.copy(); s = F.init_state(p, optim_bits=8, min_8bit_size=1000)
        with scope():
            assert F.backend_for([p]).name == name
            F.lars_update(p, g, s, lr=0.1, momentum=0.9, weight_decay=1e-2)
        results[name] = p
    for name, p in results.items():
        np.testing.assert_allclose(p, results["reference"], rtol=0, atol=1e-6, err_msg=name)
        assert not np.array_equal(p, p0), name
    print("stepped:", " ".join(results), cupylars.__version__)
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.packaging
def test_the_wheel_runs_every_host_backend_without_the_source_tree(tmp_path):
    pytest.importorskip("build", reason="python -m build is in the test extra: pip install -e '.[test]'")
    # Build from a copy of the checkout (its symbolic link kept), so the checkout gets no
    # build/ or egg-info; python -m build makes the sdist and then the wheel from the sdist.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "*.png"
        ),
    )
    assert (source / "cupylars" / "rawkernels").is_symlink()
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)])
    (wheel,) = dist.glob("cupylars-*.whl")
    (sdist,) = dist.glob("cupylars-*.tar.gz")
    version = wheel.name.split("-")[1]

    # The kernel sources are in both, as regular files with the checkout's content.
    with zipfile.ZipFile(wheel) as archive:
        members = {info.filename: info for info in archive.infolist()}
        for name in KERNEL_FILES:
            info = members[f"cupylars/{name}"]
            assert stat.S_ISREG(info.external_attr >> 16), f"{name} is not a regular file in the wheel"
            assert archive.read(info) == (ROOT / name).read_bytes(), name
        shipped = sorted(n.removeprefix("cupylars/") for n in members if n.startswith("cupylars/rawkernels/"))
        assert shipped == KERNEL_FILES
    with tarfile.open(sdist) as archive:
        for name in KERNEL_FILES:
            member = archive.getmember(f"cupylars-{version}/cupylars/{name}")
            assert member.isreg(), f"{name} is not a regular file in the sdist"
            assert archive.extractfile(member).read() == (ROOT / name).read_bytes(), name

    # A plain virtual environment (no system site-packages, no pip of its own): this pip
    # installs the wheel and NumPy into it from its configured index and cache.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", str(wheel)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUPYLARS_", "PYTHON"))}
    env["CUPYLARS_CACHE_DIR"] = str(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _run([python, "-c", textwrap.dedent(STEP_ON_EACH_BACKEND)], cwd=elsewhere, env=env)
    assert done.stdout.split() == ["stepped:", "reference", "cpu", "emulated-cuda", version]
    # The diagnostics run there too, and say that torch is missing.
    report = _run([python, "-m", "cupylars"], cwd=elsewhere, env=env).stdout
    assert re.search(r"\n  torch +not installed\n", report)
    assert re.search(r"\n  cpu +PASS", report) and re.search(r"\n  emulated-cuda +PASS", report)
    assert report.rstrip().endswith("Result: OK")
