"""The two runtimes of the CUDA kernels: CuPy on a GPU, and the CPU emulator.

Everything else of the CUDA backend (:mod:`cupylars.cuda`: tables, grids,
argument dtypes, launch order) is shared by both; a runtime only compiles or
loads the kernels, moves the tables to the device and hands out scratch.

* :class:`CupyRuntime`: ``cupy.RawModule`` over ``rawkernels/`` (compiled once
  per process and device), launches on CuPy's current stream, uploads through
  pinned memory.
* :class:`EmulatedRuntime`: the unmodified sources compiled with g++ through the
  CPU shim (:mod:`cupylars._emulator`), over NumPy arrays.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import quantization
from ._paths import kernel_dir
from .plan import FORMAT_NAMES, STATE_NAMES, STATS_NAMES

__all__ = [
    "FINALIZE_THREADS",
    "THREADS",
    "CupyRuntime",
    "EmulatedRuntime",
    "cuda_include_dirs",
    "kernel_names",
    "kernel_sources",
]

# ---- mirrors rawkernels/lars_common.cuh (tests/test_kernels_compile.py checks) --------------
THREADS = 256  # kThreads
FINALIZE_THREADS = 128  # kFinalizeThreads
KERNEL_SOURCE = "lars_kernels.cu"
KERNEL_HEADER = "lars_common.cuh"


def kernel_names() -> list[str]:
    """Every ``extern "C"`` kernel in rawkernels/lars_kernels.cu."""
    stats = [f"lars_stats_{fmt}_{reads}" for fmt in FORMAT_NAMES for reads in STATS_NAMES]
    update = [f"lars_update_{fmt}_{state}" for fmt in FORMAT_NAMES for state in STATE_NAMES]
    return [*stats, *update, "lars_finalize"]


def kernel_sources() -> tuple[Path, Path]:
    """(kernel source, shared header)."""
    root = kernel_dir()
    return root / KERNEL_SOURCE, root / KERNEL_HEADER


def _source_digest() -> str:
    # CuPy's compile cache keys on the source text and options, not on included
    # headers: a digest of both files in the options keeps a changed header from
    # reusing a stale binary.
    h = hashlib.sha256()
    for path in kernel_sources():
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cuda_include_dirs() -> list[str]:
    """Directories with cuda_fp16.h / cuda_bf16.h for NVRTC, best first.

    The headers of the ``nvidia-cuda-runtime`` wheel (they match the
    ``nvidia-cuda-nvrtc`` wheel), then ``$CUDA_PATH``/``$CUDA_HOME``, then
    /usr/local/cuda.
    """
    found: list[str] = []
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels

        for base in getattr(nvidia, "__path__", []):
            for header in sorted(Path(base).glob("*/include/cuda_fp16.h")):
                found.append(str(header.parent))
    except ImportError:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            found.append(str(Path(os.environ[env]) / "include"))
    found.append("/usr/local/cuda/include")
    out: list[str] = []
    for d in found:
        if (Path(d) / "cuda_fp16.h").is_file() and d not in out:
            out.append(d)
    return out



# ---- runtimes: the only part that differs between the GPU and the emulator ------------------
class CupyRuntime:
    name = "cuda"
    has_devices = True  # arrays may live on another device than the current one

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._lock = threading.Lock()
        self._modules: dict[int, Any] = {}
        self._functions: dict[tuple[int, str], Any] = {}
        self._code_maps: dict[int, Any] = {}

    def device(self) -> int:
        return int(self.xp.cuda.runtime.getDevice())

    def context(self) -> tuple[int, int]:
        # scratch and tables are reused only on the stream that last used them
        return self.device(), int(self.xp.cuda.get_current_stream().ptr)

    def address(self, a: Any) -> int:
        return int(a.data.ptr)

    def check_devices(self, arrays: Sequence[tuple[str, Any]]) -> None:
        device = self.device()
        for what, a in arrays:
            if a.size and a.data.device_id != device:  # MemoryPointer.device_id: no Device object
                raise ValueError(
                    f"{what} lives on CUDA device {a.data.device_id} but the current device is {device}: "
                    "run the update under `with cupy.cuda.Device(...)` of the arrays' device"
                )

    def upload(self, host: np.ndarray) -> tuple[Any, Any]:
        """An asynchronous copy on the current stream, through pinned memory (a
        pageable source could make the driver wait for the stream)."""
        cupy = self.xp
        stream = cupy.cuda.get_current_stream()
        pinned_mem = cupy.cuda.alloc_pinned_memory(host.nbytes)
        pinned = np.frombuffer(pinned_mem, host.dtype, host.size).reshape(host.shape)
        pinned[...] = host
        device = cupy.empty(host.shape, host.dtype)
        device.set(pinned, stream=stream)
        done = stream.record()
        return device, (pinned_mem, done)

    def release(self, keepalive: Any) -> None:
        """Lets go of an upload's pinned buffer once its copy has run."""
        _, done = keepalive
        done.synchronize()  # long complete by the time a plan is evicted

    def download(self, device_array: Any) -> np.ndarray:
        return self.xp.asnumpy(device_array)

    def empty(self, n: int, dtype: Any) -> Any:
        return self.xp.empty(n, dtype=dtype)

    def code_map(self) -> Any:
        device = self.device()
        if device not in self._code_maps:
            self._code_maps[device] = self.xp.asarray(quantization.dynamic_map())
        return self._code_maps[device]

    def _compile(self) -> Any:
        cupy = self.xp
        from cupy.cuda import compiler

        source_path, _ = kernel_sources()
        # --fmad=false: NVRTC would otherwise contract a*b+c into FMAs of its own choosing;
        # the sources write every FMA they want (fmaf/fma), so the GPU rounds exactly as the
        # CPU emulator (g++ -ffp-contract=off) and the reference do. CuPy appends -ftz=true
        # itself; the emulator flushes subnormals to match.
        base = (
            "--std=c++17",
            "--fmad=false",
            f"-I{kernel_dir()}",
            f"-DCUPYLARS_SOURCE_DIGEST=0x{_source_digest()}",
        )
        try:
            module = cupy.RawModule(code=source_path.read_text(), options=base)
            module.get_function("lars_finalize")  # compiles now, so a missing header shows here
            return module
        except compiler.CompileException:
            # This CuPy does not put the CUDA headers (cuda_fp16.h, cuda_bf16.h) on
            # NVRTC's path: retry with the ones found here; a second failure is the
            # error to report.
            includes = tuple(f"-I{d}" for d in cuda_include_dirs())
            if not includes:
                raise
        module = cupy.RawModule(code=source_path.read_text(), options=base + includes)
        module.get_function("lars_finalize")
        return module

    def function(self, name: str) -> Any:
        device = self.device()
        fn = self._functions.get((device, name))
        if fn is None:
            with self._lock:
                if device not in self._modules:
                    self._modules[device] = self._compile()
                fn = self._modules[device].get_function(name)
                self._functions[(device, name)] = fn
        return fn


