#!/usr/bin/env python3
"""Time one LARS step on a GPU (scripts/gpu_check runs this).

(a) One 256M-element float32 tensor: achieved bandwidth of a cupylars step with
    32-bit and with 8-bit momentum, against a measured device-to-device copy.
    Two byte counts are reported: the fewest bytes any LARS step must move
    (read p, g, m once, write p, m once) and the bytes of this two-pass design
    (the statistics pass reads p, g, m once more; docs/kernels.md).
(b) ResNet-50's 161 parameter tensors (25.6M parameters, shapes generated from
    the architecture below): step time of cupylars (32-bit and 8-bit state)
    against torch.optim.SGD(momentum=0.9, fused=True) and an eager PyTorch
    implementation of the same LARS step, with float32 and bfloat16 parameters.

Timing: CUDA events around each step after warm-up, median of many runs. Before
each timed step a spin kernel keeps the GPU busy while the host queues the step
(so the events time the device, not Python), and a buffer larger than L2 is
overwritten (so no step starts with a warm cache). "wall ms" is the host's view:
back-to-back steps, then one synchronisation, divided by the count.

Targets on H100 (reported, not asserted): (a) >= 85% of copy bandwidth with
32-bit state, >= 80% with 8-bit; (b) a LARS step <= 1.5x fused SGD and >= 5x
faster than eager LARS.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        self.flush = cp.empty(flush_mib * 2**18, dtype=cp.float32) if flush_mib > 0 else None
        self.spin = cp.RawKernel(
            r"""extern "C" __global__ void spin(long long cycles) {
                  const long long start = clock64();
                  while (clock64() - start < cycles) { }
                }""",
            "spin",
        )
        self.spin_cycles = np.int64(int(_clock_khz(cp) * spin_ms))  # kHz x ms = cycles

    def device_ms(self, step: Callable[[], None], runs: int, warmup: int) -> float:
        cp = self.cp
        for _ in range(warmup):
            step()
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(runs):
            self.spin((1,), (1,), (self.spin_cycles,))
            if self.flush is not None:
                self.flush.fill(0)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return statistics.median(times)

    def wall_ms(self, step: Callable[[], None], runs: int) -> float:
        self.cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(runs):
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
def bench_large(cp: Any, timer: Timer, n: int, runs: int, results: dict) -> None:
    from cupylars import functional as F

    rows = results.setdefault("large", {})
    nbytes = n * 4
    try:
        buffers = [_random(cp, n, 1.0, 0), cp.empty(n, dtype=cp.float32)]

        def copy(src: Any = buffers[0], dst: Any = buffers[1]) -> None:
            stream = cp.cuda.get_current_stream().ptr
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, 3, stream)  # 3: device to device

        ms = timer.device_ms(copy, runs, 3)
        rows["copy"] = {"ms": ms, "gbps": 2 * nbytes / ms / 1e6}
        del buffers, copy
    except Exception as e:
        rows["copy"] = {"error": _err(e)}
    _free(cp)

    for bits in (32, 8):
        key = f"lars_{bits}bit"
        try:
            p = _random(cp, n, 0.02, 1)
            g = _random(cp, n, 1e-3, 2)
            state = F.init_state(p, optim_bits=bits)

            def step(p=p, g=g, state=state) -> None:
                F.lars_update(p, g, state, **HP)

            ms = timer.device_ms(step, runs, 3)
            if bits == 32:
                minimal = n * (4 + 4 + 4) + n * (4 + 4)  # read p g m, write p m
                two_pass = minimal + n * 12  # the statistics pass reads p g m
            else:
                scales = 4 * math.ceil(n / 256)
                minimal = n * (4 + 4 + 1) + scales + n * (4 + 1) + scales
                two_pass = minimal + n * 9 + scales
            rows[key] = {
                "ms": ms,
                "wall_ms": timer.wall_ms(step, max(3, runs // 4)),
                "gbps_minimal": minimal / ms / 1e6,
                "gbps_two_pass": two_pass / ms / 1e6,
                "finite": bool(cp.isfinite(p[:: max(1, n // 4096)]).all()),
            }
        except Exception as e:
            rows[key] = {"error": _err(e)}
        p = g = state = step = None  # drop every reference before freeing the pool
        _free(cp)


# ---- (b) ResNet-50 -------------------------------------------------------------------------------
def _eager_lars(torch: Any, params: list, grads: list, bufs: list, first: list[bool]) -> None:
    """The same LARS step (percentile clipping off) in plain PyTorch ops, per tensor,
    float32 arithmetic and state; no host synchronisation."""
    for i, (p, g, m) in enumerate(zip(params, grads, bufs)):
        p32, g32 = p.float(), g.float()
        g_norm = torch.linalg.vector_norm(g32)
        p_norm = torch.linalg.vector_norm(p32)
        d = torch.add(g32, p32, alpha=WEIGHT_DECAY)
        both = (p_norm > 0) & (g_norm > 0)
        r = torch.where(both, TRUST * p_norm / (g_norm + WEIGHT_DECAY * p_norm + EPS), 1.0)
        d.mul_(r)
        if first[i]:
            m.copy_(d)
            first[i] = False
        else:
            m.mul_(MOMENTUM).add_(d)
        u_norm = torch.linalg.vector_norm(m)
        clip = (p_norm > 0) & (u_norm > MAX_UNORM * p_norm)
        s = torch.where(clip, MAX_UNORM * p_norm / u_norm, 1.0)
        new = p32 - (LR * s) * m
        p.copy_(new)


def _time_row(
    cp: Any, timer: Timer, rows: dict, key: str, make_step: Callable[[], Callable], runs: int
) -> None:
    """Build a step (allocating its data), time it, record the row or the error."""
    try:
        step = make_step()
        rows[key] = {"ms": timer.device_ms(step, runs, 5), "wall_ms": timer.wall_ms(step, runs)}
    except Exception as e:
        rows[key] = {"error": _err(e)}
    step = None
    _free(cp)


def bench_resnet(cp: Any, timer: Timer, runs: int, results: dict) -> None:
    from cupylars import functional as F

    shapes = resnet50_shapes()
    sizes = [int(np.prod(s)) for s in shapes]
    results["resnet50"] = {"tensors": len(shapes), "params": sum(sizes)}
    rows = results["resnet50"].setdefault("rows", {})
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
    except Exception as e:
        torch = None
        results["resnet50"]["torch_error"] = _err(e)

    def cupylars_step(fmt: str, bits: int) -> Callable[[], None]:
        def random_list(scale: float, seed: int) -> list:
            return [_random(cp, n, scale, seed + i).reshape(s) for i, (n, s) in enumerate(zip(sizes, shapes))]

        params, grads, dtype = random_list(0.05, 10), random_list(1e-3, 900), None
        if fmt == "bfloat16":
            params = [_as_bf16_bits(cp, x) for x in params]
            grads = [_as_bf16_bits(cp, x) for x in grads]
            dtype = "bfloat16"
        states = [F.init_state(p, optim_bits=bits, dtype=dtype) for p in params]
        return lambda: F.lars_update_many(params, grads, states, dtype=dtype, **HP)

    def torch_list(tdtype: Any, scale: float, gen: Any) -> list:
        return [(torch.randn(s, device="cuda", generator=gen) * scale).to(tdtype) for s in shapes]

    def sgd_step(tdtype: Any) -> Callable[[], None]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.nn.Parameter(t) for t in torch_list(tdtype, 0.05, gen)]
        for p, g in zip(params, torch_list(tdtype, 1e-3, gen)):
            p.grad = g
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
        return opt.step

    def eager_step(tdtype: Any) -> Callable[[], None]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        params, grads = torch_list(tdtype, 0.05, gen), torch_list(tdtype, 1e-3, gen)
        bufs = [torch.zeros(s, device="cuda", dtype=torch.float32) for s in shapes]
        first = [True] * len(params)

        def step() -> None:
            with torch.no_grad():
                _eager_lars(torch, params, grads, bufs, first)

        return step

    for fmt in ("float32", "bfloat16"):
        for bits in (32, 8):
            make = lambda f=fmt, b=bits: cupylars_step(f, b)  # noqa: E731
            _time_row(cp, timer, rows, f"{fmt} cupylars {bits}-bit", make, runs)
        if torch is None:
            continue
        tdtype = torch.float32 if fmt == "float32" else torch.bfloat16
        _time_row(cp, timer, rows, f"{fmt} torch SGD fused", lambda t=tdtype: sgd_step(t), runs)
        # eager LARS launches ~15 kernels per tensor: fewer runs keep the benchmark short
        eager_runs = max(5, runs // 3)
        _time_row(cp, timer, rows, f"{fmt} torch eager LARS", lambda t=tdtype: eager_step(t), eager_runs)


def check_eager_matches(cp: Any, results: dict) -> None:
    """The eager rows time the same algorithm: one step of each on the same data."""
    try:
        import torch

        from cupylars import functional as F

        shapes = [(64, 3, 7, 7), (64,), (256, 64, 1, 1), (1000, 2048)]
        rng = np.random.default_rng(0)
        p_host = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in shapes]
        g_host = [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in shapes]
        worst = 0.0
        params = [cp.asarray(p) for p in p_host]
        states = [F.init_state(p) for p in params]
        tparams = [torch.tensor(p, device="cuda") for p in p_host]
        bufs = [torch.zeros_like(t) for t in tparams]
        first = [True] * len(shapes)
        for _ in range(3):
            F.lars_update_many(params, [cp.asarray(g) for g in g_host], states, **HP)
            with torch.no_grad():
                _eager_lars(torch, tparams, [torch.tensor(g, device="cuda") for g in g_host], bufs, first)
        for a, t, p0 in zip(params, tparams, p_host):
            moved = np.abs(cp.asnumpy(a) - p0).max()
            worst = max(worst, float(np.abs(cp.asnumpy(a) - t.cpu().numpy()).max() / max(moved, 1e-30)))
        results["eager_check"] = {"max_diff_relative_to_update": worst, "agrees": worst < 1e-3}
    except Exception as e:
        results["eager_check"] = {"error": _err(e)}


# ---- report ---------------------------------------------------------------------------------------
def _err(e: BaseException) -> str:
    detail = traceback.format_exception_only(type(e), e)[-1].strip()
    print(f"  ! {detail}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    return detail


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
        if "error" in copy:
            lines.append(f"    {name:24s} error: {copy['error']}")
        elif copy:
            lines.append(f"    {name:24s} {copy['ms']:8.3f} {copy['gbps']:9.0f} {100:6.0f}%")
        for bits, target in ((32, 85), (8, 80)):
            row = large.get(f"lars_{bits}bit", {})
            name = f"cupylars {bits}-bit state"
            if "error" in row or not row:
                lines.append(f"    {name:24s} error: {row.get('error', 'not run')}")
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
        lines.append(f"    {'':30s} {'gpu ms':>8s} {'wall ms':>8s} {'/ SGD fused':>11s} {'eager /':>8s}")
        for fmt in ("float32", "bfloat16"):
            sgd = rows.get(f"{fmt} torch SGD fused", {}).get("ms")
            eager = rows.get(f"{fmt} torch eager LARS", {}).get("ms")
            for name in ("torch SGD fused", "torch eager LARS", "cupylars 32-bit", "cupylars 8-bit"):
                row = rows.get(f"{fmt} {name}")
                label = f"{fmt} {name}"
                if row is None:
                    continue
                if "error" in row:
                    lines.append(f"    {label:30s} error: {row['error']}")
                    continue
                vs_sgd = f"{row['ms'] / sgd:10.2f}x" if sgd else "          -"
                mine = eager and name.startswith("cupylars")
                speedup = f"{eager / row['ms']:7.1f}x" if mine else "       -"
                lines.append(f"    {label:30s} {row['ms']:8.3f} {row['wall_ms']:8.3f} {vs_sgd} {speedup}")
        lines.append("    targets: LARS <= 1.5x fused SGD, >= 5x faster than eager LARS (gpu ms)")
    check = results.get("eager_check")
    if check is not None:
        if "error" in check:
            lines.append(f"eager LARS vs cupylars check: error: {check['error']}")
        else:
            verdict = "agree" if check["agrees"] else "DISAGREE"
            lines.append(
                f"eager LARS vs cupylars, 3 steps: {verdict} "
                f"(max diff {check['max_diff_relative_to_update']:.1e} of the update)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs per row (median reported)")
    parser.add_argument("--large-elements", type=int, default=2**28, help="size of the tensor in (a)")
    parser.add_argument("--flush-mib", type=int, default=256, help="L2 scrub before each run (0: none)")
    parser.add_argument("--spin-ms", type=float, default=2.0, help="GPU busy-wait before each timed run")
    parser.add_argument("--skip-large", action="store_true", help="skip (a)")
    parser.add_argument("--skip-resnet", action="store_true", help="skip (b)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (a smoke test)")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--report", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.large_elements = 5, 2**22

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
        "hyperparameters": HP,
    }
    try:
        import torch

        results["torch"] = torch.__version__
    except Exception:
        pass
    timer = Timer(cp, args.flush_mib, args.spin_ms)
    t0 = time.perf_counter()
    if not args.skip_large:
        print("(a) large tensor ...", flush=True)
        bench_large(cp, timer, args.large_elements, args.runs, results)
    if not args.skip_resnet:
        print("(b) ResNet-50 ...", flush=True)
        bench_resnet(cp, timer, args.runs, results)
        check_eager_matches(cp, results)
    results["seconds"] = time.perf_counter() - t0

    table = report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.report:
        args.report.write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
