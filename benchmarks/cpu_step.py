#!/usr/bin/env python3
"""One optimizer step on the CPU: cupylars against the LARS implementations people use.

Every row steps its own copy of the same tensors (float32, momentum 0.9,
weight decay 1e-4, the same gradients every step), and the rows take turns:
each round times one step of every row, so a change in the machine's load
hits all rows alike. Printed: the median milliseconds per step over the rounds
and the ratio to ``torch.optim.SGD(foreach=True)`` on the same tensors, for
ResNet-50's 161 parameter tensors (25.6M elements) and for one 10M-element
tensor, at the machine's default thread count (torch's). Then three small
models (10 tensors of 1,000 elements, the demo's CNN, 161 tensors of 256), in
microseconds per step (100 steps per timed sample), where what counts is a
step's fixed cost: thread wake-ups and the adapter's Python.

Rows:

* ``limit (fused two-pass)``: the yardstick, ``benchmarks/limit_step.cpp``, compiled here
  at first use with the native backend's flags (and OpenMP): the least work any two-pass
  LARS step with float32 momentum can do (the six float64 dot products in fixed chunks,
  the ``max_unorm`` coefficient, ``m = mu m + g + wd p; p -= lr s m``), one tensor at a
  time with its norms and update back to back; the ``x limit`` column is each row's
  ratio to it in the same rounds;
* ``torch SGD foreach``: the baseline (no LARS at all);
* ``cupylars LARS32bit`` / ``LARS8bit``: the torch adapter over the native CPU
  backend (``max_unorm`` 0.02, as bitsandbytes' default);
* ``bitsandbytes PytorchLARS`` (torch eager) and ``LARS32bit`` / ``LARS8bit``
  (its CPU backend), when bitsandbytes is installed (the ``test`` extra
  installs it: ``make test`` sets it up);
* ``foreach LARS (timm-style)``: the classic trust-ratio LARS over
  ``torch._foreach_*`` ops, written here because timm needs torchvision.

Then two lines about the machine: the bandwidth of a large multi-threaded copy
measured in the same run, and the share of it our 32-bit step reaches on the
10M tensor, counted at 32 bytes per element (p, g and m read twice, p and m
written once: the norms must cover the whole tensor before anything changes).
And two lines about sharing the machine: a torch forward/backward timed alone
and right after a cupylars step, so that threads of ours left spinning would
show as a slower torch; and a cupylars step timed after a pause and right after
a torch forward/backward, whose OpenMP threads spin for a while after each
parallel region (libgomp's default) on the cores our threads need.

Usage: ``python benchmarks/cpu_step.py [--rounds N]``. Takes a minute or two.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import os
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

from gpu_step import resnet50_shapes  # noqa: E402

import cupylars.optim as cl  # noqa: E402
from cupylars import native  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
BYTES_PER_ELEMENT_32 = 32


def _bnb():
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes  # prints about optional GPU kernels on import
        return bitsandbytes
    except ImportError:
        return None


class ForeachLars(torch.optim.Optimizer):
    """The classic LARS step (trust ratio, momentum) over torch's foreach ops, timm-style."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, trust: float = 1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            p_norms = torch._foreach_norm(params)
            g_norms = torch._foreach_norm(grads)
            d = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            ratios = [
                torch.where(
                    (pn > 0) & (gn > 0), group["trust"] * pn / (gn + group["weight_decay"] * pn), 1.0
                )
                for pn, gn in zip(p_norms, g_norms)
            ]
            torch._foreach_mul_(d, ratios)
            bufs = []
            for p, di in zip(params, d):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = di.clone()
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


LIMIT_SOURCE = ROOT / "benchmarks" / "limit_step.cpp"
LIMIT_CHUNK = 16384  # kChunk of limit_step.cpp


