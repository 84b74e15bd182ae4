#!/usr/bin/env python3
"""Time one LARS step on a GPU (scripts/gpu_check runs this).

(a) One 256M-element float32 tensor: achieved bandwidth of a cupylars step with
    32-bit and with 8-bit momentum, against a measured device-to-device copy.
    Two byte counts are reported: the fewest bytes any LARS step must move
    (read p, g, m once, write p, m once) and the bytes of this two-pass design
    (the statistics pass reads p, g, m once more; docs/kernels.md).
(b) ResNet-50's 161 parameter tensors (25.6M parameters, shapes generated from
    the architecture below): step time of cupylars (32-bit and 8-bit state)
    against torch.optim.SGD(momentum=0.9, fused=True) and three PyTorch
    implementations of the same LARS step, with float32 and bfloat16
    parameters: eager per tensor (about 15 kernels a tensor: host-bound, so it
    flatters a ratio against it), foreach (multi-tensor kernels over the whole
    list, timm-style; the per-tensor trust ratios stay on the device) and, with
    --compile, the per-tensor step through torch.compile (fused by inductor;
    compiled during warm-up, untimed, which takes minutes). Fused SGD moves
    fewer bytes per element than a LARS step (10 with bfloat16 parameters and
    momentum, 20 with float32): the "SGD fused,
    N-bit bytes" rows run it over tensors enlarged by the ratio of the bytes a
    cupylars step with N-bit state moves per parameter (docs/kernels.md) to
    SGD's, so that they move the same bytes as the cupylars row.
    cupylars is timed twice: the functional API over CuPy arrays
    (F.lars_update_many) and the torch adapter (cupylars.optim.LARS32bit and
    LARS8bit .step()) over 161 CUDA torch.nn.Parameters with .grad set. The
    functional, adapter and fused SGD rows also run with "fresh grads": new
    gradient tensors before every step, as a training loop with
    zero_grad(set_to_none=True) gets them from the backward pass.

Timing: CUDA events around each step after warm-up, median of many runs. Before
each timed step a spin kernel keeps the GPU busy while the host queues the step
(so the events time the device, not Python), and a buffer larger than L2 is
overwritten (so no step starts with a warm cache). "wall ms" is the host's view:
back-to-back steps, then one synchronisation, divided by the count. "host us"
(per tensor) is the host's time inside one step call: time.perf_counter around
the call in the event-timed runs (no synchronisation; the spin keeps the GPU
busy meanwhile), median over the runs, divided by the number of tensors.
Fresh gradients are allocated (copies of the row's gradients, made while the
previous ones still exist, so every step sees new addresses) before the spin
kernel, outside both the events and the host timing; the wall-time loop of a
fresh-grads row cycles through three gradient sets allocated beforehand, so its
wall ms includes handing each set over (setting .grad) but no allocation.

Output: every row as soon as it is measured, to stdout (flushed) and to the
folder --out (default $OUT, else benchmarks/results): one JSON line appended to
gpu_step_rows.jsonl, and gpu_step.md (a markdown table of the rows so far),
gpu_step.txt (the report) and gpu_step.json (all numbers) rewritten, so a run
cut short keeps every row it measured. --budget-s: a row starts only while at
least the longest row of its part so far fits in what is left; the others are
recorded as skipped, with a line saying so.

Targets on H100 (reported, not asserted): (a) >= 85% of copy bandwidth with
32-bit state, >= 80% with 8-bit; (b) a LARS step <= 1.5x fused SGD and >= 5x
faster than eager LARS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any, TextIO

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# The LARS configuration of every LARS row (percentile clipping off, as is usual).
LR, MOMENTUM, WEIGHT_DECAY, TRUST, MAX_UNORM, EPS = 0.1, 0.9, 1e-4, 1e-3, 0.02, 1e-8
HP = {
    "lr": LR,
    "momentum": MOMENTUM,
    "weight_decay": WEIGHT_DECAY,
    "trust_coefficient": TRUST,
    "max_unorm": MAX_UNORM,
    "eps": EPS,
}
# The torch device of every torch row.
DEVICE = "cuda"
# Row-name suffix of the variant with new gradient tensors before every step.
FRESH = ", fresh grads"
# What the run writes under its folder (see the module docstring).
ROWS_JSONL, ROWS_MD = "gpu_step_rows.jsonl", "gpu_step.md"
REPORT_TXT, RESULTS_JSON = "gpu_step.txt", "gpu_step.json"


#: The rows of the ResNet-50 table (b), in print order, per storage format.
RESNET_ROWS = (
    "torch SGD fused",
    "torch SGD fused, 32-bit bytes",
    "torch SGD fused, 8-bit bytes",
    "torch eager LARS",
    "torch foreach LARS",
    "torch.compile LARS",
    "cupylars 32-bit",
    "cupylars 8-bit",
    "optim.LARS32bit",
    "optim.LARS8bit",
)


# ---- recording: each row as soon as it is measured ----------------------------------------------
class Budget:
    """What is left of ``seconds`` (None: no limit) from its creation, on ``clock``."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.end = math.inf if seconds is None else clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()


