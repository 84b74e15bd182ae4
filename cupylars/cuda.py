"""CUDA backend: the LARS step as fused kernels over a list of tensors.

One call of :meth:`CudaBackend.update_many` launches, whatever the number of
tensors (docs/kernels.md):

1. ``lars_stats_<fmt>_<reads>``: one block per (tensor, chunk) writes the
   chunk's dot products g.g, p.p, m.m, g.p, g.m, p.m (float64; those of what the
   variant reads: g, p, m) to a scratch array;
2. ``lars_finalize``: one block per tensor reduces them in a fixed order and
   computes, on the device, the skip decision, the percentile history and gamma,
   the trust ratio, ||u|| and s, and advances the step counter;
3. ``lars_update_<fmt>_<state>``: one block per (tensor, chunk) updates p and m.

With max_unorm on, ``lars_unorm_exact`` and ``lars_unorm_finalize`` run between
2 and 3: for the tensors whose ||u|| the dot products cannot resolve (u nearly
cancels; the finalize pass flags them) they sum ||u|| from the u the update
applies and set s again; every other block returns at once.

One stats and one update launch per (storage format, state mode) present in
the list, so at most 21 launches and usually 5 (3 without max_unorm). Nothing is read back to the
host except with ``nonfinite='raise'``, which must know before the update
whether a gradient is finite: it reads the stats pass's partial sums (one
synchronisation) and raises before anything is modified.

CUDA graphs (docs/kernels.md): a step of a batch whose tables and scratch exist
(an earlier step built them, on any stream of the device) captures as its
launches alone. Inside a capture a step that would allocate, upload, download,
synchronise or free raises :class:`GraphCaptureError` before launching anything,
and the arrays a captured launch addresses are kept by the batch for its life.
Gradients at new addresses (allocated by a backward inside the capture) are
written into the graph's own copy of the tensor rows by ``lars_set_grads``
launches, their addresses passed by value, and the captured step reads that copy.

The same code sizes the grids, chooses the argument dtypes and launches for
two runtimes (:mod:`cupylars.cuda_runtime`): CuPy on a GPU and the CPU
emulator; the tables come from :mod:`cupylars.plan`.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import plan as tables
from . import quantization
from .batch import check_no_overlap
from .config import LarsConfig, nonfinite_error
from .cuda_runtime import (
    FINALIZE_THREADS,
    GRAD_PATCH,
    GRAD_PATCH_ROWS,
    THREADS,
    CupyRuntime,
    EmulatedRuntime,
    GraphCaptureError,
    cuda_include_dirs,
    kernel_names,
    kernel_sources,
)
from .plan import COEF_WORDS, SUMS, TENSOR_FIELDS
from .state import LarsState

if TYPE_CHECKING:
    from .batch import PreparedBatch

__all__ = [
    "FINALIZE_THREADS",
    "STATS_F32_PARTIALS",
    "STATS_F32_PARTIALS_ARCHS",
    "THREADS",
    "CudaBackend",
    "GraphCaptureError",
    "cuda_include_dirs",
    "cupy_backend",
    "emulated_backend",
    "grad_patches",
    "kernel_names",
    "kernel_sources",
    "record_launches",
]

# The float32-partials stats pass (docs/kernels.md): the GPU build takes it on these compute
# capabilities (rawkernels/lars_common.cuh, where float64 runs at 1/64 of the float32 rate);
# an emulated build takes it with these macros. tests/test_kernels_compile.py checks the list.
STATS_F32_PARTIALS_ARCHS = (86, 87, 89)
STATS_F32_PARTIALS = {"LARS_STATS_F32_PARTIALS": "1"}

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


# ---- metadata -----------------------------------------------------------------------------------
class CudaPlanKey(NamedTuple):
    """What a batch's CUDA tables depend on besides its tensors."""

    context: tuple  # the runtime's context (device)
    chunk: int
    uses_m: bool
    stats_m: bool
    need_p: bool


