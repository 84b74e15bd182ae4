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
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ._paths import kernel_dir
from .plan import FORMAT_NAMES, STATE_NAMES, STATS_NAMES

__all__ = [
    "FINALIZE_THREADS",
    "GRAD_PATCH",
    "GRAD_PATCH_ROWS",
    "THREADS",
    "CupyRuntime",
    "EmulatedGraph",
    "EmulatedRuntime",
    "GraphCaptureError",
    "capturing_runtime",
    "cuda_include_dirs",
    "emulated_capture",
    "emulated_capture_active",
    "emulated_stream",
    "kernel_names",
    "kernel_sources",
]

# ---- mirrors rawkernels/lars_common.cuh (tests/test_kernels_compile.py checks) --------------
THREADS = 256  # kThreads
FINALIZE_THREADS = 128  # kFinalizeThreads
KERNEL_SOURCE = "lars_kernels.cu"
KERNEL_HEADER = "lars_common.cuh"
# ... and the lars_set_grads parameters of rawkernels/lars_kernels.cu (kGradPatchRows, GradPatch):
# a struct passed by value, as a NumPy structured scalar with the C layout (align=True).
GRAD_PATCH_ROWS = 64
GRAD_PATCH = np.dtype(
    [
        ("grad", np.int64, (GRAD_PATCH_ROWS,)),
        ("vector", np.uint64),
        ("first", np.int32),
        ("count", np.int32),
    ],
    align=True,
)


def kernel_names() -> list[str]:
    """Every ``extern "C"`` kernel in rawkernels/lars_kernels.cu."""
    stats = [f"lars_stats_{fmt}_{reads}" for fmt in FORMAT_NAMES for reads in STATS_NAMES]
    update = [f"lars_update_{fmt}_{state}" for fmt in FORMAT_NAMES for state in STATE_NAMES]
    return [*stats, *update, "lars_finalize", "lars_unorm_exact", "lars_unorm_finalize", "lars_set_grads"]


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


class GraphCaptureError(RuntimeError):
    """An operation a CUDA graph cannot record (an allocation, a host copy, a
    synchronisation, a free) was asked for while the current stream is capturing."""


def _refuse_in_capture(what: str) -> GraphCaptureError:
    return GraphCaptureError(
        f"cupylars: {what} while the current stream is capturing a CUDA graph; a graph cannot "
        "record it (run the step once outside the capture first, with the same tensors, so that "
        "everything it needs exists)"
    )


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

    def device(self) -> int:
        return int(self.xp.cuda.runtime.getDevice())

    def context(self) -> tuple[int]:
        # Tables and scratch are kept per device, not per stream: a batch prepared on one
        # stream is used as it is on another, which CUDA graph capture needs (torch.cuda.graph
        # captures on a stream of its own). This is safe because two steps of one batch update
        # the same parameters and momenta, so the caller must order them anyway (a step on
        # stream B after one on stream A waits for A, e.g. B.wait_stream(A)); that order covers
        # the scratch they share. Tables are never written by the device.
        return (self.device(),)

    def is_capturing(self) -> bool:
        return bool(self.xp.cuda.get_current_stream().is_capturing())

    def fence(self) -> Any:
        """A keepalive for memory retired on the current stream (see release)."""
        return (None, self.xp.cuda.get_current_stream().record())

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
        if self.is_capturing():
            # The copy would become a graph node reading a pinned buffer that goes back to
            # CuPy's pool later: every replay would copy whatever is there by then.
            raise _refuse_in_capture("uploading a table")
        pinned_mem = cupy.cuda.alloc_pinned_memory(host.nbytes)
        pinned = np.frombuffer(pinned_mem, host.dtype, host.size).reshape(host.shape)
        pinned[...] = host
        device = cupy.empty(host.shape, host.dtype)
        device.set(pinned, stream=stream)
        done = stream.record()
        return device, (pinned_mem, done)

    def release(self, keepalive: Any) -> None:
        """Lets go of an upload's pinned buffer once its copy has run."""
        if self.is_capturing():
            raise _refuse_in_capture("releasing retired memory (an event synchronisation)")
        _, done = keepalive
        done.synchronize()  # long complete by the time a plan is evicted

    def download(self, device_array: Any) -> np.ndarray:
        if self.is_capturing():
            raise _refuse_in_capture("copying device memory to the host")
        return self.xp.asnumpy(device_array)

    def empty(self, n: int, dtype: Any) -> Any:
        if self.is_capturing():
            raise _refuse_in_capture("allocating scratch memory")
        return self.xp.empty(n, dtype=dtype)

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


