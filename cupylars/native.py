"""The native CPU library: ``rawkernels/cpu/lars_cpu.cpp`` compiled at first use.

The library is built with the system C++ compiler, optimised and vectorised
for the host (``-O3 -march=native``), once per (sources, compiler, flags, CPU):
the build is cached on disk like CuPy's kernel cache, so a second process or
run loads it without compiling. Folders, files and the library's recorded
digest are checked before loading, and a damaged library is rebuilt once
(:mod:`cupylars._cache`).

Environment: ``CUPYLARS_CXX`` (the compiler; default ``c++``, else ``g++``),
``CUPYLARS_CXXFLAGS`` (extra flags), ``CUPYLARS_CACHE_DIR`` (the cache; the
library goes to its ``cpu/`` folder).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

from . import _cache
from ._paths import kernel_dir

__all__ = ["NativeUnavailableError", "library", "library_path"]

#: Must equal lars_cpu_abi_version() in rawkernels/cpu/lars_cpu.cpp.
ABI_VERSION = 4
SOURCE = Path("cpu") / "lars_cpu.cpp"
HEADERS = ("lars_math.h",)
FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-pthread",
    # The same float operations as the CUDA kernels: only the fused multiply-adds
    # written out in lars_math.h, no others; IEEE division and square roots.
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fvisibility=hidden",
)


class NativeUnavailableError(RuntimeError):
    """The native library cannot be built or loaded here (the message says why)."""


_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_loaded_path: Path | None = None
_failure: NativeUnavailableError | None = None


def _compiler() -> str:
    chosen = os.environ.get("CUPYLARS_CXX")
    if chosen:
        return chosen
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    raise NativeUnavailableError("no C++ compiler found (looked for c++, g++ and clang++ on PATH)")


def _compiler_id(cxx: str) -> str:
    try:
        banner = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        machine = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise NativeUnavailableError(f"cannot run the C++ compiler {cxx!r}: {exc}") from exc
    return banner.strip().splitlines()[0] + "|" + machine.strip()


def _cpu_id() -> str:
    """What -march=native depends on: the processor's model and feature flags."""
    lines = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            seen: set[str] = set()
            for line in handle:
                key = line.split(":", 1)[0].strip()
                wanted = key in ("model name", "flags", "Features", "CPU implementer", "CPU part")
                if wanted and key not in seen:
                    seen.add(key)
                    lines.append(line.strip())
    except OSError:
        lines.append(platform.processor())
    return "\n".join(lines)


def _build() -> tuple[ctypes.CDLL, Path]:
    cxx = _compiler()
    root = kernel_dir()
    flags = [*FLAGS, *shlex.split(os.environ.get("CUPYLARS_CXXFLAGS", "")), "-I", str(root)]
    source_path = root / SOURCE
    digest = hashlib.sha256()
    for part in (str(ABI_VERSION), _compiler_id(cxx), " ".join(flags), _cpu_id()):
        digest.update(part.encode() + b"\0")
    for path in (source_path, *(root / h for h in HEADERS)):
        digest.update(path.read_bytes() + b"\0")
    key = digest.hexdigest()[:32]

    folder = _cache.private_folder(_cache.cache_root("cpu"))
    target = folder / f"lars_cpu-{key}.so"

    def build(output: Path) -> None:
        unit = f'#include "{source_path}"\n'
        failure = _cache.compile_library([cxx, *flags], unit, folder, output)
        if failure is not None:
            raise NativeUnavailableError(f"{cxx} failed to build {source_path}:\n{failure}")

    def accept(lib: ctypes.CDLL) -> None:
        if lib.lars_cpu_abi_version() != ABI_VERSION:
            raise _cache.LibraryError(f"{target} was built for another interface version")

    try:
        lib, _ = _cache.load_library(target, build, accept)
    except _cache.LibraryError as exc:
        raise NativeUnavailableError(str(exc)) from None
    c_ptr, c_int, c_ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.lars_cpu_step.restype = c_int
    lib.lars_cpu_step.argtypes = [
        c_ptr, c_int, c_ptr, c_ll, c_ll, c_ptr, c_ptr, c_ptr,  # tables, scratch, code map
        c_ptr,  # the step's hyperparameters: a lars::StepConfig (plan.step_config), by address
        c_int,  # threads
    ]
    lib.lars_cpu_set_group_bytes.restype = c_ll
    lib.lars_cpu_set_group_bytes.argtypes = [c_ll]
    lib.lars_cpu_use_openmp.restype = c_int
    lib.lars_cpu_use_openmp.argtypes = [c_int]
    lib.lars_cpu_nearest_codes.restype = None
    lib.lars_cpu_nearest_codes.argtypes = [c_ptr, c_ptr, c_ll, c_ptr]
    lib.lars_cpu_dequantize.restype = None
    lib.lars_cpu_dequantize.argtypes = [c_ptr, c_ptr, c_ptr, c_ll, c_ptr]
    return lib, target


def library() -> ctypes.CDLL:
    """The loaded library (built at first use); raises :class:`NativeUnavailableError`."""
    global _loaded, _loaded_path, _failure
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            if _failure is not None:
                raise _failure
            try:
                _loaded, _loaded_path = _build()
            except (NativeUnavailableError, OSError) as exc:
                failure = exc if isinstance(exc, NativeUnavailableError) else NativeUnavailableError(str(exc))
                _failure = failure
                raise failure from None
    return _loaded


def library_path() -> Path | None:
    """Where the loaded library came from (None before it is loaded)."""
    return _loaded_path
