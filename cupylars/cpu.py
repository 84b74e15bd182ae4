"""The native CPU backend: the fused LARS step on NumPy arrays (rawkernels/cpu/lars_cpu.cpp).

One call of :meth:`CpuBackend.update_many` is one call into the native library
for the whole list of tensors: a stats phase, a per-tensor finalize and an
update phase over fixed chunks, spread over the threads that torch (when it is
imported) or ``OMP_NUM_THREADS`` asks for. The math is the CUDA kernels' own
(``rawkernels/lars_math.h``), and the tables are the CUDA launcher's
(:mod:`cupylars.plan`).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from . import _interrupts, native, quantization
from . import plan as tables
from .batch import check_no_overlap, refuse_device_lr
from .config import LarsConfig, nonfinite_error
from .state import LarsState

if TYPE_CHECKING:
    from .batch import PreparedBatch

__all__ = [
    "DEFAULT_GROUP_BYTES",
    "WORK_PER_THREAD",
    "CpuBackend",
    "array_address",
    "cache_bytes",
    "group_bytes",
    "num_threads",
    "step_work",
    "threads_for",
]

# Where torch runs on OpenMP, a multi-threaded step runs on torch's OpenMP threads rather
# than on the backend's own pool: right after a torch op those threads spin for a while on
# the cores the pool needs (rawkernels/cpu/lars_cpu.cpp, "torch's OpenMP threads";
# docs/kernels.md, "Threads"). Never in a forked child (OpenMP regions hang there), which
# this module notes for the forks after its import, and the library for those after its load.
_TORCH_OPENMP: bool | None = None
_FORKED_CHILD = False


def _mark_forked_child() -> None:
    global _FORKED_CHILD
    _FORKED_CHILD = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_mark_forked_child)


def torch_runs_on_openmp() -> bool:
    """Whether torch is imported and its parallel backend is OpenMP."""
    global _TORCH_OPENMP
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    if _TORCH_OPENMP is None:
        try:
            info = torch.__config__.parallel_info()
        except Exception:  # a torch without it: assume not
            info = ""
        _TORCH_OPENMP = "ATen parallel backend: OpenMP" in info
    return _TORCH_OPENMP


def openmp_allowed() -> bool:
    """Whether multi-threaded steps may run on torch's OpenMP threads in this process."""
    return torch_runs_on_openmp() and not _FORKED_CHILD


_CODE_MAP = quantization.dynamic_map()
_CODE_MAP_ADDRESS = _CODE_MAP.ctypes.data


def array_address(a: np.ndarray) -> int:
    """The address of a NumPy array's first element."""
    # A ctypes view of the buffer gives the address without building the dict of
    # __array_interface__ (about 3x faster); it needs a writable, contiguous buffer of
    # at least one byte, so read-only arrays take the slow way.
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(cast(Any, a)))  # arrays are buffers
    except (TypeError, ValueError, BufferError):
        return int(a.__array_interface__["data"][0])


def num_threads() -> int:
    """Threads for a step: torch's setting when torch is imported, else ``OMP_NUM_THREADS``,
    else the CPUs this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return max(1, int(torch.get_num_threads()))
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Waking the pool's threads costs tens of microseconds per phase (two phases a step), which a
# small step does not earn back. A step runs on as many threads as it has WORK_PER_THREAD
# units of work for (at least one, at most num_threads()). A float32-state or stateless
# element is one unit; an 8-bit element, whose codec is compute-bound, is 3 (measured on a
# 2-core x86-64 VM: one thread wins below about 300k float32-state and 100k 8-bit elements).
# Results are bitwise the same on any thread count: the chunks and their summation order are.
WORK_PER_THREAD = 131_072
WORK_8BIT = 3


def step_work(sizes: Sequence[int], eight_bit: Sequence[bool]) -> int:
    """The work units of a step over tensors of ``sizes`` (see WORK_PER_THREAD)."""
    return sum(n * (WORK_8BIT if q else 1) for n, q in zip(sizes, eight_bit))


def threads_for(work: int) -> int:
    """Threads a step of ``work`` units runs on: only as many as the work pays for."""
    return max(1, min(num_threads(), work // WORK_PER_THREAD))


# A step runs stats -> finalize -> update per group of consecutive tensors whose p, g and m
# fit in the cache, so that the update reads them from the cache rather than from memory
# (docs/kernels.md, "The native CPU backend"). The budget is half the host's largest cache
# (the rest for what the update writes and for other work), else DEFAULT_GROUP_BYTES.
DEFAULT_GROUP_BYTES = 4 * 2**20
_CACHE_FOLDER = "/sys/devices/system/cpu/cpu0/cache"


def _size_bytes(text: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512") in bytes."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def cache_bytes(folder: str = _CACHE_FOLDER) -> int | None:
    """The size of the host's largest data (or unified) cache, from sysfs; None if unknown."""
    sizes = []
    try:
        for entry in sorted(os.listdir(folder)):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(folder, entry, "type"), encoding="ascii") as handle:
                kind = handle.read().strip()
            if kind in ("Data", "Unified"):
                with open(os.path.join(folder, entry, "size"), encoding="ascii") as handle:
                    sizes.append(_size_bytes(handle.read()))
    except (OSError, ValueError):
        return None
    return max(sizes) if sizes else None