# One emulated module per set of -D macros (cuda.emulated_backend(defines=...)), built once.
_EMULATED_MODULES: dict[tuple[tuple[str, str], ...], Any] = {}
_EMULATED_LOCK = threading.Lock()


# ---- emulated streams and graph capture -------------------------------------------------------
# The emulator runs every launch at once, so a stream is only a name here; it is modelled so
# that tests can step on one "stream" and capture on another, as torch.cuda.graph does.
_EMULATION = threading.local()


def _emulated_graph() -> EmulatedGraph | None:
    return getattr(_EMULATION, "graph", None)


def emulated_capture_active() -> bool:
    """Whether this thread is inside :func:`emulated_capture`."""
    return _emulated_graph() is not None


def capturing_runtime() -> str | None:
    """The runtime whose CUDA graph capture is in progress on this thread's current stream:
    ``"emulated-cuda"`` inside :func:`emulated_capture`, ``"cuda"`` while torch's current CUDA
    stream is capturing (looked at only once torch has initialised CUDA: no CUDA call
    otherwise), else None."""
    if _emulated_graph() is not None:
        return "emulated-cuda"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return "cuda"
    return None


def _memory_owner(a: np.ndarray) -> np.ndarray | None:
    """The array that owns ``a``'s memory, when NumPy allocated it (else None: memory of
    another framework, a torch tensor's, whose lifetime the emulator cannot see)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None and a.flags.owndata else None


class EmulatedGraph:
    """Launches recorded by :func:`emulated_capture`, replayed as a CUDA graph would be.

    Each launch keeps its kernel, grid, block and arguments as the graph keeps them:
    scalars by value and arrays as bare addresses, so a replay reads and writes whatever
    memory is at those addresses now. What the emulator can tell, it checks: a replay
    whose launch addresses an array that NumPy allocated and that has been freed since
    the capture raises :class:`GraphCaptureError` instead of touching freed memory.

    Attributes:
        launches: the recorded launches, in order: kernel name, kernel, grid, block, the
            recorded arguments, and weak references to the NumPy memory they address.
    """

    def __init__(self) -> None:
        self.launches: list[tuple[str, Any, Any, Any, tuple[Any, ...], list[Any]]] = []

    def __len__(self) -> int:
        return len(self.launches)

    def record(self, name: str, kernel: Any, grid: Any, block: Any, args: tuple[Any, ...]) -> None:
        """Record one launch (the emulated runtime calls this inside a capture): by-value
        arguments as copies of their bytes, arrays as their addresses."""
        recorded: list[Any] = []
        owners = []
        for index, arg in enumerate(args):
            if isinstance(arg, np.ndarray) and kernel.passes_by_value(index):
                recorded.append(arg.copy())  # a value parameter: the graph keeps its bytes
            elif isinstance(arg, np.ndarray):
                owner = _memory_owner(arg)
                if owner is not None:
                    owners.append(weakref.ref(owner))
                recorded.append(np.uint64(arg.ctypes.data))  # the graph keeps the address only
            else:
                recorded.append(arg)
        self.launches.append((name, kernel, grid, block, tuple(recorded), owners))

    def replay(self) -> None:
        """Run the recorded launches again, in order, with their recorded arguments."""
        if emulated_capture_active():
            raise GraphCaptureError("cupylars: replaying a graph inside a capture")
        for name, _, _, _, _, owners in self.launches:
            if any(ref() is None for ref in owners):
                raise GraphCaptureError(
                    f"cupylars: the captured launch of {name} addresses memory that was freed after "
                    "the capture; a CUDA graph would read or write freed memory"
                )
        for _, kernel, grid, block, args, _ in self.launches:
            kernel(grid, block, args)


@contextmanager
def emulated_capture() -> Iterator[EmulatedGraph]:
    """Capture the emulated launches of this thread into an :class:`EmulatedGraph`.

    Inside the block the current emulated stream is a fresh one (torch.cuda.graph also
    captures on a stream of its own), launches are recorded instead of run, and every
    operation a CUDA graph cannot record (allocating, uploading or downloading,
    synchronising, freeing) raises :class:`GraphCaptureError` naming it.
    """
    if emulated_capture_active():
        raise GraphCaptureError("cupylars: emulated_capture() does not nest")
    graph = EmulatedGraph()
    before = getattr(_EMULATION, "stream", 0)
    _EMULATION.graph = graph
    _EMULATION.stream = _next_stream()
    try:
        yield graph
    finally:
        _EMULATION.graph = None
        _EMULATION.stream = before


_STREAMS = iter(range(1, 2**62))
_STREAMS_LOCK = threading.Lock()


def _next_stream() -> int:
    with _STREAMS_LOCK:
        return next(_STREAMS)


@contextmanager
def emulated_stream(stream: int | None = None) -> Iterator[int]:
    """Make ``stream`` (default: a fresh one) this thread's current emulated stream."""
    before = getattr(_EMULATION, "stream", 0)
    _EMULATION.stream = _next_stream() if stream is None else stream
    try:
        yield _EMULATION.stream
    finally:
        _EMULATION.stream = before


