#!/usr/bin/env python3
"""Host (Python) time of one LARS step over ResNet-50's 161 parameter tensors.

On a GPU a LARS step over ResNet-50 moves ~820 MB (~0.3 ms on an H100), so
the Python that validates the inputs, builds the kernels' tables and launches
them must stay well under that or the step is host-bound. This measures that
Python on any machine: the CUDA backend runs over NumPy arrays through the
emulated runtime (``cupylars.testing.emulated_cuda()``) with every kernel
launch replaced by a no-op, so what is timed is everything but the kernels.

Rows (milliseconds per step, median of the timed steps; per-tensor microseconds
alongside):

* ``functional``: ``F.lars_update_many`` over the 161 arrays, 32-bit and 8-bit
  state;
* ``adapter``: ``cupylars.optim.LARS32bit`` / ``LARS8bit`` ``.step()`` over
  161 CPU ``torch.nn.Parameter``\\ s (NumPy views, same backend).

Each row runs twice: ``same grads`` (the same gradient arrays every step) and
``fresh grads`` (new gradient arrays before every step, allocated outside the
timed region while the old ones still exist, so every address is new), which
is what ``zero_grad(set_to_none=True)``, torch's default, gives a training
loop. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_step import HP, resnet50_shapes  # noqa: E402

from cupylars import cuda  # noqa: E402
from cupylars import functional as F  # noqa: E402
from cupylars.testing import emulated_cuda  # noqa: E402


def _noop(*args: Any) -> None:
    return None


@contextmanager
def stubbed_launches() -> Any:
    """The emulated CUDA backend with every kernel launch a no-op."""
    runtime = cuda.emulated_backend().runtime
    runtime.function = lambda name: _noop  # instance attribute shadows the method
    try:
        with emulated_cuda():
            yield
    finally:
        del runtime.function


def time_steps(step: Callable[[], None], before: Callable[[], None], runs: int, warmup: int) -> float:
    """Median milliseconds of ``step``; ``before`` runs untimed ahead of each call."""
    for _ in range(warmup):
        before()
        step()
    times = []
    for _ in range(runs):
        before()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def functional_rows(shapes: list[tuple[int, ...]], runs: int, warmup: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    params = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in shapes]
    same = [np.zeros(s, np.float32) for s in shapes]
    rows = {}
    for bits in (32, 8):
        states = [F.init_state(p, optim_bits=bits) for p in params]
        grads = {"g": same}

        def step(states: list = states, grads: dict = grads) -> None:
            F.lars_update_many(params, grads["g"], states, **HP)

        def fresh(grads: dict = grads) -> None:
            grads["g"] = [np.empty(s, np.float32) for s in shapes]

        rows[f"functional {bits}-bit, same grads"] = time_steps(step, lambda: None, runs, warmup)
        rows[f"functional {bits}-bit, fresh grads"] = time_steps(step, fresh, runs, warmup)
        grads["g"] = same
    return rows


def adapter_rows(shapes: list[tuple[int, ...]], runs: int, warmup: int) -> dict[str, float]:
    import torch

    import cupylars.optim

    torch.manual_seed(0)
    rows = {}
    for name in ("LARS32bit", "LARS8bit"):
        params = [torch.nn.Parameter(torch.randn(s) * 0.05) for s in shapes]
        same = [torch.zeros(s) for s in shapes]
        opt = getattr(cupylars.optim, name)(params, **HP)

        def use_same(params: list = params, same: list = same) -> None:
            for p, g in zip(params, same):
                p.grad = g

        def fresh(params: list = params) -> None:
            new = [torch.empty_like(p) for p in params]  # before the old ones go: new addresses
            for p, g in zip(params, new):
                p.grad = g

        use_same()
        rows[f"adapter {name}, same grads"] = time_steps(opt.step, lambda: None, runs, warmup)
        rows[f"adapter {name}, fresh grads"] = time_steps(opt.step, fresh, runs, warmup)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each row")
    args = parser.parse_args()

    shapes = resnet50_shapes()
    n = len(shapes)
    t0 = time.perf_counter()
    with stubbed_launches():
        rows = functional_rows(shapes, args.runs, args.warmup)
        rows.update(adapter_rows(shapes, args.runs, args.warmup))
    print(f"host time per LARS step, {n} ResNet-50 tensors, kernel launches stubbed (emulated runtime)")
    width = max(map(len, rows))
    for key, ms in rows.items():
        print(f"  {key:<{width}}  {ms:7.3f} ms/step  {ms * 1e3 / n:6.2f} us/tensor")
    print(f"({args.runs} timed steps per row, median; {time.perf_counter() - t0:.1f} s in all)")


if __name__ == "__main__":
    main()
