"""CUDA backend: the LARS step as fused kernels over a list of tensors.

One call of :meth:`CudaBackend.update_many` launches, whatever the number of
tensors (docs/kernels.md):

1. ``lars_stats_<fmt>_<state>``: one block per (tensor, chunk) writes the
   chunk's dot products g.g, p.p, m.m, g.p, g.m, p.m (float64) to a scratch array;
2. ``lars_finalize``: one block per tensor reduces them in a fixed order and
   computes, on the device, the skip decision, the percentile history and gamma,
   the trust ratio, ||u|| and s, and advances the step counter;
3. ``lars_update_<fmt>_<state>``: one block per (tensor, chunk) updates p and m.

One stats and one update launch per (storage format, state mode) present in
the list, so at most 19 launches and usually 3. Nothing is read back to the
host except with ``nonfinite='raise'``, which must know before the update
whether a gradient is finite: it reads the stats pass's partial sums (one
synchronisation) and raises before anything is modified.

The same code builds the metadata tables, sizes the grids and chooses the
argument dtypes for two runtimes: CuPy (``cupy.RawModule`` over
``rawkernels/``, compiled once per process and device, launched on CuPy's
current stream) and the CPU emulator (:mod:`cupylars._emulator`), which runs
the unmodified sources with g++.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from . import plan as tables
from . import quantization
from ._paths import kernel_dir
from .config import NONFINITE_POLICIES, LarsConfig
from .plan import (
    COEF_WORDS,
    FORMAT_NAMES,
    STATE_NAMES,
    SUMS,
    TENSOR_FIELDS,
    check_no_overlap,
)
from .state import LarsState

__all__ = [
    "CudaBackend",
    "cuda_include_dirs",
    "cupy_backend",
    "emulated_backend",
    "kernel_names",
    "kernel_sources",
    "record_launches",
]

# ---- mirrors rawkernels/lars_common.cuh (tests/test_kernels_compile.py checks) --------------
THREADS = 256  # kThreads
FINALIZE_THREADS = 128  # kFinalizeThreads
KERNEL_SOURCE = "lars_kernels.cu"
KERNEL_HEADER = "lars_common.cuh"


def kernel_names() -> list[str]:
    """Every ``extern "C"`` kernel in rawkernels/lars_kernels.cu."""
    names = [
        f"lars_{kind}_{fmt}_{state}"
        for kind in ("stats", "update")
        for fmt in FORMAT_NAMES
        for state in STATE_NAMES
    ]
    return [*names, "lars_finalize"]


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


# ---- launch observation (tests count launches through this) ---------------------------------
_LAUNCH_HOOKS: list[Callable[[str, tuple[int, ...], tuple[int, ...]], None]] = []


@contextmanager
def record_launches() -> Iterator[list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Collect ``(kernel name, grid, block)`` of every launch inside the block."""
    seen: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def hook(name: str, grid: tuple[int, ...], block: tuple[int, ...]) -> None:
        seen.append((name, grid, block))

    _LAUNCH_HOOKS.append(hook)
    try:
        yield seen
    finally:
        _LAUNCH_HOOKS.remove(hook)


# ---- runtimes: the only part that differs between the GPU and the emulator ------------------
class _CupyRuntime:
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


class _EmulatedRuntime:
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


# ---- metadata -----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Plan:
    """Device tables for one list of parameters and states (cached while their arrays stay put).

    Everything here depends on the parameters and states only, except the
    gradient column of the tensor rows, rewritten (and the rows uploaded again)
    when the gradients move: a training loop that frees its gradients every
    step (``zero_grad(set_to_none=True)``) pays one small upload per step.
    """

    param_addresses: list[int]  # of the live params, in the caller's order: the plan's key
    host: tables.Tables  # the host tables (the tensor rows are kept current)
    grad_addresses: list[int]  # what the device rows hold, in row order
    tensors: Any  # device int64 view: num_tensors x TENSOR_FIELDS
    blocks: Any  # device int64 view: num_blocks
    keepalive: Any  # the runtime's hold on the table's upload buffer
    rows_keepalive: Any = None  # ... and on the last re-upload of the tensor rows

    @property
    def order(self) -> list[int]:
        return self.host.order

    @property
    def host_tensors(self) -> np.ndarray:
        return self.host.rows

    @property
    def num_tensors(self) -> int:
        return self.host.num_tensors

    @property
    def num_blocks(self) -> int:
        return self.host.num_blocks


@dataclass
class _Scratch:
    partials: Any  # float64, SUMS per block
    coefs: Any  # int32, COEF_WORDS per tensor