@dataclass(eq=False)
class CudaPlan:
    """Device tables for one list of parameters and states (cached while their arrays stay put).

    Everything here depends on the parameters and states only, except the
    gradient column of the tensor rows, rewritten (and the rows uploaded again)
    when the gradients move: a training loop that frees its gradients every
    step (``zero_grad(set_to_none=True)``) pays one small upload per step. Inside
    a CUDA graph capture the moved addresses go to ``graph_rows`` instead, by
    recorded launches (``CudaBackend._record_grads``).
    """

    param_addresses: list[int]  # of the live params, in the caller's order: the plan's key
    host: tables.Tables  # the host tables (the tensor rows are kept current)
    grad_addresses: list[int]  # what the device rows hold, in row order
    tensors: Any  # device int64 view: num_tensors x TENSOR_FIELDS
    blocks: Any  # device int64 view: num_blocks
    # A second copy of the tensor rows (device int64 view, same layout), read only by steps
    # captured over gradients at other addresses than ``grad_addresses``: their lars_set_grads
    # launches write its gradient and quad-access columns, so the rows eager steps read are
    # never written by the device. Uploaded with the table, so a capture allocates nothing.
    graph_rows: Any
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
class CudaScratch:
    partials: Any  # float64, SUMS per block
    coefs: Any  # int32, COEF_WORDS per tensor
    exact: Any  # float64, one per block: ||u||^2 of the chunk (lars_unorm_exact)


def grad_patches(grad_addresses: Sequence[int], vector: np.ndarray) -> list[np.ndarray]:
    """The ``lars_set_grads`` arguments that write ``grad_addresses`` and the quad-access
    flags ``vector`` (both in row order) into every row of a tensor table: one struct of
    up to GRAD_PATCH_ROWS consecutive rows per launch.

    Each struct is a size-1 NumPy array of ``GRAD_PATCH``: CuPy 13 and 14 both pass a
    size-1 host array to a kernel by value (CuPy 13 refuses a structured ``np.void``
    scalar), and so does the emulator, for a struct parameter."""
    patches: list[np.ndarray] = []
    n = len(grad_addresses)
    for first in range(0, n, GRAD_PATCH_ROWS):
        count = min(GRAD_PATCH_ROWS, n - first)
        # A fresh array per launch: the launch copies its bytes (a recorded launch keeps
        # them in the graph), and nothing writes this memory again.
        patch = np.zeros(1, GRAD_PATCH)
        patch["grad"][0, :count] = grad_addresses[first : first + count]
        patch["vector"] = sum(1 << k for k in np.flatnonzero(vector[first : first + count]).tolist())
        patch["first"] = first
        patch["count"] = count
        patches.append(patch)
    return patches


_FLAGS = attrgetter("flags")
_C_CONTIGUOUS = attrgetter("c_contiguous")


def _writeable(flags: Any) -> bool:
    # CuPy arrays have no read-only flag (cupy.ndarray.flags has no `writeable`).
    return getattr(flags, "writeable", True)


def check_alignment(named: Iterable[tuple[str, int, int]]) -> None:
    """Refuse memory not aligned to its elements: ``(name, address, itemsize)`` each.

    Every scalar access of a CUDA kernel must be aligned to its size, or the GPU faults
    (a misaligned-address error that ends the CUDA context); views at odd byte offsets
    (``np.frombuffer(buf, offset=1)``, a CuPy view of raw memory) are refused here.
    """
    for what, address, itemsize in named:
        if itemsize > 1 and address % itemsize:
            raise ValueError(
                f"{what} is not aligned to its {itemsize}-byte elements (address {address:#x}): the CUDA "
                "kernels access every element at its natural alignment, and a GPU faults on this one; "
                "pass an aligned array (a copy is)"
            )


