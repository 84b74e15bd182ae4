"""The native CPU backend built for less than the host has: the vector paths a host with
AVX-512 never takes otherwise (rawkernels/cpu/lars_cpu.cpp: the codec without AVX-512
VBMI, and the codec and the stats pass without AVX-512), each a library of its own in
the build cache (the flags are part of its key)."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import pytest

from cupylars import backends, cpu, native

# The host build, then builds without the widest extensions (x86-64 only: GCC's -mno-* flags).
BUILDS = {"host": "", "no-avx512vbmi": "-mno-avx512vbmi", "no-avx512": "-mno-avx512f"}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def skip_unless_buildable(name: str) -> None:
    if BUILDS[name] and not X86:
        pytest.skip(f"the {name} build is for x86-64 hosts")


@functools.cache
def library(name: str) -> Any:
    """The native library of build ``name`` (the process's own for "host")."""
    if not BUILDS[name]:
        return native.library()
    before = os.environ.get("CUPYLARS_CXXFLAGS")
    os.environ["CUPYLARS_CXXFLAGS"] = f"{before or ''} {BUILDS[name]}".strip()
    try:
        lib, _ = native._build()
    finally:
        if before is None:
            del os.environ["CUPYLARS_CXXFLAGS"]
        else:
            os.environ["CUPYLARS_CXXFLAGS"] = before
    return lib


def use(name: str) -> Any:
    """A context in which NumPy arrays are updated by build ``name`` of the native backend."""
    return backends.use(cpu.CpuBackend(library(name), f"the native CPU backend, {name} build"))