_FLAGS = attrgetter("flags")
_C_CONTIGUOUS = attrgetter("c_contiguous")


def _writeable(flags: Any) -> bool:
    # CuPy arrays have no read-only flag (cupy.ndarray.flags has no `writeable`).
    return getattr(flags, "writeable", True)


class CudaBackend:
    """Runs :func:`cupylars.functional.lars_update_many` through the CUDA kernels."""

    takes_addresses = True  # update_many accepts grad_addresses for grads

    _PLAN_CACHE_SIZE = 16

    def __init__(self, runtime: Any, reason: str, chunk_size: int | None = None) -> None:
        self.runtime = runtime
        self.name: str = runtime.name
        self.reason = reason
        self.chunk_size = chunk_size
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._lock = threading.RLock()
        # Scratch per thread (and device and stream): two threads stepping different
        # tensor lists must not read each other's partial sums, even on one stream.
        self._scratch = threading.local()
        # Replaced device tables and their upload buffers, let go once they are old enough
        # that no queued kernel reads them and their copies have long run (releasing an
        # upload buffer synchronises with its copy). A CUDA graph captured over a table
        # keeps replaying correctly while the table is here.
        self._retired: deque[tuple[Any, Any]] = deque()
        self._writeable = attrgetter("writeable") if runtime.xp is np else _writeable

    def __repr__(self) -> str:
        return f"<cupylars CUDA backend {self.name!r}: {self.reason}>"

    # -- public ----------------------------------------------------------------------------------
    def update_many(
        self,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        states: Sequence[LarsState],
        cfg: LarsConfig,
        checked: Any,
        grad_addresses: Sequence[int] | None = None,
    ) -> None:
        """One LARS step over validated tensors (see functional.lars_update_many).

        ``checked`` is the functional layer's record of the validation (formats,
        live tensors, a token per validated set of states). ``grad_addresses``
        stands in for ``grads`` (then None): the addresses of contiguous
        gradients, one per parameter, that the caller has checked against the
        parameters (dtype, shape, device), as the torch adapter does.
        """
        self._check_call(params, grads, states)
        live = checked.live
        if not live:
            self._check_arrays(params, grads, states)  # as any call: before deciding to do nothing
            return  # empty tensors: no launch, no counter changes
        chunk = self._chunk()
        rt = self.runtime
        uses_m = cfg.uses_momentum
        stats_m = uses_m and cfg.clips_update_norm
        need_p = cfg.uses_trust_ratio or cfg.clips_update_norm
        raising = cfg.nonfinite == "raise"
        if uses_m and not raising and not checked.has_momentum:
            for i in live:
                states[i].ensure_momentum(rt.xp)
            checked.renew(states)

        ctx = rt.context()
        with self._lock:  # the plan cache is shared by every thread of the process
            plan = self._plan(ctx, chunk, checked, params, grads, grad_addresses, states, uses_m, stats_m)
        scratch = self._scratch_for(ctx, plan)
        code_map = rt.code_map()
        self._launch_chunks(plan.host.stats_runs, plan, chunk, np.int32(need_p), code_map, scratch.partials)

        if raising:
            # The one synchronising path: the stats pass's g.g partials say which
            # gradients are finite before anything is written.
            gg = rt.download(scratch.partials[: plan.num_blocks * SUMS]).reshape(-1, SUMS)[:, 0]
            bad = sorted({int(i) for i in plan.host.block_owner[~np.isfinite(gg)]})
            if bad:
                raise FloatingPointError(f"non-finite gradient in tensor(s) {bad}; nothing was updated")
            if uses_m and not checked.has_momentum:
                for i in live:
                    states[i].ensure_momentum(rt.xp)
                checked.renew(states)
                with self._lock:
                    plan = self._plan(
                        ctx, chunk, checked, params, grads, grad_addresses, states, uses_m, stats_m
                    )

        self._launch(
            "lars_finalize",
            (plan.num_tensors,),
            (FINALIZE_THREADS,),
            (
                plan.tensors,
                scratch.partials,
                scratch.coefs,
                np.float64(cfg.lr),
                np.float64(cfg.momentum),
                np.float64(cfg.dampening),
                np.float64(cfg.weight_decay),
                np.float64(cfg.trust_coefficient),
                np.float64(cfg.eps),
                np.float64(cfg.max_unorm),
                np.int32(cfg.percentile_clipping),
                np.int32(tables.switches(cfg)),
                np.int32(NONFINITE_POLICIES.index(cfg.nonfinite)),
            ),
        )
        # float32 factors exactly as the reference rounds them
        lam = np.float32(cfg.weight_decay)
        mu = np.float32(cfg.momentum)
        keep = np.float32(1.0 - cfg.dampening)
        # Launched last-first: the stats pass ended there, so that data may still be in L2.
        tail = (scratch.coefs, code_map, lam, mu, keep, np.int32(cfg.nesterov))
        self._launch_chunks(plan.host.update_runs[::-1], plan, chunk, *tail)

    # -- internals -------------------------------------------------------------------------------
    def _chunk(self) -> int:
        return tables.check_chunk(self.chunk_size if self.chunk_size is not None else tables.CHUNK_SIZE)

    def _launch_chunks(
        self, runs: Sequence[tuple[str, int, int]], plan: _Plan, chunk: int, *tail: Any
    ) -> None:
        """One launch per run of blocks; the stats and update kernels share their leading arguments."""
        for kernel, first, count in runs:
            args = (plan.tensors, plan.blocks, np.int32(first), np.int32(chunk), *tail)
            self._launch(kernel, (count,), (THREADS,), args)

    def _launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple) -> None:
        for hook in _LAUNCH_HOOKS:
            hook(name, grid, block)
        self.runtime.function(name)(grid, block, args)

    def _check_call(
        self, params: Sequence[Any], grads: Sequence[Any] | None, states: Sequence[LarsState]
    ) -> None:
        """What each call checks of memory: params and grads. The state arrays are checked
        whenever a plan is built (they are part of its key, through the states' versions)."""
        flags = list(map(_FLAGS, params))
        ok = all(map(_C_CONTIGUOUS, flags)) and all(map(self._writeable, flags))
        if ok and grads is not None:
            ok = all(map(_C_CONTIGUOUS, map(_FLAGS, grads)))
        if not ok:
            self._check_arrays(params, grads, states)  # names the offending array

    def _check_arrays(
        self, params: Sequence[Any], grads: Sequence[Any] | None, states: Sequence[LarsState]
    ) -> None:
        """Everything the kernels assume of memory, checked before any launch."""
        checked: list[tuple[str, Any]] = []
        for i, (p, st) in enumerate(zip(params, states)):
            arrays = [(f"params[{i}]", p, True)]
            if grads is not None:
                arrays.append((f"grads[{i}]", grads[i], False))
            arrays += [(f"states[{i}].{k}", a, True) for k, a in st.arrays().items()]
            for what, a, written in arrays:
                flags = a.flags
                if not flags.c_contiguous:
                    raise ValueError(
                        f"{what} is not C-contiguous: the CUDA kernels address tensors as flat "
                        "memory; pass a contiguous array (for example a copy)"
                    )
                if written and not _writeable(flags):
                    raise ValueError(f"{what} is read-only")
                checked.append((what, a))
        self.runtime.check_devices(checked)

    def _check_states(self, params: Sequence[Any], states: Sequence[LarsState]) -> None:
        """The state arrays' memory and the params' devices, when a plan is built."""
        checked: list[tuple[str, Any]] = [(f"params[{i}]", p) for i, p in enumerate(params)]
        for i, st in enumerate(states):
            for k, a in st.arrays().items():
                flags = a.flags
                if not flags.c_contiguous or not _writeable(flags):
                    self._check_arrays(params, None, states)  # raises, naming the array
                checked.append((f"states[{i}].{k}", a))
        self.runtime.check_devices(checked)

    def _plan(
        self,
        ctx: tuple[int, int],
        chunk: int,
        checked: Any,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        grad_addresses: Sequence[int] | None,
        states: Sequence[LarsState],
        uses_m: bool,
        stats_m: bool,
    ) -> _Plan:
        address = self.runtime.address
        live = checked.live
        param_addresses = list(map(address, map(params.__getitem__, live)))
        key = (ctx, chunk, uses_m, stats_m, checked.token)
        plan = self._plans.get(key)
        if plan is None or plan.param_addresses != param_addresses:
            self._check_states(params, states)
            if grads is not None:
                self._check_grad_devices(grads, live)
                rows = list(map(address, map(grads.__getitem__, live)))
            else:
                rows = list(map(grad_addresses.__getitem__, live))
            plan = self._build_plan(checked, param_addresses, rows, states, chunk, uses_m, stats_m)
            self._plans[key] = plan
            self._plans.move_to_end(key)
            if len(self._plans) > self._PLAN_CACHE_SIZE:
                _, old = self._plans.popitem(last=False)
                self._retire(old.blocks, old.keepalive)
                self._retire(old.tensors, old.rows_keepalive)
            return plan
        self._plans.move_to_end(key)
        if grads is not None:
            rows = list(map(address, map(grads.__getitem__, plan.order)))
        else:
            rows = list(map(grad_addresses.__getitem__, plan.order))
        if rows != plan.grad_addresses:
            if grads is not None:
                # Unchanged addresses are the memory checked before; new ones are checked here.
                self._check_grad_devices(grads, plan.order)
            self._set_grads(plan, rows)
        return plan

    def _check_grad_devices(self, grads: Sequence[Any], indices: Sequence[int]) -> None:
        if self.runtime.has_devices:
            self.runtime.check_devices([(f"grads[{i}]", grads[i]) for i in indices])

    def _set_grads(self, plan: _Plan, grad_addresses: list[int]) -> None:
        """New gradient addresses: rewrite the gradient column, upload the tensor rows."""
        plan.host.set_grads(grad_addresses)
        device_rows, keepalive = self.runtime.upload(plan.host.rows.reshape(-1))
        self._retire(plan.tensors, plan.rows_keepalive)
        plan.tensors = device_rows
        plan.rows_keepalive = keepalive
        plan.grad_addresses = grad_addresses

    def _retire(self, table: Any, keepalive: Any) -> None:
        self._retired.append((table, keepalive))
        while len(self._retired) > 2 * self._PLAN_CACHE_SIZE:
            _, held = self._retired.popleft()
            if held is not None:
                self.runtime.release(held)

    def _build_plan(
        self,
        checked: Any,
        param_addresses: list[int],
        grad_addresses: list[int],
        states: Sequence[LarsState],
        chunk: int,
        uses_m: bool,
        stats_m: bool,
    ) -> _Plan:
        """Tables for the live tensors; both address lists follow ``checked.live``."""
        check_no_overlap(checked.live, param_addresses, [checked.nbytes[i] for i in checked.live])
        host = tables.build_tables(
            checked.formats,
            [d.itemsize for d in checked.dtypes],
            checked.live,
            param_addresses,
            grad_addresses,
            states,
            self.runtime.address,
            chunk,
            uses_m,
            stats_m,
        )
        device_table, keepalive = self.runtime.upload(host.table)
        split = host.num_tensors * TENSOR_FIELDS
        return _Plan(
            param_addresses=param_addresses,
            host=host,
            grad_addresses=host.grad_addresses(),
            tensors=device_table[:split],
            blocks=device_table[split:],
            keepalive=keepalive,
        )

    def _scratch_for(self, ctx: tuple[int, int], plan: _Plan) -> _Scratch:
        """Grow-only scratch per (thread, device, stream): reused by every later step."""
        need_p, need_c = plan.num_blocks * SUMS, plan.num_tensors * COEF_WORDS
        mine: dict[tuple[int, int], _Scratch] = self._scratch.__dict__.setdefault("by_context", {})
        have = mine.get(ctx)
        if have is None or have.partials.size < need_p or have.coefs.size < need_c:
            old_p = 0 if have is None else have.partials.size
            old_c = 0 if have is None else have.coefs.size
            have = _Scratch(
                partials=self.runtime.empty(max(need_p, old_p), np.float64),
                coefs=self.runtime.empty(max(need_c, old_c), np.int32),
            )
            mine[ctx] = have
        return have