class Recorder:
    """Measures rows within a :class:`Budget` and writes each as soon as it is known.

    Each row goes to ``out`` (stdout, flushed) and, when ``folder`` is given, is
    appended to its ROWS_JSONL as one JSON line, after which ROWS_MD, REPORT_TXT
    and RESULTS_JSON are rewritten from everything so far. A row starts only if
    what is left of the budget covers the longest row of its section so far (a
    first row always fits while time is left); otherwise it is recorded as skipped.
    """

    def __init__(self, results: dict, folder: Path | None, budget: Budget, out: TextIO | None = None) -> None:
        self.results = results
        self.folder = folder
        self.budget = budget
        self.out = out
        self.records: list[dict] = []
        self.longest: dict[str, float] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ROWS_JSONL).write_text("")  # this run's rows only

    def row(self, table: dict, section: str, key: str, measure: Callable[[], dict]) -> dict:
        """``measure()`` (its fields, or its error) as ``table[key]``, unless out of time."""
        estimate, left = self.longest.get(section, 0.0), self.budget.left()
        if left <= 0 or left < estimate:
            why = f"time limit: {max(left, 0):.0f} s left, a {section} row took {estimate:.0f} s"
            row: dict = {"skipped": why}
        else:
            start = self.budget.clock()
            try:
                row = measure()
            except Exception as e:
                row = {"error": _err(e)}
            row["seconds"] = self.budget.clock() - start
            self.longest[section] = max(estimate, row["seconds"])
        table[key] = row
        self.record(section, key, row)
        return row

    def record(self, section: str, key: str, row: dict) -> None:
        record = {"section": section, "row": key, **row}
        self.records.append(record)
        print(row_line(record), file=self.out or sys.stdout, flush=True)
        if self.folder is None:
            return
        with open(self.folder / ROWS_JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self.write_tables()

    def write_tables(self) -> None:
        if self.folder is None:
            return
        (self.folder / ROWS_MD).write_text(markdown_table(self.records))
        (self.folder / REPORT_TXT).write_text(report(self.results) + "\n")
        (self.folder / RESULTS_JSON).write_text(json.dumps(self.results, indent=2, default=str))


def _fields(record: dict) -> list[tuple[str, str]]:
    """(column, text) of the numbers a record holds, in table order."""
    out = []
    for field, label, fmt in (
        ("ms", "gpu ms", "{:.3f}"),
        ("wall_ms", "wall ms", "{:.3f}"),
        ("host_us_per_tensor", "host us/tensor", "{:.2f}"),
        ("gbps", "GB/s", "{:.0f}"),
        ("gbps_minimal", "GB/s min", "{:.0f}"),
        ("gbps_two_pass", "GB/s 2-pass", "{:.0f}"),
        ("max_diff_relative_to_update", "max diff / update", "{:.1e}"),
    ):
        if isinstance(record.get(field), (int, float)):
            out.append((label, fmt.format(record[field])))
    return out


def _note(record: dict) -> str:
    if "error" in record:
        return f"error: {record['error']}"
    if "skipped" in record:
        return f"skipped ({record['skipped']})"
    if "agrees" in record:
        return "agrees" if record["agrees"] else "DISAGREES"
    return str(record.get("backend", ""))


def row_line(record: dict) -> str:
    """One line for stdout: the section, the row, its numbers or what went wrong."""
    parts = [f"{label} {text}" for label, text in _fields(record)]
    if "seconds" in record:
        parts.append(f"{record['seconds']:.1f} s")
    note = _note(record)
    return f"row {record['section']} | {record['row']}: " + ", ".join(parts + ([note] if note else []))


def markdown_table(records: list[dict]) -> str:
    """The records so far as one markdown table."""
    columns = ["gpu ms", "wall ms", "host us/tensor", "GB/s", "GB/s min", "GB/s 2-pass", "max diff / update"]
    lines = [
        "| section | row | " + " | ".join(columns) + " | s | note |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " | ---: | --- |",
    ]
    for record in records:
        values = dict(_fields(record))
        cells = [record["section"], record["row"], *(values.get(c, "") for c in columns)]
        cells.append(f"{record['seconds']:.1f}" if "seconds" in record else "")
        cells.append(_note(record).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50(), in its parameters() order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + batch norm
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):  # bottleneck: 1x1, 3x3, 1x1 (x4) convolutions, each with a batch norm
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:  # projection shortcut
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]  # classifier
    return shapes


