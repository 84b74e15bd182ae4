#!/usr/bin/env python3
"""Builds of the native CPU step side by side: the limit row and the torch adapter's
LARS32bit and LARS8bit over each given build of ``rawkernels/cpu/lars_cpu.cpp``, in one
process.

A change to the native step is judged against the code before it on the same memory at
the same moment: every row steps its own copy of the same tensors, the rows take turns
in a new order each round, and what is printed is each row's median time and the median
over the rounds of its ratio to the limit row of the same round (the bandwidth of the
project's VM moves by tens of percent from run to run, and a per-round ratio cancels most
of that). Only the limit row and cupylars rows run: the OpenMP threads of torch's rows
(SGD, bitsandbytes) would spin beside ours between rows (docs/benchmarks.md).

Usage::

    python benchmarks/cpu_builds.py [--workload 10m|resnet50|1m] [--rounds N] [--threads 1,2] \\
        NAME=path/to/lars_cpu.cpp [NAME=path ...]

for instance, the previous commit against the working tree::

    git worktree add /tmp/before HEAD~1
    python benchmarks/cpu_builds.py before=/tmp/before/rawkernels/cpu/lars_cpu.cpp \\
        now=rawkernels/cpu/lars_cpu.cpp

Each build is compiled here with the native backend's flags (``lars_math.h`` from the
``rawkernels`` folder above the source) and loaded as a backend of its own.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_step import LimitStep  # noqa: E402
from gpu_step import resnet50_shapes  # noqa: E402

import cupylars.optim as cl  # noqa: E402
from cupylars import backends, cpu, native  # noqa: E402

HP = dict(lr=1e-6, momentum=0.9, weight_decay=1e-4)  # a small lr: the tensors stay alike over rounds
WORKLOADS = {"10m": [(10_000_000,)], "resnet50": None, "1m": [(1 << 20,)]}


def build(name: str, source: Path, folder: Path) -> cpu.CpuBackend:
    """``source`` compiled as the native backend compiles lars_cpu.cpp, as a backend."""
    target = folder / f"{name}.so"
    include = source.resolve().parents[1]  # rawkernels/, for "../lars_math.h"
    subprocess.run(
        [native._compiler(), *native.FLAGS, "-I", str(include), "-x", "c++", str(source), "-o", str(target)],
        check=True,
    )
    lib = ctypes.CDLL(str(target))
    c_ptr, c_int, c_ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.lars_cpu_step.restype = c_int
    lib.lars_cpu_step.argtypes = [c_ptr, c_int, c_ptr, c_ll, c_ll, c_ptr, c_ptr, c_ptr, c_ptr, c_int]
    lib.lars_cpu_set_group_bytes.restype = c_ll
    lib.lars_cpu_set_group_bytes.argtypes = [c_ll]
    return cpu.CpuBackend(lib, f"the {name} build ({source})")


def params(shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05)
        p.grad = torch.randn(s, generator=gen) * 0.01
        out.append(p)
    return out


def on(backend: cpu.CpuBackend, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with backends.use(backend):
            step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=SOURCE")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="10m")
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = parser.parse_args()
    shapes = WORKLOADS[args.workload] or resnet50_shapes()

    rows: dict[str, Callable[[], None]] = {"limit (fused two-pass)": LimitStep(params(shapes), **HP).step}
    with tempfile.TemporaryDirectory() as folder:
        for spec in args.builds:
            name, _, source = spec.partition("=")
            backend = build(name, Path(source), Path(folder))
            for cls in (cl.LARS32bit, cl.LARS8bit):
                with backends.use(backend):
                    opt = cls(params(shapes), **HP)
                rows[f"{name} {cls.__name__}"] = on(backend, opt.step)

        print(f"torch {torch.__version__}; {args.workload}; {args.rounds} rounds")
        print("x limit: the median over the rounds of the row's time / the limit row's time")
        for threads in (int(t) for t in args.threads.split(",")):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for step in rows.values():
                    step()
                    step()
                times: dict[str, list[float]] = {name: [] for name in rows}
                order = list(rows)
                for r in range(args.rounds):
                    random.Random(r).shuffle(order)
                    for name in order:
                        start = time.perf_counter()
                        rows[name]()
                        times[name].append(time.perf_counter() - start)
            finally:
                torch.set_num_threads(before)
            limit = times["limit (fused two-pass)"]
            print(f"\n{threads} thread(s)")
            print(f"  {'row':32s} {'ms/step':>9s} {'x limit':>8s}")
            for name, t in times.items():
                ratio = statistics.median(a / b for a, b in zip(t, limit))
                print(f"  {name:32s} {1e3 * statistics.median(t):9.2f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
