"""The tables a fused step reads: pure NumPy, shared by the CUDA and native CPU backends.

A step over a list of tensors is described by two int64 tables in one array
(the layout of ``rawkernels/lars_math.h``):

* the tensor table, one row of :data:`TENSOR_FIELDS` per non-empty tensor: the
  addresses of p, g, m (or the 8-bit codes), absmax, the counters and the
  history, the size, the tensor's first chunk and number of chunks, whether
  its memory allows 16-byte accesses, and its kind (format and state mode);
* the block table, one entry per chunk of :data:`CHUNK_SIZE` elements:
  ``(row << 32) | chunk index``.

Rows are sorted by (format, state mode), so that on the GPU each kernel variant
covers one contiguous run of blocks (:attr:`Tables.stats_runs`,
:attr:`Tables.update_runs`); the CPU dispatches per row on its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import NONFINITE_POLICIES, LarsConfig
from .formats import FORMATS
from .state import LarsState

__all__ = [
    "CHUNK_SIZE",
    "STEP_CONFIG",
    "TENSOR_FIELDS",
    "Tables",
    "build_tables",
    "check_chunk",
    "step_config",
]

# ---- mirrors rawkernels/lars_math.h (tests/test_kernels_compile.py checks) ------------------
TILE = 256  # kQBlock: elements of one 8-bit absmax block; chunks never split one
SUMS = 6  # kSums
TENSOR_FIELDS = 12  # kTensorFields
FIELD_PARAM, FIELD_GRAD, FIELD_STATE, FIELD_ABSMAX = 0, 1, 2, 3
FIELD_STEP, FIELD_SKIP, FIELD_HISTORY, FIELD_SIZE = 4, 5, 6, 7
FIELD_FIRST_BLOCK, FIELD_NUM_BLOCKS, FIELD_VECTOR, FIELD_KIND = 8, 9, 10, 11
COEF_WORDS = 8  # kCoefWords: sizeof(TensorCoef) / 4
SWITCH_PERCENTILE, SWITCH_TRUST, SWITCH_TRUST_CLIP = 1, 2, 4
SWITCH_MOMENTUM, SWITCH_NESTEROV, SWITCH_UNORM = 8, 16, 32
NO_STATE, STATE_32, STATE_8 = 0, 1, 2

FORMAT_NAMES = ("f32", "f16", "bf16")  # kernel-name spelling of formats.FORMATS
STATE_NAMES = ("nostate", "state32", "state8")
#: Stats kernels by what they read: g only, then g and p ("nostate"), then g, p
#: and m of each state mode (lars_kernels.cu's LARS_FORMAT).
STATS_NAMES = ("gradonly", *STATE_NAMES)

#: Default elements per chunk: 64 per thread of a 256-thread CUDA block, 64 KiB of
#: float32 per array on the CPU. A multiple of TILE so that chunks never split an
#: 8-bit absmax block; every kernel backend chunks alike (tests shrink it).
CHUNK_SIZE = 16384


def check_chunk(chunk: int) -> int:
    chunk = int(chunk)
    if chunk <= 0 or chunk % TILE or chunk >= 2**31:
        raise ValueError(f"chunk size must be a positive multiple of {TILE} below 2**31, got {chunk}")
    return chunk


#: lars_math.h ``StepConfig``: a step's hyperparameters as every kernel takes them, field for
#: field in the C order (float64 first, then int32; ``align=True`` pads as the compiler does).
STEP_CONFIG = np.dtype(
    [
        ("lr", np.float64),
        ("momentum", np.float64),
        ("dampening", np.float64),
        ("weight_decay", np.float64),
        ("trust_coefficient", np.float64),
        ("eps", np.float64),
        ("max_unorm", np.float64),
        ("percentile", np.int32),
        ("switches", np.int32),
        ("policy", np.int32),
    ],
    align=True,
)


def step_config(cfg: LarsConfig) -> np.ndarray:
    """The :data:`STEP_CONFIG` of ``cfg``, as a size-1 array: the CUDA kernels take it by value
    (CuPy 13 and 14 pass a size-1 host array by value, and so does the emulator), the
    native step by address. A fresh array per step: a launch copies its bytes."""
    out = np.empty(1, STEP_CONFIG)
    out[0] = (
        cfg.lr,
        cfg.momentum,
        cfg.dampening,
        cfg.weight_decay,
        cfg.trust_coefficient,
        cfg.eps,
        cfg.max_unorm,
        cfg.percentile_clipping,
        switches(cfg),
        NONFINITE_POLICIES.index(cfg.nonfinite),
    )
    return out


def switches(cfg: LarsConfig) -> int:
    """The finalize pass's switch bits of a :class:`~cupylars.config.LarsConfig`."""
    bits = 0
    bits |= SWITCH_PERCENTILE if cfg.clips_percentile else 0
    bits |= SWITCH_TRUST if cfg.uses_trust_ratio else 0
    bits |= SWITCH_TRUST_CLIP if cfg.trust_clip else 0
    bits |= SWITCH_MOMENTUM if cfg.uses_momentum else 0
    bits |= SWITCH_NESTEROV if cfg.nesterov else 0
    bits |= SWITCH_UNORM if cfg.clips_update_norm else 0
    return bits