# ---- backends -------------------------------------------------------------------------------------
_BACKENDS: dict[tuple[str, int | None], CudaBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def _shared_backend(key: tuple[str, int | None], make: Callable[[], CudaBackend]) -> CudaBackend:
    """One backend per key and process: its caches (modules, tables) are shared."""
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(key)
        if backend is None:
            backend = _BACKENDS[key] = make()
    return backend


def cupy_backend() -> CudaBackend:
    """The backend for CuPy arrays (one per process; modules compile per device)."""
    return _shared_backend(
        ("cupy", None),
        lambda: CudaBackend(
            _CupyRuntime(),
            reason="CuPy arrays: fused CUDA kernels (rawkernels/lars_kernels.cu) compiled by "
            "cupy.RawModule and launched on CuPy's current stream",
        ),
    )


def emulated_backend(chunk_size: int | None = None) -> CudaBackend:
    """The CUDA kernels compiled for and run on the CPU, over NumPy arrays.

    ``chunk_size`` (elements per block; default :data:`CHUNK_SIZE` at call time)
    lets tests reach multi-chunk tensors with small arrays.
    """
    return _shared_backend(
        ("emulated", chunk_size),
        lambda: CudaBackend(
            _EmulatedRuntime(),
            reason="inside cupylars.testing.emulated_cuda(): the CUDA kernels of rawkernels/ "
            "compiled with g++ through the CPU shim and run on NumPy arrays",
            chunk_size=chunk_size,
        ),
    )
