"""The documentation site and what it must cover.

- ``mkdocs build --strict`` (mkdocs.yml) succeeds: every link between pages and every
  anchor resolves, every ``:::`` reference names a real object, and every docstring it
  renders parses (griffe's warnings are errors under ``--strict``).
- Every public name (the ``__all__`` of each public module, and the public members of the
  classes among them) has a docstring and appears in the built reference.
- Every environment variable the code reads is in docs/environment.md.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "cupylars", "cupylars.functional", "cupylars.optim", "cupylars.testing", "cupylars.backends"
]
# Classes the public functions return, documented beside them, and their members for users
# (the others are the backends' bookkeeping).
RETURNED_CLASSES = {"cupylars.batch.PreparedBatch": ["backend", "update", "holds_for", "size", "captured"]}

pytest.importorskip("mkdocs", reason="the docs extra (pip install '.[docs]') is not installed")
griffe = pytest.importorskip("griffe")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def _inventory(site: Path) -> set[str]:
    """Every object path the reference renders: its names and its anchors."""
    data = (site / "objects.inv").read_bytes()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    found: set[str] = set()
    for line in body.splitlines():
        name, _, _, uri = line.split(" ")[:4]
        found.add(name)
        anchor = uri.partition("#")[2]
        found.add(name if anchor in ("", "$") else anchor)
    return found


def _public_names() -> list[tuple[str, object]]:
    """(dotted path, object) of every public name and every public member of a public class."""
    out: list[tuple[str, object]] = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            out.append((f"{module_name}.{name}", getattr(module, name)))
    members = []
    for path, names in RETURNED_CLASSES.items():
        module_name, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        members += [(path, cls)] + [(f"{path}.{m}", cls.__dict__.get(m)) for m in names]
    for path, obj in out:
        if inspect.isclass(obj) and obj.__module__.startswith("cupylars"):
            for name, value in vars(obj).items():
                if not name.startswith("_"):
                    members.append((f"{path}.{name}", value))
            for name in getattr(obj, "__dataclass_fields__", {}):
                if not name.startswith("_") and name not in vars(obj):
                    members.append((f"{path}.{name}", None))  # a field without a default
    return out + members


def _static_docstring(path: str) -> str | None:
    """The docstring griffe reads for ``path`` (attributes: the string after the assignment)."""
    module_name, _, rest = path.partition(".")
    obj = griffe.load(module_name, search_paths=[str(ROOT)])
    for part in rest.split(".") if rest else []:
        obj = obj[part]
    if obj.is_alias:
        obj = obj.final_target
    return obj.docstring.value if obj.docstring else None


def _documented(path: str, value: object) -> bool:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        value = value.fget
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.ismodule(value):
        return bool(value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__)
    # Data: an attribute docstring, or (a class attribute or field) named in its class's docstring.
    if _static_docstring(path):
        return True
    owner_path, _, name = path.rpartition(".")
    owner_module, _, owner_name = owner_path.rpartition(".")
    try:
        owner = getattr(importlib.import_module(owner_module), owner_name)
    except (ImportError, AttributeError):
        return False
    doc = owner.__dict__.get("__doc__") or "" if inspect.isclass(owner) else ""
    return re.search(rf"\b{name}\b", doc) is not None


def test_every_public_name_has_a_docstring():
    missing = [path for path, value in _public_names() if not _documented(path, value)]
    assert not missing, f"public names without a docstring: {missing}"


def test_the_site_builds_strictly_and_renders_every_public_name(site):
    rendered = _inventory(site)
    # A name re-exported by a public module is rendered once, under the module users import.
    absent = [path for path, _ in _public_names() if path not in rendered]
    assert not absent, f"public names missing from the API reference (docs/api/*.md): {absent}"
    assert (site / "functional" / "index.html").is_file() and (site / "torch" / "index.html").is_file()


# -- environment variables ----------------------------------------------------------------

_READS = [
    re.compile(r"""os\.environ\.get\(\s*["']([A-Z_][A-Z0-9_]*)["']"""),
    re.compile(r"""os\.environ\[\s*["']([A-Z_][A-Z0-9_]*)["']\s*\]"""),
    re.compile(r"""os\.getenv\(\s*["']([A-Z_][A-Z0-9_]*)["']"""),
    re.compile(r"""_env_int\(\s*["']([A-Z_][A-Z0-9_]*)["']"""),
    re.compile(r"""\$\{([A-Z_][A-Z0-9_]*)[:}-]"""),  # shell scripts
]


def _variables_read() -> dict[str, str]:
    files = [*ROOT.glob("cupylars/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*")]
    found: dict[str, str] = {}
    for path in files:
        if path.is_file():
            text = path.read_text(errors="replace")
            for pattern in _READS:
                for name in pattern.findall(text):
                    found.setdefault(name, str(path.relative_to(ROOT)))
    # cuda_runtime.py reads these through a loop over their names
    for name in re.findall(r'for env in \(([^)]*)\)', (ROOT / "cupylars/cuda_runtime.py").read_text()):
        for var in re.findall(r'"([A-Z_]+)"', name):
            found.setdefault(var, "cupylars/cuda_runtime.py")
    return found


def test_every_environment_variable_read_is_documented():
    page = (ROOT / "docs" / "environment.md").read_text()
    first_cells = re.findall(r"^\| ([^|]*) \|", page, flags=re.M)
    listed = {name for cell in first_cells for name in re.findall(r"`([A-Z_][A-Z0-9_]*)`", cell)}
    read = _variables_read()
    assert {"CUPYLARS_BACKEND", "CUPYLARS_CXXFLAGS", "CUDA_HOME", "GPU_CHECK_QUICK"} <= set(read)  # it scans
    missing = {name: where for name, where in read.items() if name not in listed}
    assert not missing, f"environment variables read but not in docs/environment.md: {missing}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_docs_is_a_target():
    out = subprocess.run(["make", "-n", "docs"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "mkdocs build --strict" in out.stdout, out.stdout + out.stderr