class CudaBackend:
    """Runs :func:`cupylars.functional.lars_update_many` through the CUDA kernels."""

    takes_addresses = True  # update_many accepts grad_addresses for grads
    reads_device_lr = True  # update_many accepts lr_device for cfg.lr

    _RETIRED_KEPT = 32  # replaced tables kept alive (see _retired)

    def __init__(self, runtime: Any, reason: str, chunk_size: int | None = None) -> None:
        self.runtime = runtime
        self.name: str = runtime.name
        self.reason = reason
        self.chunk_size = chunk_size
        # Replaced device tables and their upload buffers, let go once they are old enough
        # that no queued kernel reads them and their copies have long run (releasing an
        # upload buffer synchronises with its copy). A CUDA graph captured over a table
        # keeps replaying correctly while the table is here.
        self._retired: deque[tuple[Any, Any]] = deque()
        self._retired_lock = threading.Lock()
        self._watched: weakref.WeakSet[PreparedBatch] = weakref.WeakSet()
        self._writeable = attrgetter("writeable") if runtime.xp is np else _writeable
        self._code_tables: dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"<cupylars CUDA backend {self.name!r}: {self.reason}>"

    # -- public ----------------------------------------------------------------------------------
    def update_many(
        self,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        states: Sequence[LarsState],
        cfg: LarsConfig,
        batch: PreparedBatch,
        grad_addresses: Sequence[int] | None = None,
        lr_device: Any | None = None,
    ) -> None:
        """One LARS step over validated tensors (see functional.lars_update_many).

        ``lr_device``, when given, is an array of one float32 or float64 element on
        the device that the finalize kernel reads lr from when it runs (``cfg.lr`` is
        then not used): a captured CUDA graph reads its value at every replay.

        ``batch`` is the prepared batch (formats,
        live tensors, a token per validated set of states). ``grad_addresses``
        stands in for ``grads`` (then None): the addresses of contiguous
        gradients, one per parameter, that the caller has checked against the
        parameters (dtype, shape, device), as the torch adapter does.
        """
        self._check_call(params, grads, states)
        lr_f64, lr_f32 = self._lr_pointers(lr_device)
        live = batch.live
        if not live:
            self._check_arrays(params, grads, states)  # as any call: before deciding to do nothing
            return  # empty tensors: no launch, no counter changes
        chunk = self._chunk()
        rt = self.runtime
        uses_m = cfg.uses_momentum
        stats_m = uses_m and cfg.clips_update_norm
        need_p = cfg.uses_trust_ratio or cfg.clips_update_norm
        raising = cfg.nonfinite == "raise"
        capturing = rt.is_capturing()
        if capturing:
            if raising:
                raise GraphCaptureError(
                    "cupylars: nonfinite='raise' cannot be captured in a CUDA graph: it reads the "
                    "gradients' norms on the host (a synchronisation) before updating; use 'skip' "
                    "(the default) or 'propagate' in a captured step"
                )
            if uses_m and not batch.has_momentum:
                raise GraphCaptureError(
                    "cupylars: the first step with momentum allocates the momentum arrays, which a "
                    "CUDA graph cannot record; run one step outside the capture first"
                )
        if uses_m and not raising and not batch.has_momentum:
            self._give_momentum(batch, states)

        ctx = rt.context()
        with batch.lock:
            plan, captured_grads = self._plan(
                ctx, chunk, batch, params, grads, grad_addresses, states, uses_m, stats_m, need_p,
                capturing,
            )
        scratch = self._scratch_for(ctx, plan, batch, capturing)
        code_table = self._code_table(ctx[0], capturing)
        tensors = plan.tensors
        if capturing:
            if captured_grads is not None:
                # Gradients at new addresses (a backward inside the capture allocated them):
                # every replay first writes them into the graph's copy of the rows, and the
                # launches below read that copy. Recorded after every check that could raise,
                # so a refused capture records nothing.
                tensors = plan.graph_rows
                self._record_grads(plan, captured_grads)
            # The graph addresses these arrays at every replay: the batch keeps them for its
            # life, whatever later steps replace (a graph outliving its batch is the caller's
            # to avoid: keep the batch, as the torch adapter does).
            batch.pin(
                tensors, plan.blocks, scratch.partials, scratch.coefs, scratch.exact, code_table, lr_device
            )
        # What the stats pass reads (g; p; m) is in its kernel's name (the plan's runs).
        self._launch_chunks(plan.host.stats_runs, tensors, plan, chunk, code_table, scratch.partials)

        if raising:
            # The one synchronising path: the stats pass's g.g partials say which
            # gradients are finite before anything is written.
            gg = rt.download(scratch.partials[: plan.num_blocks * SUMS]).reshape(-1, SUMS)[:, 0]
            bad = sorted({int(i) for i in plan.host.block_owner[~np.isfinite(gg)]})
            if bad:
                raise nonfinite_error(bad)
            if uses_m and not batch.has_momentum:
                self._give_momentum(batch, states)
                with batch.lock:
                    plan, _ = self._plan(
                        ctx, chunk, batch, params, grads, grad_addresses, states, uses_m, stats_m,
                        need_p, False,
                    )
                tensors = plan.tensors

        # The hyperparameters travel by value (a host array, so a capture records them).
        step = tables.step_config(cfg)
        self._launch(
            "lars_finalize",
            (plan.num_tensors,),
            (FINALIZE_THREADS,),
            (tensors, scratch.partials, scratch.coefs, lr_f64, lr_f32, step),
        )
        if cfg.clips_update_norm:
            # ||u|| of the tensors finalize flagged (u nearly cancels) from u itself, then s
            # again; launched whatever the data, so the step has no host decision and captures.
            self._launch(
                "lars_unorm_exact",
                (plan.num_blocks,),
                (THREADS,),
                (tensors, plan.blocks, np.int32(chunk), scratch.coefs, code_table, step, scratch.exact),
            )
            self._launch(
                "lars_unorm_finalize",
                (plan.num_tensors,),
                (FINALIZE_THREADS,),
                (tensors, scratch.exact, scratch.coefs, step),
            )
        # Launched last-first: the stats pass ended there, so that data may still be in L2.
        update_runs = plan.host.update_runs[::-1]
        self._launch_chunks(update_runs, tensors, plan, chunk, scratch.coefs, code_table, step)

    # -- internals -------------------------------------------------------------------------------
    def _code_table(self, device: int, capturing: bool) -> Any:
        """quantization.code_table() on ``device`` (the 8-bit kernels' map and thresholds),
        uploaded at its first use there and kept."""
        table = self._code_tables.get(device)
        if table is None:
            if capturing:
                raise GraphCaptureError(
                    "cupylars: uploading the 8-bit code table would be recorded in a CUDA graph "
                    "capture; run one step outside the capture first"
                )
            table = self._code_tables[device] = self.runtime.xp.asarray(quantization.code_table())
        return table

    def _lr_pointers(self, lr_device: Any | None) -> tuple[np.uint64, np.uint64]:
        """The finalize kernel's (lr_f64, lr_f32) pointers: 0 (nullptr) or the device lr's address."""
        null = np.uint64(0)
        if lr_device is None:
            return null, null
        dtype = np.dtype(lr_device.dtype)
        if lr_device.size != 1 or dtype not in (np.float32, np.float64):
            raise ValueError(
                f"lr_device must be one float32 or float64 element, got {lr_device.size} of {dtype}"
            )
        self.runtime.check_devices([("lr_device", lr_device)])
        address = np.uint64(self.runtime.address(lr_device))
        return (address, null) if dtype == np.float64 else (null, address)

    def _chunk(self) -> int:
        return tables.check_chunk(self.chunk_size if self.chunk_size is not None else tables.CHUNK_SIZE)

    def _launch_chunks(
        self, runs: Sequence[tuple[str, int, int]], tensors: Any, plan: CudaPlan, chunk: int, *tail: Any
    ) -> None:
        """One launch per run of blocks; the stats and update kernels share their leading
        arguments. ``tensors``: the plan's rows, or its graph rows in a capture over new
        gradient addresses."""
        for kernel, first, count in runs:
            args = (tensors, plan.blocks, np.int32(first), np.int32(chunk), *tail)
            self._launch(kernel, (count,), (THREADS,), args)

    def _record_grads(self, plan: CudaPlan, grad_addresses: list[int]) -> None:
        """Launches (inside a capture: recorded) that write ``grad_addresses`` (row order) and
        their quad-access flags into every row of ``plan.graph_rows``.

        Every row, not only those that differ from the eager rows: the graph rows are shared
        by every graph captured over this plan, so each replay must leave no field another
        graph wrote. The other fields of a row are the plan's for its whole life (a new
        parameter or state array makes a new plan), written once by the table's upload, so
        the graph needs no device-to-device copy of the eager rows either.
        """
        host = plan.host
        vector = host.vector_base & (np.array(grad_addresses, dtype=np.int64) % host.grad_width == 0)
        for patch in grad_patches(grad_addresses, vector):
            self._launch("lars_set_grads", (1,), (GRAD_PATCH_ROWS,), (plan.graph_rows, patch))

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
        self._check_alignment(checked)

    def _check_alignment(self, named_arrays: Sequence[tuple[str, Any]]) -> None:
        address = self.runtime.address
        check_alignment(
            (what, address(a), np.dtype(a.dtype).itemsize) for what, a in named_arrays if a.size
        )

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
        self._check_alignment(checked)

    def _plan(
        self,
        ctx: tuple,
        chunk: int,
        batch: PreparedBatch,
        params: Sequence[Any],
        grads: Sequence[Any] | None,
        grad_addresses: Sequence[int] | None,
        states: Sequence[LarsState],
        uses_m: bool,
        stats_m: bool,
        need_p: bool,
        capturing: bool,
    ) -> tuple[CudaPlan, list[int] | None]:
        """The batch's tables for this step, and, inside a capture over gradients at other
        addresses than the tables hold, those addresses in row order (for _record_grads;
        else None). Outside a capture, moved gradients are written into the rows and
        uploaded (one small upload)."""
        address = self.runtime.address
        live = batch.live
        param_addresses = list(map(address, map(params.__getitem__, live)))
        key = CudaPlanKey(ctx, chunk, uses_m, stats_m, need_p)
        plan = batch.cuda_plans.get(key)
        if plan is None or plan.param_addresses != param_addresses:
            if capturing:
                why = "no step of this batch has run with these switches" if plan is None else (
                    "a parameter moved since the last step"
                )
                raise GraphCaptureError(
                    f"cupylars: building the device tables ({why}) would upload them inside a CUDA "
                    "graph capture; run one step outside the capture first, with the same tensors"
                )
            self._check_states(params, states)
            if grads is not None:
                self._check_grad_devices(grads, live)
                rows = list(map(address, map(grads.__getitem__, live)))
            else:
                assert grad_addresses is not None  # one of the two, by update_many's contract
                rows = list(map(grad_addresses.__getitem__, live))
            _check_grad_alignment(rows, live, [batch.dtypes[i].itemsize for i in live])
            check_no_overlap(params, live)
            if plan is not None:
                self._retire_plan(plan)
            if batch not in self._watched:
                # A dropped batch's tables are retired, not freed: kernels queued on them, and
                # their copies from pinned buffers, may still be pending.
                self._watched.add(batch)
                weakref.finalize(batch, self._retire_all, batch.cuda_plans)
            plan = batch.cuda_plans[key] = self._build_plan(
                batch, param_addresses, rows, states, chunk, uses_m, stats_m, need_p
            )
            return plan, None
        if grads is not None:
            rows = list(map(address, map(grads.__getitem__, plan.order)))
        else:
            assert grad_addresses is not None
            rows = list(map(grad_addresses.__getitem__, plan.order))
        if rows != plan.grad_addresses:
            if grads is not None:
                # Unchanged addresses are the memory checked before; new ones are checked here.
                self._check_grad_devices(grads, plan.order)
            _check_grad_alignment(rows, plan.order, (plan.host.grad_width // 4).tolist())
            if capturing:
                # No upload in a capture: the caller records the addresses by value into the
                # graph rows. The eager rows (and plan.grad_addresses) stay as they are, so a
                # later eager step with the old gradients needs no upload either.
                return plan, rows
            self._set_grads(plan, rows)
        return plan, None

    def _check_grad_devices(self, grads: Sequence[Any], indices: Sequence[int]) -> None:
        if self.runtime.has_devices:
            self.runtime.check_devices([(f"grads[{i}]", grads[i]) for i in indices])

    def _set_grads(self, plan: CudaPlan, grad_addresses: list[int]) -> None:
        """New gradient addresses: rewrite the gradient column, upload the tensor rows."""
        plan.host.set_grads(grad_addresses)
        device_rows, keepalive = self.runtime.upload(plan.host.rows.reshape(-1))
        self._retire(plan.tensors, plan.rows_keepalive)
        plan.tensors = device_rows
        plan.rows_keepalive = keepalive
        plan.grad_addresses = grad_addresses

    def _give_momentum(self, batch: PreparedBatch, states: Sequence[LarsState]) -> None:
        """Zeroed momentum arrays for every live state; the batch's tables of the old
        arrays go."""
        for plan in batch.cuda_plans.values():
            self._retire_plan(plan)
        batch.give_momentum(states, self.runtime.xp)

    def _retire_all(self, plans: dict[CudaPlanKey, CudaPlan]) -> None:
        for plan in plans.values():
            self._retire_plan(plan)

    def _retire_plan(self, plan: CudaPlan) -> None:
        self._retire(plan.blocks, plan.keepalive)
        self._retire(plan.tensors, plan.rows_keepalive)

    def _retire(self, table: Any, keepalive: Any) -> None:
        self._retired.append((table, keepalive))
        with self._retired_lock:
            while len(self._retired) > self._RETIRED_KEPT:
                _, held = self._retired.popleft()
                if held is not None:
                    self.runtime.release(held)

    def _build_plan(
        self,
        batch: PreparedBatch,
        param_addresses: list[int],
        grad_addresses: list[int],
        states: Sequence[LarsState],
        chunk: int,
        uses_m: bool,
        stats_m: bool,
        need_p: bool,
    ) -> CudaPlan:
        """Tables for the live tensors; both address lists follow ``batch.live``."""
        host = tables.build_tables(
            batch.formats,
            [d.itemsize for d in batch.dtypes],
            batch.live,
            param_addresses,
            grad_addresses,
            states,
            self.runtime.address,
            chunk,
            uses_m,
            stats_m,
            need_p,
        )
        # The graph copy of the rows rides in the same upload (rows, blocks, rows again): no
        # second allocation or copy per plan, and a capture finds it already on the device.
        split = host.num_tensors * TENSOR_FIELDS
        device_table, keepalive = self.runtime.upload(np.concatenate((host.table, host.table[:split])))
        end = split + host.num_blocks
        return CudaPlan(
            param_addresses=param_addresses,
            host=host,
            grad_addresses=host.grad_addresses(),
            tensors=device_table[:split],
            blocks=device_table[split:end],
            graph_rows=device_table[end:],
            keepalive=keepalive,
        )

    def _scratch_for(self, ctx: tuple, plan: CudaPlan, batch: PreparedBatch, capturing: bool) -> CudaScratch:
        """The batch's grow-only scratch per device (see CupyRuntime.context), reused by every
        later step: two batches stepped at once (two threads, one stream) never share partial
        sums."""
        need_p, need_c = plan.num_blocks * SUMS, plan.num_tensors * COEF_WORDS
        mine = batch.cuda_scratch
        have = mine.get(ctx)
        if (
            have is None
            or have.partials.size < need_p
            or have.coefs.size < need_c
            or have.exact.size < plan.num_blocks
        ):
            if capturing:
                raise GraphCaptureError(
                    "cupylars: this batch's scratch must be allocated, which a CUDA graph capture "
                    "cannot record; run one step outside the capture first, with the same tensors"
                )
            old_p = 0 if have is None else have.partials.size
            old_c = 0 if have is None else have.coefs.size
            old_e = 0 if have is None else have.exact.size
            if have is not None:
                # Kernels queued on another stream may still use it: retired, not dropped.
                self._retire(have, self.runtime.fence())
            have = CudaScratch(
                partials=self.runtime.empty(max(need_p, old_p), np.float64),
                coefs=self.runtime.empty(max(need_c, old_c), np.int32),
                exact=self.runtime.empty(max(plan.num_blocks, old_e), np.float64),
            )
            mine[ctx] = have
        return have


def _check_grad_alignment(addresses: Sequence[int], indices: Sequence[int], itemsizes: Sequence[int]) -> None:
    """Gradient addresses (of tensors ``indices``) aligned to their elements."""
    misaligned = np.array(addresses, dtype=np.int64) % np.array(itemsizes, dtype=np.int64)
    if misaligned.any():
        k = int(np.flatnonzero(misaligned)[0])
        check_alignment([(f"grads[{indices[k]}]", int(addresses[k]), int(itemsizes[k]))])


# ---- backends -------------------------------------------------------------------------------------
_BACKENDS: dict[tuple[Any, ...], CudaBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def _shared_backend(key: tuple[Any, ...], make: Callable[[], CudaBackend]) -> CudaBackend:
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
            CupyRuntime(),
            reason="CuPy arrays: fused CUDA kernels (rawkernels/lars_kernels.cu) compiled by "
            "cupy.RawModule and launched on CuPy's current stream",
        ),
    )


def emulated_backend(chunk_size: int | None = None, defines: Mapping[str, str] | None = None) -> CudaBackend:
    """The CUDA kernels compiled for and run on the CPU, over NumPy arrays.

    ``chunk_size`` (elements per block; default :data:`CHUNK_SIZE` at call time)
    lets tests reach multi-chunk tensors with small arrays. ``defines``: -D macros
    of the emulated build, e.g. :data:`STATS_F32_PARTIALS` (the stats pass the GPU
    build uses on sm_86, sm_87 and sm_89); each set of macros is its own backend.
    """
    key_defines = tuple(sorted((k, str(v)) for k, v in (defines or {}).items()))
    return _shared_backend(
        ("emulated", chunk_size) if not key_defines else ("emulated", chunk_size, key_defines),
        lambda: CudaBackend(
            EmulatedRuntime(dict(key_defines)),
            reason="inside cupylars.testing.emulated_cuda(): the CUDA kernels of rawkernels/ "
            "compiled with g++ through the CPU shim and run on NumPy arrays"
            + (f" (built with {', '.join(f'-D{k}={v}' for k, v in key_defines)})" if key_defines else ""),
            chunk_size=chunk_size,
        ),
    )