# ---- timing ------------------------------------------------------------------------------------
class Timer:
    def __init__(self, cp: Any, flush_mib: int, spin_ms: float) -> None:
        self.cp = cp
        self.spin_ms = spin_ms
        # zeros, not empty: the scrub reads it, and reading never-written pages may not touch L2
        self.flush = cp.zeros(flush_mib * 2**18, dtype=cp.float32) if flush_mib > 0 else None
        self.flush_sink = cp.zeros((), dtype=cp.float32)
        self.spin = cp.RawKernel(
            r"""extern "C" __global__ void spin(long long cycles) {
                  const long long start = clock64();
                  while (clock64() - start < cycles) { }
                }""",
            "spin",
        )
        self.spin_cycles = np.int64(int(_clock_khz(cp) * spin_ms))  # kHz x ms = cycles

    def device_ms(
        self,
        step: Callable[[], None],
        runs: int,
        warmup: int,
        before: Callable[[], None] | None = None,
        host_ms: list[float] | None = None,
    ) -> float:
        """Median device milliseconds of ``step``. ``before`` runs ahead of every
        step, untimed; ``host_ms`` receives the host milliseconds of each timed call."""
        cp = self.cp
        for _ in range(warmup):
            if before is not None:
                before()
            step()
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(runs):
            if before is not None:
                before()
            self.spin((1,), (1,), (self.spin_cycles,))
            if self.flush is not None:
                # Scrub L2 by reading: a fill would leave ~50 MB of dirty lines that are
                # written back to HBM during the timed step, charging it for their bytes.
                cp.sum(self.flush, out=self.flush_sink)
            start.record()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
            if host_ms is not None:
                host_ms.append((t1 - t0) * 1e3)
        return statistics.median(times)

    def wall_ms(self, step: Callable[[], None], runs: int, before: Callable[[], None] | None = None) -> float:
        """Back-to-back steps (each after ``before``, timed too), one synchronisation."""
        self.cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(runs):
            if before is not None:
                before()
            step()
        self.cp.cuda.Device().synchronize()
        return (time.perf_counter() - t0) * 1e3 / runs


def _clock_khz(cp: Any) -> float:
    """SM clock in kHz (CUDA 13 dropped cudaDeviceProp.clockRate: ask the attribute)."""
    device = cp.cuda.Device()
    try:
        khz = cp.cuda.runtime.getDeviceProperties(device.id).get("clockRate", 0)
        if khz:
            return float(khz)
    except Exception:
        pass
    try:
        khz = device.attributes.get("ClockRate", 0)
        if khz:
            return float(khz)
    except Exception:
        pass
    return 2.0e6  # a guess: the spin only needs to outlast the host's queueing


def _free(cp: Any) -> None:
    cp.get_default_memory_pool().free_all_blocks()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def _random(cp: Any, n: int, scale: float, seed: int) -> Any:
    return cp.random.default_rng(seed).standard_normal(n, dtype=cp.float32) * cp.float32(scale)


def _as_bf16_bits(cp: Any, x32: Any) -> Any:
    return (x32.view(cp.uint32) >> 16).astype(cp.uint16)


# ---- (a) one large tensor ------------------------------------------------------------------------
def bench_large(cp: Any, timer: Timer, n: int, runs: int, recorder: Recorder) -> None:
    rows = recorder.results.setdefault("large", {})
    for key, measure in (
        ("copy", lambda: _large_copy(cp, timer, n, runs)),
        ("lars_32bit", lambda: _large_lars(cp, timer, n, runs, 32)),
        ("lars_8bit", lambda: _large_lars(cp, timer, n, runs, 8)),
    ):
        recorder.row(rows, "large", key, measure)
        _free(cp)  # the row's arrays died with its measurement (or its error, once recorded)


def _large_copy(cp: Any, timer: Timer, n: int, runs: int) -> dict:
    nbytes = n * 4
    src, dst = _random(cp, n, 1.0, 0), cp.empty(n, dtype=cp.float32)

    def copy() -> None:
        stream = cp.cuda.get_current_stream().ptr
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, 3, stream)  # 3: device to device

    ms = timer.device_ms(copy, runs, 3)
    return {"ms": ms, "gbps": 2 * nbytes / ms / 1e6}