_EMULATED_MODULE: Any = None
_EMULATED_LOCK = threading.Lock()


class EmulatedRuntime:
    name = "emulated-cuda"
    xp = np
    has_devices = False

    def context(self) -> tuple[int, int]:
        return (-1, 0)

    def address(self, a: Any) -> int:
        # A ctypes view of the buffer gives the address without building the dict of
        # __array_interface__ (about 3x faster); it needs a writable, contiguous buffer of
        # at least one byte, so read-only gradients take the slow way.
        try:
            return ctypes.addressof(ctypes.c_char.from_buffer(a))
        except (TypeError, ValueError, BufferError):
            return int(a.__array_interface__["data"][0])

    def check_devices(self, arrays: Sequence[tuple[str, Any]]) -> None:
        pass

    def upload(self, host: np.ndarray) -> tuple[np.ndarray, Any]:
        return np.array(host, copy=True), None

    def release(self, keepalive: Any) -> None:
        pass

    def download(self, device_array: Any) -> np.ndarray:
        return np.array(device_array, copy=True)

    def empty(self, n: int, dtype: Any) -> np.ndarray:
        return np.empty(n, dtype=dtype)

    def code_map(self) -> np.ndarray:
        if not hasattr(self, "_code_map"):
            self._code_map = quantization.dynamic_map()
        return self._code_map

    def function(self, name: str) -> Any:
        global _EMULATED_MODULE
        with _EMULATED_LOCK:
            if _EMULATED_MODULE is None:
                from ._emulator import EmulatedModule

                source_path, _ = kernel_sources()
                _EMULATED_MODULE = EmulatedModule(
                    [str(source_path)], kernel_names(), include_dirs=(str(kernel_dir()),)
                )
        return _EMULATED_MODULE.get_function(name)