@dataclass(eq=False)
class Tables:
    """Host tables of one list of tensors (see the module docstring)."""

    table: np.ndarray  # int64: num_tensors * TENSOR_FIELDS rows, then num_blocks entries
    num_tensors: int
    num_blocks: int
    order: list[int]  # caller's index of each row
    vector_base: np.ndarray  # bool per row: p (and m) aligned for quad access
    grad_width: np.ndarray  # int64 per row: the alignment a quad of the gradient needs
    stats_runs: list[tuple[str, int, int]]  # (CUDA kernel, first block, blocks)
    update_runs: list[tuple[str, int, int]]
    block_owner: np.ndarray  # caller's tensor index of each block

    @property
    def rows(self) -> np.ndarray:
        """The tensor table as a (num_tensors, TENSOR_FIELDS) view."""
        return self.table[: self.num_tensors * TENSOR_FIELDS].reshape(self.num_tensors, TENSOR_FIELDS)

    @property
    def blocks(self) -> np.ndarray:
        return self.table[self.num_tensors * TENSOR_FIELDS :]

    def grad_addresses(self) -> list[int]:
        return self.rows[:, FIELD_GRAD].tolist()

    def set_grads(self, grad_addresses: Sequence[int]) -> None:
        """New gradient addresses, in row order: the gradient and vector columns."""
        g = np.array(grad_addresses, dtype=np.int64)
        rows = self.rows
        rows[:, FIELD_GRAD] = g
        rows[:, FIELD_VECTOR] = self.vector_base & (g % self.grad_width == 0)


def build_tables(
    formats: Sequence[str],
    itemsizes: Sequence[int],
    live: Sequence[int],
    param_addresses: Sequence[int],
    grad_addresses: Sequence[int],
    states: Sequence[LarsState],
    address: Callable[[Any], int],
    chunk: int,
    uses_m: bool,
    stats_m: bool,
    need_p: bool = True,
) -> Tables:
    """Tables for the ``live`` tensors; both address lists follow ``live``.

    ``formats`` and ``itemsizes`` are per tensor of the caller's list; ``address``
    gives an array's address (the backend's runtime knows how). The stats pass
    reads m when ``stats_m`` (momentum and max_unorm), else p when ``need_p``
    (trust ratio or max_unorm), else only g; its kernels are named after it.
    """
    specs = []
    for k, i in enumerate(live):
        st = states[i]
        mode = (STATE_8 if st.is_8bit else STATE_32) if uses_m else NO_STATE
        state = st.codes if st.is_8bit else st.momentum
        specs.append(
            (
                FORMATS.index(formats[i]),
                mode,
                i,
                param_addresses[k],
                grad_addresses[k],
                address(state) if (uses_m and state is not None) else 0,
                address(st.absmax) if (uses_m and st.is_8bit and st.absmax is not None) else 0,
                address(st.step_count),
                address(st.skip_count),
                address(st.history),
                st.size,
                itemsizes[i],
            )
        )
    specs.sort(key=lambda r: (r[0], r[1], r[2]))
    num_tensors = len(specs)
    cols = np.array([r[3:] for r in specs], dtype=np.int64).reshape(num_tensors, 9)
    p, g, m, absmax, step, skip, hist, sizes, itemsize = cols.T
    fmts = np.array([r[0] for r in specs], dtype=np.int64)
    modes = np.array([r[1] for r in specs], dtype=np.int64)
    nblocks = -(-sizes // chunk)
    first = np.concatenate([[0], np.cumsum(nblocks)[:-1]]).astype(np.int64)
    num_blocks = int(nblocks.sum())

    table = np.zeros(num_tensors * TENSOR_FIELDS + num_blocks, dtype=np.int64)
    tens = table[: num_tensors * TENSOR_FIELDS].reshape(num_tensors, TENSOR_FIELDS)
    blocks = table[num_tensors * TENSOR_FIELDS :]
    tens[:, FIELD_PARAM] = p
    tens[:, FIELD_GRAD] = g
    tens[:, FIELD_STATE] = m
    tens[:, FIELD_ABSMAX] = absmax
    tens[:, FIELD_STEP] = step
    tens[:, FIELD_SKIP] = skip
    tens[:, FIELD_HISTORY] = hist
    tens[:, FIELD_SIZE] = sizes
    tens[:, FIELD_FIRST_BLOCK] = first
    tens[:, FIELD_NUM_BLOCKS] = nblocks
    tens[:, FIELD_KIND] = fmts * 3 + modes
    # Quad (vector) access needs p and g aligned to a quad of their format, and m to a
    # quad of float32 (32-bit state) or of codes (8-bit state).
    grad_width = 4 * itemsize
    m_width = np.where(modes == STATE_32, 16, 4)
    vector_base = (p % grad_width == 0) & ((m == 0) | (m % m_width == 0))
    tens[:, FIELD_VECTOR] = vector_base & (g % grad_width == 0)
    owner = np.repeat(np.array([r[2] for r in specs], dtype=np.int64), nblocks)
    # block j of tensor k: (k << 32) | j
    within = np.arange(num_blocks, dtype=np.int64) - np.repeat(first, nblocks)
    blocks[:] = (np.repeat(np.arange(num_tensors, dtype=np.int64), nblocks) << 32) | within

    update_runs: list[list] = []
    stats_runs: list[list] = []
    for k, r in enumerate(specs):
        fmt, mode = r[0], r[1]
        stats_reads = STATE_NAMES[mode] if stats_m else ("nostate" if need_p else "gradonly")
        lo, count = int(first[k]), int(nblocks[k])
        for runs, kernel in (
            (update_runs, f"lars_update_{FORMAT_NAMES[fmt]}_{STATE_NAMES[mode]}"),
            (stats_runs, f"lars_stats_{FORMAT_NAMES[fmt]}_{stats_reads}"),
        ):
            if runs and runs[-1][0] == kernel:
                runs[-1][2] += count
            else:
                runs.append([kernel, lo, count])

    return Tables(
        table=table,
        num_tensors=num_tensors,
        num_blocks=num_blocks,
        order=[r[2] for r in specs],
        vector_base=vector_base,
        grad_width=grad_width,
        stats_runs=[tuple(r) for r in stats_runs],
        update_runs=[tuple(r) for r in update_runs],
        block_owner=owner,
    )