def group_bytes() -> int:
    """The cache budget of one group of tensors in a native step (see DEFAULT_GROUP_BYTES)."""
    size = cache_bytes()
    return size // 2 if size else DEFAULT_GROUP_BYTES


class CpuPlanKey(NamedTuple):
    """What a batch's native tables depend on besides its tensors."""

    chunk: int
    uses_m: bool
    stats_m: bool


@dataclass(eq=False)
class CpuPlan:
    param_addresses: list[int]
    host: tables.Tables
    grad_addresses: list[int]
    tensors_ptr: int
    blocks_ptr: int
    work: int  # step_work of the live tensors


class CpuBackend:
    """Runs :func:`cupylars.functional.lars_update_many` through the native library."""

    name = "cpu"
    takes_addresses = True  # update_many accepts grad_addresses for grads
    reads_device_lr = False  # lr comes from the config

    def __init__(self, lib: Any, reason: str) -> None:
        self._step = lib.lars_cpu_step
        self._set_group_bytes = lib.lars_cpu_set_group_bytes
        self._set_group_bytes(group_bytes())
        # Absent from builds of older sources (benchmarks/cpu_builds.py): they use their own pool.
        self._use_openmp = getattr(lib, "lars_cpu_use_openmp", None)
        self.reason = reason

    def _allow_openmp(self) -> bool:
        """Tells the library whether multi-threaded steps may run on torch's OpenMP threads;
        returns whether the next one will."""
        if self._use_openmp is None:
            return False
        return bool(self._use_openmp(1 if openmp_allowed() else 0))

    def thread_pool(self) -> str:
        """Whose threads a step with more than one thread runs on, and why."""
        if self._allow_openmp():
            return "torch's OpenMP threads (the ones torch's own CPU ops run on)"
        if self._use_openmp is None:
            return "the backend's own thread pool (this build cannot hand over to OpenMP)"
        if _FORKED_CHILD:
            return "the backend's own thread pool (a forked child: OpenMP's threads do not survive fork)"
        if not torch_runs_on_openmp():
            return "the backend's own thread pool (torch is not imported, or does not run on OpenMP)"
        return "the backend's own thread pool (libgomp.so.1 is not loaded, or this is a forked child)"

    def set_group_bytes(self, nbytes: int) -> int:
        """Sets the cache budget of a group of tensors (bytes of p, g and m; 0: the whole step
        is one group) for the steps that follow, in this process; returns the previous one.
        Results are bitwise the same for any budget: only the order of memory accesses changes."""
        if nbytes < 0:
            raise ValueError(f"group bytes must be >= 0, got {nbytes}")
        return int(self._set_group_bytes(int(nbytes)))

    def __repr__(self) -> str:
        return f"<cupylars backend 'cpu': {self.reason}>"

    def update_many(
        self,
        params: Sequence[np.ndarray],
        grads: Sequence[np.ndarray] | None,
        states: Sequence[LarsState],
        cfg: LarsConfig,
        batch: PreparedBatch,
        grad_addresses: Sequence[int] | None = None,
        lr_device: Any | None = None,
    ) -> None:
        """One LARS step over a prepared batch (see cupylars.batch)."""
        refuse_device_lr(self, lr_device)
        live = batch.live
        if not live:
            return
        # What a remembered validation cannot vouch for: the parameters of this call are
        # writeable. (The state arrays are checked whenever tables are built for them.)
        if not all(params[i].flags.writeable for i in live):
            first = next(i for i in live if not params[i].flags.writeable)
            raise ValueError(f"params[{first}] is read-only: LARS updates parameters in place")
        # Strided parameters are stepped in a contiguous copy and written back; strided
        # gradients are read through a contiguous copy.
        staged = [(i, params[i]) for i in live if not params[i].flags.c_contiguous]
        if staged:
            params = list(params)
            for i, original in staged:
                params[i] = np.ascontiguousarray(original)
        if grads is not None and not all(grads[i].flags.c_contiguous for i in live):
            grads = [g if g.flags.c_contiguous else np.ascontiguousarray(g) for g in grads]

        uses_m = cfg.uses_momentum
        stats_m = uses_m and cfg.clips_update_norm
        # What this call changes beyond the native call's own writes (momentum allocated
        # here, staged parameters written back) happens with Ctrl-C held back, so that an
        # interrupted step is either not started or complete.
        changes_more = bool(staged) or (uses_m and not batch.has_momentum)
        with _interrupts.interrupts_deferred() if changes_more else nullcontext():
            self._step_staged(
                params, grads, grad_addresses, states, cfg, batch, staged, uses_m, stats_m
            )

    def _step_staged(
        self,
        params: Sequence[np.ndarray],
        grads: Sequence[np.ndarray] | None,
        grad_addresses: Sequence[int] | None,
        states: Sequence[LarsState],
        cfg: LarsConfig,
        batch: PreparedBatch,
        staged: list[tuple[int, np.ndarray]],
        uses_m: bool,
        stats_m: bool,
    ) -> None:
        allocated = batch.give_momentum(states, np) if uses_m and not batch.has_momentum else []
        chunk = tables.check_chunk(tables.CHUNK_SIZE)
        with batch.lock:
            plan = self._plan(batch, params, grads, grad_addresses, states, chunk, uses_m, stats_m)
        host = plan.host
        partials = np.empty(host.num_blocks * tables.SUMS, dtype=np.float64)
        coefs = np.empty(host.num_tensors * tables.COEF_WORDS, dtype=np.int32)
        self._allow_openmp()
        status = self._step(
            plan.tensors_ptr,
            host.num_tensors,
            plan.blocks_ptr,
            host.num_blocks,
            chunk,
            partials.ctypes.data,
            coefs.ctypes.data,
            _CODE_MAP_ADDRESS,
            tables.step_config(cfg).tobytes(),  # ctypes passes the bytes' address; the step copies them
            threads_for(plan.work),
        )
        if status != 0:
            for i in allocated:  # as they were: no momentum yet
                states[i].drop_momentum()
            gg = partials.reshape(-1, tables.SUMS)[:, 0]
            bad = sorted({int(i) for i in host.block_owner[~np.isfinite(gg)]})
            raise nonfinite_error(bad)
        for i, original in staged:
            original[...] = params[i]

    def _plan(
        self,
        batch: PreparedBatch,
        params: Sequence[np.ndarray],
        grads: Sequence[np.ndarray] | None,
        grad_addresses: Sequence[int] | None,
        states: Sequence[LarsState],
        chunk: int,
        uses_m: bool,
        stats_m: bool,
    ) -> CpuPlan:
        live = batch.live
        param_addresses = [array_address(params[i]) for i in live]
        key = CpuPlanKey(chunk, uses_m, stats_m)
        plan = batch.cpu_plans.get(key)
        if plan is None or plan.param_addresses != param_addresses:
            check_no_overlap(params, live)
            for i in live:
                for name, a in states[i].arrays().items():
                    if not (a.flags.c_contiguous and a.flags.writeable):
                        raise ValueError(f"states[{i}].{name} must be a writeable, C-contiguous array")
            if grads is not None:
                rows = [array_address(grads[i]) for i in live]
            else:
                assert grad_addresses is not None  # one of the two, by update_many's contract
                rows = [grad_addresses[i] for i in live]
            host = tables.build_tables(
                batch.formats,
                [d.itemsize for d in batch.dtypes],
                live,
                param_addresses,
                rows,
                states,
                array_address,
                chunk,
                uses_m,
                stats_m,
            )
            plan = CpuPlan(
                param_addresses=param_addresses,
                host=host,
                grad_addresses=host.grad_addresses(),
                tensors_ptr=host.table.ctypes.data,
                blocks_ptr=host.table.ctypes.data + host.num_tensors * tables.TENSOR_FIELDS * 8,
                work=step_work([params[i].size for i in live], [states[i].is_8bit for i in live]),
            )
            batch.cpu_plans[key] = plan
        if grads is not None:
            rows = [array_address(grads[i]) for i in plan.host.order]
        else:
            assert grad_addresses is not None
            rows = [grad_addresses[i] for i in plan.host.order]
        if rows != plan.grad_addresses:
            plan.host.set_grads(rows)
            plan.grad_addresses = rows
        return plan


_BACKEND: CpuBackend | None = None
_BACKEND_LOCK = threading.Lock()


def cpu_backend() -> CpuBackend:
    """The process's CPU backend; raises :class:`cupylars.native.NativeUnavailableError`."""
    global _BACKEND
    if _BACKEND is None:
        with _BACKEND_LOCK:
            if _BACKEND is None:
                lib = native.library()
                _BACKEND = CpuBackend(
                    lib,
                    reason=f"NumPy arrays: the native CPU backend ({native.library_path()}), compiled from "
                    "rawkernels/cpu/lars_cpu.cpp and the CUDA kernels' math (rawkernels/lars_math.h)",
                )
    return _BACKEND
