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

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import quantization
from ._paths import kernel_dir
from .config import NONFINITE_POLICIES, LarsConfig
from .formats import FORMATS
from .state import LarsState

__all__ = [
    "CHUNK_SIZE",
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
TILE = 256  # kTile: elements a warp handles per iteration, one 8-bit absmax block
SUMS = 6  # kSums
TENSOR_FIELDS = 12  # kTensorFields
FIELD_PARAM, FIELD_GRAD, FIELD_STATE, FIELD_ABSMAX = 0, 1, 2, 3
FIELD_STEP, FIELD_SKIP, FIELD_HISTORY, FIELD_SIZE = 4, 5, 6, 7
FIELD_FIRST_BLOCK, FIELD_NUM_BLOCKS, FIELD_VECTOR = 8, 9, 10
COEF_WORDS = 4  # sizeof(TensorCoef) / 4
SWITCH_PERCENTILE, SWITCH_TRUST, SWITCH_TRUST_CLIP = 1, 2, 4
SWITCH_MOMENTUM, SWITCH_NESTEROV, SWITCH_UNORM = 8, 16, 32
NO_STATE, STATE_32, STATE_8 = 0, 1, 2

FORMAT_NAMES = ("f32", "f16", "bf16")  # kernel-name spelling of formats.FORMATS
STATE_NAMES = ("nostate", "state32", "state8")
KERNEL_SOURCE = "lars_kernels.cu"
KERNEL_HEADER = "lars_common.cuh"

#: Default elements per (tensor, chunk) block: 64 per thread of a 256-thread
#: block. A multiple of TILE so that chunks never split an 8-bit absmax block.
CHUNK_SIZE = 16384


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
        base = ("--std=c++17", f"-I{kernel_dir()}", f"-DCUPYLARS_SOURCE_DIGEST=0x{_source_digest()}")
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

    def context(self) -> tuple[int, int]:
        return (-1, 0)

    def address(self, a: Any) -> int:
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
@dataclass
class _Plan:
    """Device tables for one list of tensors (cached while their arrays stay put)."""

    table: Any  # device int64: tensor rows, then one entry per block
    tensors: Any  # view: num_tensors x TENSOR_FIELDS
    blocks: Any  # view: num_blocks
    num_tensors: int
    num_blocks: int
    stats_launches: list[tuple[str, int, int]]  # (kernel, first block, blocks)
    update_launches: list[tuple[str, int, int]]
    block_owner: np.ndarray  # host: caller's tensor index of each block
    keepalive: Any  # the runtime's hold on the upload's host buffer


@dataclass
class _Scratch:
    partials: Any  # float64, SUMS per block
    coefs: Any  # int32, COEF_WORDS per tensor


def _vector_ok(addresses: Sequence[int], widths: Sequence[int]) -> bool:
    return all(a % w == 0 for a, w in zip(addresses, widths))


class CudaBackend:
    """Runs :func:`cupylars.functional.lars_update_many` through the CUDA kernels."""

    _PLAN_CACHE_SIZE = 16

    def __init__(self, runtime: Any, reason: str, chunk_size: int | None = None) -> None:
        self.runtime = runtime
        self.name: str = runtime.name
        self.reason = reason
        self.chunk_size = chunk_size
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._scratch: dict[tuple[int, int], _Scratch] = {}

    def __repr__(self) -> str:
        return f"<cupylars CUDA backend {self.name!r}: {self.reason}>"

    # -- public ----------------------------------------------------------------------------------
    def update_many(
        self,
        params: Sequence[Any],
        grads: Sequence[Any],
        states: Sequence[LarsState],
        cfg: LarsConfig,
        formats: Sequence[str],
    ) -> None:
        """One LARS step over validated tensors (see functional.lars_update_many)."""
        self._check_arrays(params, grads, states)
        live = [i for i, p in enumerate(params) if p.size > 0]
        if not live:
            return  # empty tensors: no launch, no counter changes
        chunk = self._chunk()
        rt = self.runtime
        uses_m = cfg.uses_momentum
        stats_m = uses_m and cfg.clips_update_norm
        need_p = cfg.uses_trust_ratio or cfg.clips_update_norm
        raising = cfg.nonfinite == "raise"
        if uses_m and not raising:
            for i in live:
                states[i].ensure_momentum(rt.xp)

        ctx = rt.context()
        plan = self._plan(ctx, chunk, live, params, grads, states, formats, uses_m, stats_m)
        scratch = self._scratch_for(ctx, plan)
        code_map = rt.code_map()
        self._launch_chunks(plan.stats_launches, plan, chunk, np.int32(need_p), code_map, scratch.partials)

        if raising:
            # The one synchronising path: the stats pass's g.g partials say which
            # gradients are finite before anything is written.
            gg = rt.download(scratch.partials[: plan.num_blocks * SUMS]).reshape(-1, SUMS)[:, 0]
            bad = sorted({int(i) for i in plan.block_owner[~np.isfinite(gg)]})
            if bad:
                raise FloatingPointError(f"non-finite gradient in tensor(s) {bad}; nothing was updated")
            if uses_m and any(not states[i].has_momentum for i in live):
                for i in live:
                    states[i].ensure_momentum(rt.xp)
                plan = self._plan(ctx, chunk, live, params, grads, states, formats, uses_m, stats_m)

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
                np.int32(_switches(cfg)),
                np.int32(NONFINITE_POLICIES.index(cfg.nonfinite)),
            ),
        )
        # float32 factors exactly as the reference rounds them
        lam = np.float32(cfg.weight_decay)
        mu = np.float32(cfg.momentum)
        keep = np.float32(1.0 - cfg.dampening)
        # Launched last-first: the stats pass ended there, so that data may still be in L2.
        tail = (scratch.coefs, code_map, lam, mu, keep, np.int32(cfg.nesterov))
        self._launch_chunks(plan.update_launches[::-1], plan, chunk, *tail)

    # -- internals -------------------------------------------------------------------------------
    def _chunk(self) -> int:
        chunk = int(self.chunk_size if self.chunk_size is not None else CHUNK_SIZE)
        if chunk <= 0 or chunk % TILE or chunk >= 2**31:
            raise ValueError(f"chunk size must be a positive multiple of {TILE} below 2**31, got {chunk}")
        return chunk

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

    def _check_arrays(self, params: Sequence[Any], grads: Sequence[Any], states: Sequence[LarsState]) -> None:
        """Everything the kernels assume of memory, checked before any launch."""
        checked: list[tuple[str, Any]] = []
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            arrays = [(f"params[{i}]", p, True), (f"grads[{i}]", g, False)]
            arrays += [(f"states[{i}].{k}", a, True) for k, a in st.arrays().items()]
            for what, a, written in arrays:
                flags = a.flags
                if not flags.c_contiguous:
                    raise ValueError(
                        f"{what} is not C-contiguous: the CUDA kernels address tensors as flat "
                        "memory; pass a contiguous array (for example a copy)"
                    )
                if written and not flags.writeable:
                    raise ValueError(f"{what} is read-only")
                checked.append((what, a))
        self.runtime.check_devices(checked)

    def _plan(
        self,
        ctx: tuple[int, int],
        chunk: int,
        live: Sequence[int],
        params: Sequence[Any],
        grads: Sequence[Any],
        states: Sequence[LarsState],
        formats: Sequence[str],
        uses_m: bool,
        stats_m: bool,
    ) -> _Plan:
        address = self.runtime.address
        rows = []
        for i in live:
            st = states[i]
            mode = (STATE_8 if st.is_8bit else STATE_32) if uses_m else NO_STATE
            state = st.codes if st.is_8bit else st.momentum
            rows.append(
                (
                    FORMATS.index(formats[i]),
                    mode,
                    i,
                    address(params[i]),
                    address(grads[i]),
                    address(state) if (uses_m and state is not None) else 0,
                    address(st.absmax) if (uses_m and st.is_8bit and st.absmax is not None) else 0,
                    address(st.step_count),
                    address(st.skip_count),
                    address(st.history),
                    int(params[i].size),
                    int(params[i].itemsize),
                )
            )
        key = (ctx, chunk, uses_m, stats_m, tuple(rows))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = self._build_plan(rows, chunk, stats_m)
        self._plans[key] = plan
        if len(self._plans) > self._PLAN_CACHE_SIZE:
            _, old = self._plans.popitem(last=False)
            self.runtime.release(old.keepalive)
        return plan

    def _build_plan(self, rows: list[tuple], chunk: int, stats_m: bool) -> _Plan:
        # Tensors sorted by (format, state mode): each kernel variant covers one
        # contiguous run of blocks, and each tensor's blocks are contiguous.
        rows = sorted(rows, key=lambda r: (r[0], r[1], r[2]))
        num_tensors = len(rows)
        sizes = np.array([r[10] for r in rows], dtype=np.int64)
        nblocks = -(-sizes // chunk)
        first = np.concatenate([[0], np.cumsum(nblocks)[:-1]]).astype(np.int64)
        num_blocks = int(nblocks.sum())

        table = np.zeros(num_tensors * TENSOR_FIELDS + num_blocks, dtype=np.int64)
        tens = table[: num_tensors * TENSOR_FIELDS].reshape(num_tensors, TENSOR_FIELDS)
        blocks = table[num_tensors * TENSOR_FIELDS :]
        owner = np.empty(num_blocks, dtype=np.int64)
        update_runs: list[list] = []
        stats_runs: list[list] = []
        for k, (fmt, mode, index, p, g, m, absmax, step, skip, hist, n, itemsize) in enumerate(rows):
            width = 4 * itemsize  # a quad of p or g
            addresses, widths = [p, g], [width, width]
            if m:
                addresses.append(m)
                widths.append(16 if mode == STATE_32 else 4)  # quad of float32 m / of codes
            tens[k, FIELD_PARAM] = p
            tens[k, FIELD_GRAD] = g
            tens[k, FIELD_STATE] = m
            tens[k, FIELD_ABSMAX] = absmax
            tens[k, FIELD_STEP] = step
            tens[k, FIELD_SKIP] = skip
            tens[k, FIELD_HISTORY] = hist
            tens[k, FIELD_SIZE] = n
            tens[k, FIELD_FIRST_BLOCK] = first[k]
            tens[k, FIELD_NUM_BLOCKS] = nblocks[k]
            tens[k, FIELD_VECTOR] = int(_vector_ok(addresses, widths))
            lo, count = int(first[k]), int(nblocks[k])
            blocks[lo : lo + count] = (np.int64(k) << 32) | np.arange(count, dtype=np.int64)
            owner[lo : lo + count] = index
            for runs, kernel in (
                (update_runs, f"lars_update_{FORMAT_NAMES[fmt]}_{STATE_NAMES[mode]}"),
                (stats_runs, f"lars_stats_{FORMAT_NAMES[fmt]}_{STATE_NAMES[mode if stats_m else NO_STATE]}"),
            ):
                if runs and runs[-1][0] == kernel:
                    runs[-1][2] += count
                else:
                    runs.append([kernel, lo, count])

        device_table, keepalive = self.runtime.upload(table)
        return _Plan(
            table=device_table,
            tensors=device_table[: num_tensors * TENSOR_FIELDS],
            blocks=device_table[num_tensors * TENSOR_FIELDS :],
            num_tensors=num_tensors,
            num_blocks=num_blocks,
            stats_launches=[tuple(r) for r in stats_runs],
            update_launches=[tuple(r) for r in update_runs],
            block_owner=owner,
            keepalive=keepalive,
        )

    def _scratch_for(self, ctx: tuple[int, int], plan: _Plan) -> _Scratch:
        """Grow-only scratch per (device, stream): reused by every later step."""
        need_p, need_c = plan.num_blocks * SUMS, plan.num_tensors * COEF_WORDS
        have = self._scratch.get(ctx)
        if have is None or have.partials.size < need_p or have.coefs.size < need_c:
            old_p = 0 if have is None else have.partials.size
            old_c = 0 if have is None else have.coefs.size
            have = _Scratch(
                partials=self.runtime.empty(max(need_p, old_p), np.float64),
                coefs=self.runtime.empty(max(need_c, old_c), np.int32),
            )
            self._scratch[ctx] = have
        return have


def _switches(cfg: LarsConfig) -> int:
    bits = 0
    bits |= SWITCH_PERCENTILE if cfg.clips_percentile else 0
    bits |= SWITCH_TRUST if cfg.uses_trust_ratio else 0
    bits |= SWITCH_TRUST_CLIP if cfg.trust_clip else 0
    bits |= SWITCH_MOMENTUM if cfg.uses_momentum else 0
    bits |= SWITCH_NESTEROV if cfg.nesterov else 0
    bits |= SWITCH_UNORM if cfg.clips_update_norm else 0
    return bits


# ---- backends -------------------------------------------------------------------------------------
_BACKENDS: dict[tuple[str, int | None], CudaBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def cupy_backend() -> CudaBackend:
    """The backend for CuPy arrays (one per process; modules compile per device)."""
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(("cupy", None))
        if backend is None:
            backend = CudaBackend(
                _CupyRuntime(),
                reason="CuPy arrays: fused CUDA kernels (rawkernels/lars_kernels.cu) compiled by "
                "cupy.RawModule and launched on CuPy's current stream",
            )
            _BACKENDS[("cupy", None)] = backend
    return backend


def emulated_backend(chunk_size: int | None = None) -> CudaBackend:
    """The CUDA kernels compiled for and run on the CPU, over NumPy arrays.

    ``chunk_size`` (elements per block; default :data:`CHUNK_SIZE` at call time)
    lets tests reach multi-chunk tensors with small arrays.
    """
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(("emulated", chunk_size))
        if backend is None:
            backend = CudaBackend(
                _EmulatedRuntime(),
                reason="inside cupylars.testing.emulated_cuda(): the CUDA kernels of rawkernels/ "
                "compiled with g++ through the CPU shim and run on NumPy arrays",
                chunk_size=chunk_size,
            )
            _BACKENDS[("emulated", chunk_size)] = backend
    return backend