def _large_lars(cp: Any, timer: Timer, n: int, runs: int, bits: int) -> dict:
    from cupylars import functional as F

    p = _random(cp, n, 0.02, 1)
    g = _random(cp, n, 1e-3, 2)
    state = F.init_state(p, optim_bits=bits)

    def step() -> None:
        F.lars_update(p, g, state, **HP)

    ms = timer.device_ms(step, runs, 3)
    if bits == 32:
        minimal = n * (4 + 4 + 4) + n * (4 + 4)  # read p g m, write p m
        two_pass = minimal + n * 12  # the statistics pass reads p g m
    else:
        scales = 4 * math.ceil(n / 256)
        minimal = n * (4 + 4 + 1) + scales + n * (4 + 1) + scales
        two_pass = minimal + n * 9 + scales
    return {
        "ms": ms,
        "wall_ms": timer.wall_ms(step, max(3, runs // 4)),
        "gbps_minimal": minimal / ms / 1e6,
        "gbps_two_pass": two_pass / ms / 1e6,
        "finite": bool(cp.isfinite(p[:: max(1, n // 4096)]).all()),
    }


# ---- (b) ResNet-50 -------------------------------------------------------------------------------
# Bytes per parameter a step moves through device memory (momentum and max_unorm
# on, t > 1; docs/kernels.md, "What each kernel reads and writes"): cupylars by
# (parameter format, state bits), both passes; fused SGD with momentum reads p, g,
# m and writes p, m in the parameters' format.
CUPYLARS_BYTES = {("float32", 32): 32, ("float32", 8): 23, ("bfloat16", 32): 22, ("bfloat16", 8): 13}
SGD_BYTES = {"float32": 20, "bfloat16": 10}


def _lars_tensor(torch: Any, p: Any, g: Any, m: Any, first: bool) -> None:
    """One tensor's LARS step (percentile clipping off) in plain PyTorch ops,
    float32 arithmetic and state; no host synchronisation."""
    p32, g32 = p.float(), g.float()
    g_norm = torch.linalg.vector_norm(g32)
    p_norm = torch.linalg.vector_norm(p32)
    d = torch.add(g32, p32, alpha=WEIGHT_DECAY)
    both = (p_norm > 0) & (g_norm > 0)
    r = torch.where(both, TRUST * p_norm / (g_norm + WEIGHT_DECAY * p_norm + EPS), 1.0)
    d.mul_(r)
    if first:
        m.copy_(d)
    else:
        m.mul_(MOMENTUM).add_(d)
    u_norm = torch.linalg.vector_norm(m)
    clip = (p_norm > 0) & (u_norm > MAX_UNORM * p_norm)
    s = torch.where(clip, MAX_UNORM * p_norm / u_norm, 1.0)
    new = p32 - (LR * s) * m
    p.copy_(new)


def _eager_lars(torch: Any, params: list, grads: list, bufs: list, first: list[bool]) -> None:
    """The LARS step per tensor, eagerly: about 15 kernels a tensor."""
    for i, (p, g, m) in enumerate(zip(params, grads, bufs)):
        _lars_tensor(torch, p, g, m, first[i])
        first[i] = False


def _compiled_lars(torch: Any, backend: str = "inductor") -> Callable[[list, list, list, bool], None]:
    """The per-tensor step over a whole list as one torch.compile'd function (one
    graph per value of ``first``; compiled at its first two calls)."""

    def step(params: list, grads: list, bufs: list, first: bool) -> None:
        for p, g, m in zip(params, grads, bufs):
            _lars_tensor(torch, p, g, m, first)

    return torch.compile(step, backend=backend)


def _foreach_lars(torch: Any, params: list, grads: list, bufs: list, first: list[bool]) -> None:
    """The same step with multi-tensor (``torch._foreach_*``) kernels over the list,
    as timm-style optimizers batch theirs: norms, trust ratios and clip factors are
    per-tensor device scalars (no host synchronisation), the elementwise work runs
    list-wide. ``first`` holds one flag for the whole list. (Multiplying by a list of
    per-tensor 0-d tensors takes torch's per-tensor path where its multi-tensor
    kernels want equal shapes: two of the ~12 list operations.)"""
    p32 = [p.float() for p in params]
    g32 = [g.float() for g in grads]
    g_norm = torch.stack(torch._foreach_norm(g32))
    p_norm = torch.stack(torch._foreach_norm(p32))
    both = (p_norm > 0) & (g_norm > 0)
    ones = torch.ones_like(p_norm)
    r = torch.where(both, TRUST * p_norm / (g_norm + WEIGHT_DECAY * p_norm + EPS), ones)
    d = torch._foreach_add(g32, p32, alpha=WEIGHT_DECAY)
    torch._foreach_mul_(d, list(r.unbind()))
    if first[0]:
        torch._foreach_copy_(bufs, d)
        first[0] = False
    else:
        torch._foreach_mul_(bufs, MOMENTUM)
        torch._foreach_add_(bufs, d)
    u_norm = torch.stack(torch._foreach_norm(bufs))
    clip = (p_norm > 0) & (u_norm > MAX_UNORM * p_norm)
    s = torch.where(clip, MAX_UNORM * p_norm / u_norm, ones)
    step = torch._foreach_mul(bufs, list((-LR * s).unbind()))
    torch._foreach_add_(p32, step)
    if p32[0].data_ptr() != params[0].data_ptr():  # a 16-bit format: p32 are float32 copies
        torch._foreach_copy_(params, p32)


@dataclass
class Row:
    """What one row of (b) times.

    ``step`` runs one optimizer step. ``new_grads`` allocates a full set of new
    gradients (as a backward pass after ``zero_grad(set_to_none=True)``) and
    ``use_grads`` makes the following steps use them. ``details`` adds fields to
    the row after timing.
    """

    step: Callable[[], None]
    new_grads: Callable[[], Any]
    use_grads: Callable[[Any], None]
    details: Callable[[], dict] = dict


def _time_row(timer: Timer, row: Row, runs: int, tensors: int, fresh: bool = False) -> dict:
    """Time a row; its fields. Its data dies with this call (the caller then frees the pool).

    ``fresh``: new gradients before every step (allocated outside the timed
    region); the wall-time loop cycles through three sets allocated beforehand.
    """
    before = (lambda: row.use_grads(row.new_grads())) if fresh else None
    host: list[float] = []
    ms = timer.device_ms(row.step, runs, 5, before=before, host_ms=host)
    if fresh:
        pool = cycle([row.new_grads() for _ in range(3)])
        before = lambda: row.use_grads(next(pool))  # noqa: E731
    wall = timer.wall_ms(row.step, runs, before=before)
    host_ms = statistics.median(host)
    return {
        "ms": ms,
        "wall_ms": wall,
        "host_ms": host_ms,
        "host_us_per_tensor": host_ms * 1e3 / tensors,
        # the spin ran out before the host had queued the step: the GPU idled inside the events
        "host_over_spin": host_ms > timer.spin_ms,
        "runs": runs,
        **row.details(),
    }


@dataclass(frozen=True)
class PlannedRow:
    """One row of (b): ``kind`` is "cupylars", "sgd", "eager", "foreach", "compiled",
    "LARS32bit" or "LARS8bit"; ``bits`` the state bits of a cupylars row, or for an
    "sgd" row the cupylars row whose bytes it moves (None: plain fused SGD)."""

    key: str
    kind: str
    fmt: str
    bits: int | None = None
    fresh: bool = False
    runs: int | None = None


def resnet_plan(with_torch: bool, compiled: bool, runs: int) -> list[PlannedRow]:
    """The rows of (b) in the order they run; torch.compile rows only with ``compiled``."""
    plan: list[PlannedRow] = []
    variants = (("", False), (FRESH, True))
    for fmt in ("float32", "bfloat16"):
        for bits in (32, 8):
            key = f"{fmt} cupylars {bits}-bit"
            plan += [PlannedRow(key + v, "cupylars", fmt, bits, f) for v, f in variants]
        if not with_torch:
            continue
        plan += [PlannedRow(f"{fmt} torch SGD fused{v}", "sgd", fmt, None, f) for v, f in variants]
        plan += [PlannedRow(f"{fmt} torch SGD fused, {b}-bit bytes", "sgd", fmt, b) for b in (32, 8)]
        # eager LARS launches ~15 kernels per tensor: fewer runs keep the benchmark short
        plan.append(PlannedRow(f"{fmt} torch eager LARS", "eager", fmt, runs=max(5, runs // 3)))
        plan.append(PlannedRow(f"{fmt} torch foreach LARS", "foreach", fmt))
        if compiled:
            plan.append(PlannedRow(f"{fmt} torch.compile LARS", "compiled", fmt))
        for name in ("LARS32bit", "LARS8bit"):
            plan += [PlannedRow(f"{fmt} optim.{name}{v}", name, fmt, fresh=f) for v, f in variants]
    return plan


def bench_resnet(cp: Any, timer: Timer, runs: int, recorder: Recorder, compiled: bool = False) -> None:
    from cupylars import functional as F

    results = recorder.results
    shapes = resnet50_shapes()
    sizes = [int(np.prod(s)) for s in shapes]
    tensors = len(shapes)
    results["resnet50"] = {"tensors": tensors, "params": sum(sizes)}
    rows = results["resnet50"].setdefault("rows", {})
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
    except Exception as e:
        torch = None
        results["resnet50"]["torch_error"] = _err(e)

    def cupylars_row(fmt: str, bits: int) -> Row:
        def random_list(scale: float, seed: int) -> list:
            return [_random(cp, n, scale, seed + i).reshape(s) for i, (n, s) in enumerate(zip(sizes, shapes))]

        params, grads, dtype = random_list(0.05, 10), random_list(1e-3, 900), None
        if fmt == "bfloat16":
            params = [_as_bf16_bits(cp, x) for x in params]
            grads = [_as_bf16_bits(cp, x) for x in grads]
            dtype = "bfloat16"
        states = [F.init_state(p, optim_bits=bits, dtype=dtype) for p in params]
        current = {"grads": grads}
        return Row(
            step=lambda: F.lars_update_many(params, current["grads"], states, dtype=dtype, **HP),
            new_grads=lambda: [g.copy() for g in grads],
            use_grads=lambda new: current.__setitem__("grads", new),
        )

    def torch_list(tdtype: Any, scale: float, gen: Any, of: list | None = None) -> list:
        return [(torch.randn(s, device=DEVICE, generator=gen) * scale).to(tdtype) for s in of or shapes]

    def parameter_row(
        tdtype: Any, make_optimizer: Callable[[list], Any], scale_elements: float = 1.0
    ) -> Row:
        """``make_optimizer`` over torch.nn.Parameters with .grad set. ``scale_elements``
        enlarges every tensor (flattened) by that factor."""
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        if scale_elements == 1.0:
            params = [torch.nn.Parameter(t) for t in torch_list(tdtype, 0.05, gen)]
            grads = torch_list(tdtype, 1e-3, gen)
        else:
            grown = [(math.ceil(n * scale_elements),) for n in sizes]
            params = [torch.nn.Parameter(t) for t in torch_list(tdtype, 0.05, gen, grown)]
            grads = torch_list(tdtype, 1e-3, gen, grown)

        def use_grads(new: list) -> None:
            for p, g in zip(params, new):
                p.grad = g

        use_grads(grads)
        opt = make_optimizer(params)

        def details() -> dict:
            backends = getattr(opt, "backends", None)  # cupylars.optim: what ran the last step
            return {} if backends is None else {"backend": "; ".join(backends.values()) or "none"}

        return Row(opt.step, lambda: [g.clone() for g in grads], use_grads, details)

    def sgd_row(tdtype: Any, scale_elements: float = 1.0) -> Row:
        return parameter_row(
            tdtype,
            lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True),
            scale_elements,
        )

    def adapter_row(name: str, tdtype: Any) -> Row:
        import cupylars.optim

        return parameter_row(tdtype, lambda ps: getattr(cupylars.optim, name)(ps, **HP))

    def eager_row(tdtype: Any, kind: str = "eager") -> Row:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        params, grads = torch_list(tdtype, 0.05, gen), torch_list(tdtype, 1e-3, gen)
        bufs = [torch.zeros(s, device=DEVICE, dtype=torch.float32) for s in shapes]
        first = [True] * len(params)
        compiled = _compiled_lars(torch) if kind == "compiled" else None

        def step() -> None:
            _torch_lars_step(torch, kind, compiled, params, grads, bufs, first)

        return Row(step, lambda: None, lambda new: None)

    def make(planned: PlannedRow) -> Row:
        fmt, bits, kind = planned.fmt, planned.bits, planned.kind
        if kind == "cupylars":
            assert bits is not None
            return cupylars_row(fmt, bits)
        tdtype = torch.float32 if fmt == "float32" else torch.bfloat16
        if kind == "sgd":
            return sgd_row(tdtype, 1.0 if bits is None else CUPYLARS_BYTES[(fmt, bits)] / SGD_BYTES[fmt])
        if kind in ("eager", "foreach", "compiled"):
            return eager_row(tdtype, kind)
        return adapter_row(kind, tdtype)

    for planned in resnet_plan(torch is not None, compiled, runs):
        measure = lambda p=planned: _time_row(timer, make(p), p.runs or runs, tensors, p.fresh)  # noqa: E731
        recorder.row(rows, "resnet50", planned.key, measure)
        _free(cp)  # the row's tensors died with its measurement (or its error, once recorded)


def run_torch_lars(
    torch: Any, kind: str, params: list, grads: list, steps: int, backend: str = "inductor"
) -> list:
    """``steps`` steps of one torch LARS implementation (eager, foreach, compiled with
    ``backend``) over copies of ``params`` (torch tensors), each step with ``grads``;
    the results."""
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    first = [True] * len(params)
    compiled = _compiled_lars(torch, backend) if kind == "compiled" else None
    for _ in range(steps):
        _torch_lars_step(torch, kind, compiled, params, grads, bufs, first)
    return params


def _torch_lars_step(
    torch: Any, kind: str, compiled: Any, params: list, grads: list, bufs: list, first: list[bool]
) -> None:
    """One step of the torch LARS ``kind`` ("eager", "foreach" or "compiled")."""
    with torch.no_grad():
        if kind == "eager":
            _eager_lars(torch, params, grads, bufs, first)
        elif kind == "foreach":
            _foreach_lars(torch, params, grads, bufs, first)
        else:
            assert compiled is not None
            compiled(params, grads, bufs, first[0])
            first[0] = False


def check_eager_matches(cp: Any, recorder: Recorder, compiled: bool = False) -> None:
    """The torch LARS rows time the same algorithm: three steps of each on the same data."""
    shapes = [(64, 3, 7, 7), (64,), (256, 64, 1, 1), (1000, 2048)]
    rng = np.random.default_rng(0)
    p_host = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in shapes]
    g_host = [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in shapes]
    expected: list[np.ndarray] = []  # cupylars' three steps, made by the first check

    def compare(kind: str) -> dict:
        import torch

        from cupylars import functional as F

        if not expected:
            params = [cp.asarray(p) for p in p_host]
            states = [F.init_state(p) for p in params]
            for _ in range(3):
                F.lars_update_many(params, [cp.asarray(g) for g in g_host], states, **HP)
            expected.extend(cp.asnumpy(a) for a in params)
        tparams = [torch.tensor(p, device=DEVICE) for p in p_host]
        tgrads = [torch.tensor(g, device=DEVICE) for g in g_host]
        worst = 0.0
        for want, got, p0 in zip(expected, run_torch_lars(torch, kind, tparams, tgrads, 3), p_host):
            moved = np.abs(want - p0).max()
            worst = max(worst, float(np.abs(want - got.cpu().numpy()).max() / max(moved, 1e-30)))
        return {"max_diff_relative_to_update": worst, "agrees": worst < 1e-3}

    for kind in ("eager", "foreach", "compiled") if compiled else ("eager", "foreach"):
        recorder.row(recorder.results, "check", f"{kind}_check", lambda k=kind: compare(k))


# ---- report ---------------------------------------------------------------------------------------
def _err(e: BaseException) -> str:
    detail = traceback.format_exception_only(type(e), e)[-1].strip()
    print(f"  ! {detail}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    return detail


def _not_measured(row: dict) -> str | None:
    """What a row without numbers says instead: its error, or why it was skipped."""
    if "error" in row:
        return f"error: {row['error']}"
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    return None


def _cell(row: dict | None, field: str, fmt: str = "{:.3f}") -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "error"
    return fmt.format(row[field]) if field in row else "-"


def report(results: dict) -> str:
    lines = [f"== cupylars GPU step benchmark: {results.get('device', '?')} =="]
    large = results.get("large")
    if large is not None:
        copy = large.get("copy", {})
        copy_bw = copy.get("gbps")
        lines.append(f"(a) one {results.get('large_elements', 0):,}-element float32 tensor")
        head = f"{'ms':>8s} {'GB/s min':>9s} {'% copy':>7s} {'GB/s 2-pass':>11s} {'% copy':>7s}"
        lines.append(f"    {'':24s} {head}")
        name = "device-to-device copy"
        if _not_measured(copy):
            lines.append(f"    {name:24s} {_not_measured(copy)}")
        elif copy:
            lines.append(f"    {name:24s} {copy['ms']:8.3f} {copy['gbps']:9.0f} {100:6.0f}%")
        for bits, target in ((32, 85), (8, 80)):
            row = large.get(f"lars_{bits}bit", {})
            name = f"cupylars {bits}-bit state"
            if not row or _not_measured(row):
                lines.append(f"    {name:24s} {_not_measured(row) or 'not run'}")
                continue
            pct = (lambda bw: f"{100 * bw / copy_bw:6.0f}%") if copy_bw else (lambda bw: "      -")
            lines.append(
                f"    {name:24s} {row['ms']:8.3f} {row['gbps_minimal']:9.0f} {pct(row['gbps_minimal'])} "
                f"{row['gbps_two_pass']:11.0f} {pct(row['gbps_two_pass'])}   (target >= {target}% of copy)"
            )
    resnet = results.get("resnet50")
    if resnet is not None:
        rows = resnet.get("rows", {})
        lines.append(f"(b) ResNet-50: {resnet['tensors']} tensors, {resnet['params']:,} parameters")
        if "torch_error" in resnet:
            lines.append(f"    torch rows skipped: {resnet['torch_error']}")
        width = 38
        lines.append(
            f"    {'':{width}s} {'gpu ms':>8s}  {'wall ms':>8s} {'host us/tensor':>14s} "
            f"{'/ SGD fused':>11s} {'/ SGD same B':>12s} {'eager /':>8s} {'best torch /':>12s}"
        )
        names = RESNET_ROWS
        for fmt in ("float32", "bfloat16"):
            eager = rows.get(f"{fmt} torch eager LARS", {}).get("ms")
            torch_lars = [
                rows.get(f"{fmt} {k}", {}).get("ms")
                for k in ("torch eager LARS", "torch foreach LARS", "torch.compile LARS")
            ]
            best = min((ms for ms in torch_lars if ms), default=None)
            for name in names:
                for variant in ("", FRESH):
                    row = rows.get(f"{fmt} {name}{variant}")
                    label = f"{fmt} {name}{variant}"
                    if row is None:
                        continue
                    if _not_measured(row):
                        lines.append(f"    {label:{width}s} {_not_measured(row)}")
                        continue
                    sgd = rows.get(f"{fmt} torch SGD fused{variant}", {}).get("ms")  # same gradients
                    vs_sgd = f"{row['ms'] / sgd:10.2f}x" if sgd else "          -"
                    ours = name.startswith(("cupylars", "optim."))
                    bits = 8 if name.endswith(("8-bit", "8bit")) else 32
                    same = rows.get(f"{fmt} torch SGD fused, {bits}-bit bytes", {}).get("ms")
                    vs_same = f"{row['ms'] / same:11.2f}x" if ours and same else "           -"
                    speedup = f"{eager / row['ms']:7.1f}x" if ours and eager else "       -"
                    vs_best = f"{best / row['ms']:11.1f}x" if ours and best else "           -"
                    host = _cell(row, "host_us_per_tensor", "{:.2f}")
                    mark = "*" if row.get("host_over_spin") else " "
                    times = f"{row['ms']:8.3f}{mark} {row['wall_ms']:8.3f} {host:>14s}"
                    lines.append(f"    {label:{width}s} {times} {vs_sgd} {vs_same} {speedup} {vs_best}")
                    backend = row.get("backend")
                    if backend is not None and not backend.startswith("cuda"):
                        lines.append(f"      ! not the CUDA kernels: {backend}")
        n = resnet["tensors"]
        lines += [
            "    cupylars N-bit: F.lars_update_many on CuPy arrays; optim.LARS*: the torch adapter's",
            f"    step() on {n} CUDA torch.nn.Parameters. fresh grads: new gradient tensors before",
            "    every step (allocated untimed), as after zero_grad(set_to_none=True).",
            f"    host us/tensor: median host time inside one step call (no synchronisation) / {n}.",
            "    SGD fused, N-bit bytes: fused SGD over tensors enlarged to move the bytes per parameter",
            "    of a cupylars step with N-bit state (/ SGD same B compares with it). best torch: the",
            "    fastest of the eager, foreach and torch.compile LARS rows.",
        ]
        if any(row.get("host_over_spin") for row in rows.values()):
            spin = results.get("spin_ms", "--spin-ms")
            lines.append(f"    * host time > the {spin} ms spin before each step: gpu ms includes host time")
        lines.append("    targets: LARS <= 1.5x fused SGD, >= 5x faster than eager LARS (gpu ms)")
    for kind in ("eager", "foreach", "compiled"):
        check = results.get(f"{kind}_check")
        if check is None:
            continue
        if _not_measured(check):
            lines.append(f"{kind} LARS vs cupylars check: {_not_measured(check)}")
        else:
            verdict = "agree" if check["agrees"] else "DISAGREE"
            lines.append(
                f"{kind} LARS vs cupylars, 3 steps: {verdict} "
                f"(max diff {check['max_diff_relative_to_update']:.1e} of the update)"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs per row (median reported)")
    parser.add_argument("--large-elements", type=int, default=2**28, help="size of the tensor in (a)")
    parser.add_argument("--flush-mib", type=int, default=256, help="L2 scrub before each run (0: none)")
    parser.add_argument("--spin-ms", type=float, default=2.0, help="GPU busy-wait before each timed run")
    parser.add_argument("--skip-large", action="store_true", help="skip (a)")
    parser.add_argument("--skip-resnet", action="store_true", help="skip (b)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the torch.compile LARS rows of (b) and their check (compiling takes minutes)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (a smoke test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results",
        help="folder of the rows, the table and the numbers, written as measured "
        "(default: $OUT, else benchmarks/results)",
    )
    parser.add_argument(
        "--budget-s", type=float, help="seconds for the whole run: rows that would not fit are skipped"
    )
    parser.add_argument("--json", type=Path, help="also write all numbers here at the end")
    parser.add_argument("--report", type=Path, help="also write the table here at the end")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.large_elements = 5, 2**22
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    try:
        import cupy as cp

        if not cp.cuda.is_available():
            raise RuntimeError("CuPy sees no CUDA device")
    except Exception as e:
        print(f"gpu_step: cannot run without CuPy and a CUDA device: {e}", file=sys.stderr)
        return 2

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    results: dict[str, Any] = {
        "device": name,
        "cupy": cp.__version__,
        "large_elements": args.large_elements,
        "runs": args.runs,
        "spin_ms": args.spin_ms,
        "hyperparameters": HP,
    }
    try:
        import torch

        results["torch"] = torch.__version__
    except Exception:
        pass
    recorder = Recorder(results, args.out, budget)
    print(f"gpu_step: rows as measured in {args.out}", flush=True)
    timer = Timer(cp, args.flush_mib, args.spin_ms)
    t0 = time.perf_counter()
    if not args.skip_large:
        print("(a) large tensor ...", flush=True)
        bench_large(cp, timer, args.large_elements, args.runs, recorder)
    if not args.skip_resnet:
        print("(b) ResNet-50 ...", flush=True)
        bench_resnet(cp, timer, args.runs, recorder, compiled=args.compile)
        check_eager_matches(cp, recorder, compiled=args.compile)
    results["seconds"] = time.perf_counter() - t0
    recorder.write_tables()

    table = report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.report:
        args.report.write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