def limit_library() -> ctypes.CDLL:
    """benchmarks/limit_step.cpp, built once per (source, flags) with the native backend's flags."""
    flags = [f for f in native.FLAGS if f != "-fvisibility=hidden"] + ["-fopenmp"]
    cxx = native._compiler()
    recipe = "\0".join([cxx, *flags, native._compiler_id(cxx), native._cpu_id()]).encode()
    key = hashlib.sha256(recipe + b"\0" + LIMIT_SOURCE.read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"cupylars-bench-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022 or not folder.is_dir() or folder.is_symlink():
        raise RuntimeError(f"{folder} is not a private folder of this user: not loading code from it")
    target = folder / f"limit_step-{key}.so"
    if not target.exists():
        scratch = folder / f"limit_step-{key}.{os.getpid()}.so"
        subprocess.run([cxx, *flags, str(LIMIT_SOURCE), "-o", str(scratch)], check=True)
        scratch.replace(target)
    lib = ctypes.CDLL(str(target))
    lib.limit_step.restype = None
    lib.limit_step.argtypes = [
        ctypes.c_int,
        *[ctypes.c_void_p] * 5,
        *[ctypes.c_double] * 4,
        ctypes.c_int,
    ]
    return lib


class LimitStep:
    """The limit row: limit_step.cpp over the tensors of ``params`` (float32 momentum)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float):
        self._lib = limit_library()
        self._hp = (lr, momentum, weight_decay, 0.02)  # max_unorm as the cupylars rows
        self._params = params
        self._momenta = [torch.zeros_like(p) for p in params]
        count = len(params)
        pointers = ctypes.c_void_p * count
        self._p = pointers(*[p.data_ptr() for p in params])
        self._g = pointers(*[p.grad.data_ptr() for p in params])
        self._m = pointers(*[m.data_ptr() for m in self._momenta])
        self._sizes = (ctypes.c_longlong * count)(*[p.numel() for p in params])
        chunks = max(-(-p.numel() // LIMIT_CHUNK) for p in params)
        self._partials = torch.empty(6 * chunks, dtype=torch.float64)

    def step(self) -> None:
        self._lib.limit_step(
            len(self._params),
            self._p,
            self._g,
            self._m,
            self._sizes,
            self._partials.data_ptr(),
            *self._hp,
            torch.get_num_threads(),
        )


def make_rows(shapes: list[tuple[int, ...]]) -> dict[str, torch.optim.Optimizer | LimitStep]:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]

    def params() -> list[torch.nn.Parameter]:
        out = []
        for b, g in zip(base, grads):
            p = torch.nn.Parameter(b.clone())
            p.grad = g.clone()
            out.append(p)
        return out

    hp = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    rows: dict[str, torch.optim.Optimizer | LimitStep] = {
        "limit (fused two-pass)": LimitStep(params(), **hp),
        "torch SGD foreach": torch.optim.SGD(params(), foreach=True, **hp),
        "cupylars LARS32bit": cl.LARS32bit(params(), **hp),
        "cupylars LARS8bit": cl.LARS8bit(params(), **hp),
    }
    bnb = _bnb()
    if bnb is not None:
        from bitsandbytes.optim.lars import PytorchLARS

        rows["bitsandbytes PytorchLARS"] = PytorchLARS(params(), **hp)
        rows["bitsandbytes LARS32bit"] = bnb.optim.LARS32bit(params(), **hp)
        rows["bitsandbytes LARS8bit"] = bnb.optim.LARS8bit(params(), **hp)
    rows["foreach LARS (timm-style)"] = ForeachLars(params(), **hp)
    return rows


def interleaved(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 2, calls: int = 1
) -> dict[str, float]:
    """Median milliseconds per call of each step, the steps taking turns round by round
    (``calls`` calls per timed sample: small steps last microseconds).

    Each round runs the steps in a new order (fixed seed): a row that leaves work behind
    (OpenMP threads that spin for a while after a parallel region, torch's and the limit
    row's) then slows every other row alike instead of always the one after it."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def small_models() -> dict[str, list[tuple[int, ...]]]:
    """Small models, where a step's fixed costs (thread wake-ups, the adapter's Python)
    dwarf its arithmetic: what research prototyping on a laptop CPU runs."""
    from cupylars.demo import make_model

    return {
        "10 tensors x 1,000": [(1000,)] * 10,
        "the demo's CNN": [tuple(p.shape) for p in make_model().parameters()],
        "161 tensors x 256": [(256,)] * 161,
    }


def copy_bandwidth(nbytes: int, rounds: int) -> float:
    """GB/s of a multi-threaded copy (torch's), counting the bytes read and written."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    ms = interleaved({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def table(title: str, results: dict[str, float]) -> None:
    base, limit = results["torch SGD foreach"], results["limit (fused two-pass)"]
    print(f"\n{title}")
    print(f"  {'optimizer':32s} {'ms/step':>9s} {'x limit':>8s} {'x SGD':>7s}")
    for name, ms in results.items():
        print(f"  {name:32s} {ms:9.2f} {ms / limit:8.2f} {ms / base:7.2f}")


def sharing_line(rounds: int) -> None:
    """A torch forward/backward alone, and right after a cupylars step (which must not slow it);
    a cupylars step after a pause, and right after a torch forward/backward (torch's OpenMP
    threads spin for a while after each parallel region, on the cores the step's threads need)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1)
    )
    x = torch.randn(32, 3, 32, 32)
    weight = torch.nn.Parameter(torch.randn(4_000_000) * 0.05)
    weight.grad = torch.randn(4_000_000) * 0.01
    opt = cl.LARS32bit([weight], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def forward_backward() -> None:
        model.zero_grad()
        model(x).square().mean().backward()

    alone, after = [], []
    for _ in range(3):
        forward_backward()
        opt.step()
    for _ in range(rounds):
        start = time.perf_counter()
        forward_backward()
        alone.append(time.perf_counter() - start)
        opt.step()
        start = time.perf_counter()
        forward_backward()
        after.append(time.perf_counter() - start)
    a, b = 1e3 * statistics.median(alone), 1e3 * statistics.median(after)
    print(
        f"\nsharing the machine: torch forward/backward {a:.2f} ms alone, {b:.2f} ms right after a "
        f"cupylars step ({b / a:.2f}x)"
    )
    rested, after_torch = [], []
    for _ in range(rounds):
        time.sleep(0.05)  # torch's threads have gone to sleep
        start = time.perf_counter()
        opt.step()
        rested.append(time.perf_counter() - start)
        forward_backward()
        start = time.perf_counter()
        opt.step()
        after_torch.append(time.perf_counter() - start)
    c, d = 1e3 * statistics.median(rested), 1e3 * statistics.median(after_torch)
    print(
        f"                     cupylars step (4M) {c:.2f} ms after a pause, {d:.2f} ms right after a torch "
        f"forward/backward ({d / c:.2f}x: torch's OpenMP threads spin for a while after each region)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} rounds")

    shapes = resnet50_shapes()
    rows = make_rows(shapes)
    table(
        f"ResNet-50 shapes ({len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M)",
        interleaved({name: opt.step for name, opt in rows.items()}, args.rounds),
    )
    print(f"  backend: {rows['cupylars LARS32bit'].backends.get('cpu', '?').split(':')[0]}")
    del rows

    n = 10_000_000
    rows = make_rows([(n,)])
    large = interleaved({name: opt.step for name, opt in rows.items()}, args.rounds)
    table("one 10M tensor", large)
    del rows

    for title, small in small_models().items():
        rows = make_rows(small)
        rows.pop("limit (fused two-pass)")  # a yardstick for memory-bound steps only
        results = interleaved({name: opt.step for name, opt in rows.items()}, args.rounds, calls=100)
        base = results["torch SGD foreach"]
        size = sum(torch.Size(s).numel() for s in small)
        print(f"\nsmall model: {title} ({len(small)} tensors, {size:,} elements)")
        print(f"  {'optimizer':32s} {'us/step':>9s} {'x SGD':>7s}")
        for name, ms in results.items():
            print(f"  {name:32s} {1e3 * ms:9.1f} {ms / base:7.2f}")
        del rows

    copy = copy_bandwidth(256 * 2**20, args.rounds)
    print(f"\nmemory: multi-threaded copy {copy:.1f} GB/s (read + write, 256 MiB)")
    for name in ("limit (fused two-pass)", "cupylars LARS32bit"):
        rate = BYTES_PER_ELEMENT_32 * n / (large[name] * 1e-3) / 1e9
        print(
            f"        {name} on 10M: {rate:.1f} GB/s at {BYTES_PER_ELEMENT_32} B/element "
            f"= {rate / copy:.0%} of the copy"
        )
    sharing_line(args.rounds)


if __name__ == "__main__":
    main()