class _Recorder:
    """An emulated kernel inside a capture: its launches are recorded, not run."""

    def __init__(self, name: str, kernel: Any, graph: EmulatedGraph) -> None:
        self.name, self.kernel, self.graph = name, kernel, graph

    def __call__(self, grid: Any, block: Any, args: tuple[Any, ...]) -> None:
        self.graph.record(self.name, self.kernel, grid, block, args)


class EmulatedRuntime:
    """``defines``: -D macros of the emulated build (e.g. ``{"LARS_STATS_F32_PARTIALS": "1"}``,
    the float32-partials stats pass that the GPU build picks on sm_86/sm_87/sm_89)."""

    name = "emulated-cuda"
    xp = np
    has_devices = False

    def __init__(self, defines: Mapping[str, str] | None = None) -> None:
        pairs = (defines or {}).items()
        self.defines: tuple[tuple[str, str], ...] = tuple(sorted((k, str(v)) for k, v in pairs))

    def context(self) -> tuple[int]:
        # One device; per device, not per stream, as on the GPU (see CupyRuntime.context).
        return (-1,)

    def stream(self) -> int:
        """The current emulated stream (see :func:`emulated_stream`)."""
        return int(getattr(_EMULATION, "stream", 0))

    def is_capturing(self) -> bool:
        return emulated_capture_active()

    def _guard(self, what: str) -> None:
        if emulated_capture_active():
            raise _refuse_in_capture(what)

    def fence(self) -> Any:
        self._guard("recording an event to retire memory")
        return None

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
        self._guard("uploading a table")
        return np.array(host, copy=True), None

    def release(self, keepalive: Any) -> None:
        # On the GPU, releasing synchronises with the upload's copy and frees its buffer.
        self._guard("releasing retired memory (an event synchronisation)")

    def download(self, device_array: Any) -> np.ndarray:
        self._guard("copying device memory to the host")
        return np.array(device_array, copy=True)

    def empty(self, n: int, dtype: Any) -> np.ndarray:
        self._guard("allocating scratch memory")
        return np.empty(n, dtype=dtype)

    def function(self, name: str) -> Any:
        with _EMULATED_LOCK:
            module = _EMULATED_MODULES.get(self.defines)
            if module is None:
                from ._emulator import EmulatedModule

                source_path, _ = kernel_sources()
                module = _EMULATED_MODULES[self.defines] = EmulatedModule(
                    [str(source_path)], kernel_names(), include_dirs=(str(kernel_dir()),),
                    defines=dict(self.defines),
                )
        kernel = module.get_function(name)
        graph = _emulated_graph()
        return kernel if graph is None else _Recorder(name, kernel, graph)


