"""Large-batch training with LARS32bit, LARS8bit and torch's SGD, side by side.

``python -m cupylars.demo`` (or ``cupylars-demo``) trains the same small CNN
from the same initialisation on a synthetic image classification set: 16x16
grayscale pictures of ten procedurally drawn kinds of shape and stripe
pattern, at random positions, sizes, phases and contrasts, under Gaussian
noise. The set is generated from ``--seed`` on the fly (nothing is
downloaded), so runs are reproducible.

It prints progress per epoch, then a table of final test loss and accuracy,
optimizer-state bytes and median ``optimizer.step()`` time, and writes a
loss-curve PNG when matplotlib is installed. Defaults finish in well under two
minutes on a 2-core CPU; a CUDA device is used when available.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CLASSES", "main", "make_dataset", "make_model"]

#: The ten classes of the synthetic set.
CLASSES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "anti-diagonal stripes",
    "disk",
    "ring",
    "square",
    "square outline",
    "plus",
    "cross",
)
SIZE = 16


def _draw(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` binary pictures of class ``kind``, shape (n, SIZE, SIZE)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    xx, yy = xx[None], yy[None]

    def col(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=(n, 1, 1))

    if kind < 4:
        period, phase = col(3.0, 6.0), col(0.0, 2 * math.pi)
        coordinate = (yy, xx, xx + yy, xx - yy)[kind] / (1.0 if kind < 2 else math.sqrt(2))
        return np.sin(2 * math.pi * coordinate / period + phase) > 0
    radius = col(3.0, 6.0)
    cx, cy = col(radius.min(), SIZE - 1 - radius.max()), col(radius.min(), SIZE - 1 - radius.max())
    cx, cy = cx + col(-1.0, 1.0), cy + col(-1.0, 1.0)
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    distance = np.hypot(dx, dy)
    if kind == 4:
        return distance <= radius
    if kind == 5:
        return np.abs(distance - radius) <= 0.9
    half = radius - 0.5
    if kind == 6:
        return np.maximum(dx, dy) <= half
    if kind == 7:
        return np.abs(np.maximum(dx, dy) - half) <= 0.7
    if kind == 8:
        return ((dx <= 1.0) & (dy <= half + 1)) | ((dy <= 1.0) & (dx <= half + 1))
    return (np.abs(dx - dy) <= 1.0) & (np.maximum(dx, dy) <= half + 1)


def make_dataset(n: int, seed: int, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled pictures: float32 images (n, 1, 16, 16), standardised, and int64 labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    images = np.empty((n, SIZE, SIZE), dtype=np.float64)
    for kind in range(len(CLASSES)):
        where = np.flatnonzero(labels == kind)
        shapes = _draw(kind, where.size, rng)
        contrast = rng.uniform(0.6, 1.0, size=(where.size, 1, 1))
        background = rng.uniform(-0.2, 0.2, size=(where.size, 1, 1))
        images[where] = background + contrast * shapes
    images += rng.normal(0.0, noise, size=images.shape)
    images = (images - images.mean()) / images.std()
    return images[:, None].astype(np.float32), labels.astype(np.int64)


def make_model(width: int = 16) -> Any:
    """A small CNN for 16x16 pictures: two conv-BN-ReLU-pool blocks and a linear head."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (SIZE // 4) ** 2, len(CLASSES)),
    )


@dataclass
class Result:
    name: str
    losses: list[float] = field(default_factory=list)
    test_loss: float = math.nan
    accuracy: float = math.nan
    state_bytes: int = 0
    step_seconds: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    backend: str = ""


def _optimizers(args: argparse.Namespace) -> dict[str, Callable[[Any], Any]]:
    import torch

    from cupylars import optim

    def lars(cls: type) -> Callable[[Any], Any]:
        return lambda model: cls(
            optim.exclude_bias_and_norm(model, args.weight_decay),
            lr=args.lr,
            momentum=args.momentum,
            max_unorm=args.max_unorm,
        )

    return {
        "LARS32bit": lars(optim.LARS32bit),
        "LARS8bit": lars(optim.LARS8bit),
        "SGD": lambda model: torch.optim.SGD(
            model.parameters(), lr=args.sgd_lr, momentum=args.momentum, weight_decay=args.weight_decay
        ),
    }


def _state_bytes(optimizer: Any) -> int:
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _train(
    name: str,
    build: Callable[[Any], Any],
    data: tuple[Any, Any, Any, Any],
    args: argparse.Namespace,
    device: Any,
    log: Callable[[str], None],
) -> Result:
    import torch
    import torch.nn.functional as nnf

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)  # the same initialisation and batch order for every optimizer
    model = make_model(args.width).to(device)
    optimizer = build(model)
    steps_per_epoch = max(1, x_train.shape[0] // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, total_steps // 10)

    # The usual large-batch schedule: linear warm-up, then cosine decay.
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    result = Result(name)
    order_rng = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=order_rng)
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size].to(device)
            loss = nnf.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tick = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.step_seconds.append(time.perf_counter() - tick)
            schedule.step()
            result.losses.append(loss.item())
            epoch_loss += result.losses[-1]
        _refresh_batch_norm(model, x_train, args.batch_size)
        test_loss, accuracy = _evaluate(model, x_test, y_test, args.batch_size)
        log(
            f"  [{name:>9}] epoch {epoch + 1}/{args.epochs}  train loss {epoch_loss / steps_per_epoch:.4f}  "
            f"test loss {test_loss:.4f}  accuracy {100 * accuracy:5.1f}%  "
            f"({time.perf_counter() - start:.1f} s)"
        )
    result.train_seconds = time.perf_counter() - start
    result.test_loss, result.accuracy = _evaluate(model, x_test, y_test, args.batch_size)
    result.state_bytes = _state_bytes(optimizer)
    result.backend = ", ".join(
        f"{b.split(':')[0]} (tensors on {d})" for d, b in getattr(optimizer, "backends", {}).items()
    )
    return result


def _refresh_batch_norm(model: Any, x: Any, batch_size: int, batches: int = 2) -> None:
    """Recompute the batch-norm running statistics from training pictures with the current weights.

    At batch 1024 an epoch is 8 steps, and at the peak learning rate LARS moves each weight
    tensor by up to lr * max_unorm = 8% of its norm per step. Batch norm's running averages
    (momentum 0.1, a memory of about ten steps) then describe weights more than an epoch
    old, and the test loss computed with them jumped (to ~8 at epoch 4) while the training
    loss fell steadily. Recomputing them before each evaluation ("precise BN") measures the
    model as trained; it changes no weight and not the training itself.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, min(x.shape[0], batches * batch_size), batch_size):
            model(x[i : i + batch_size])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def _evaluate(model: Any, x: Any, y: Any, batch_size: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as nnf

    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i : i + batch_size])
            loss += nnf.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
            correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    return loss / x.shape[0], correct / x.shape[0]


def format_table(results: Sequence[Result]) -> str:
    """The summary table, one row per optimizer."""
    # The median step: the first steps also build the step plan, create the state and (torch's
    # optimizers and ours alike) import torch._dynamo, which a mean would spread over the run.
    header = ("optimizer", "test loss", "accuracy", "state bytes", "step ms", "train s")
    rows = [
        (
            r.name,
            f"{r.test_loss:.4f}",
            f"{100 * r.accuracy:.1f}%",
            f"{r.state_bytes:,}",
            f"{1000 * float(np.median(r.step_seconds)):.2f}",
            f"{r.train_seconds:.1f}",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
    return "\n".join(lines)


def _plot(results: Sequence[Result], path: str, log: Callable[[str], None]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss-curve PNG (pip install 'cupylars[plot]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(np.arange(1, len(r.losses) + 1), r.losses, label=r.name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Synthetic shapes, large batch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"loss curves written to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cupylars-demo",
        description="Train a small CNN on generated 16x16 shape pictures at a large batch with "
        "LARS32bit, LARS8bit and torch.optim.SGD side by side, then compare final loss, accuracy, "
        "optimizer-state bytes and step time.",
        # Defaults are written into each help text: ArgumentDefaultsHelpFormatter also appends
        # "(default: False)" to flags and "(default: None)" where the help explains the default.
    )
    default = " (default: %(default)s)"
    add = parser.add_argument
    add("--train-size", type=int, default=8192, help="generated training pictures" + default)
    add("--test-size", type=int, default=2048, help="generated test pictures" + default)
    add("--batch-size", type=int, default=1024, help="batch size, large as LARS is meant for" + default)
    add("--epochs", type=int, default=12, help="passes over the training set" + default)
    add("--width", type=int, default=16, help="channels of the first conv layer" + default)
    add("--lr", type=float, default=4.0, help="peak learning rate of the LARS optimizers" + default)
    add("--max-unorm", type=float, default=0.02, help="LARS max_unorm: cap on update / weight norm" + default)
    add("--sgd-lr", type=float, default=0.1, help="peak learning rate of SGD" + default)
    add("--momentum", type=float, default=0.9, help="momentum of all optimizers" + default)
    add("--weight-decay", type=float, default=5e-4,
        help="weight decay (LARS: not on biases, norms)" + default)
    add(
        "--optimizers",
        default="LARS32bit,LARS8bit,SGD",
        help="comma-separated subset of LARS32bit, LARS8bit, SGD (default: all three)",
    )
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add("--seed", type=int, default=0, help="seed of data, initialisation and batch order" + default)
    add("--plot", default="cupylars_demo_loss.png", help="where to write the loss-curve PNG" + default)
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def _import_torch() -> Any:
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise  # torch is there but something it needs is not: that error says what
        raise ImportError(
            'cupylars-demo needs torch, which is not installed: pip install "cupylars[torch]"'
        ) from exc
    return torch


def _prepare_native_backend(log: Callable[[str], None]) -> None:
    """Build (or load) the native CPU backend before the timed runs.

    Its first use compiles it (about 5 s), which would otherwise fall inside the first
    LARS step and be reported as that optimizer's step time. A build is announced with
    where it is cached and how long it took; loading a cached build says nothing. Where
    it cannot be built, the optimizers' own warning says why (the reference runs).
    """
    import os

    from cupylars import _cache, native

    if (os.environ.get("CUPYLARS_BACKEND") or "auto") == "reference" or native.library_path() is not None:
        return
    folder = _cache.cache_root("cpu")
    cached = set(folder.glob("*.so")) if folder.is_dir() else set()
    if not cached:
        log(f"building the native CPU backend (first use, cached in {folder}) ...")
    start = time.perf_counter()
    try:
        native.library()
    except native.NativeUnavailableError:
        return
    if native.library_path() not in cached:
        where = "" if not cached else f" (cached in {folder})"
        log(f"built the native CPU backend in {time.perf_counter() - start:.1f} s{where}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = build_parser().parse_args(argv)
    torch = _import_torch()

    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    builders = _optimizers(args)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in builders]
    if unknown or not names:
        print(
            f"cupylars-demo: unknown optimizer(s) {unknown}; choose from {sorted(builders)}", file=sys.stderr
        )
        return 2
    if min(args.train_size, args.test_size, args.batch_size, args.epochs, args.width) < 1:
        print("cupylars-demo: sizes, batch size, epochs and width must be positive", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    start = time.perf_counter()
    x_train, y_train = make_dataset(args.train_size, args.seed)
    x_test, y_test = make_dataset(args.test_size, args.seed + 1)
    data = tuple(torch.from_numpy(a).to(device) for a in (x_train, y_train, x_test, y_test))
    batch = min(args.batch_size, args.train_size)
    args.batch_size = batch
    log(
        f"cupylars demo on {device}: {args.train_size} training / {args.test_size} test pictures of "
        f"{len(CLASSES)} classes, batch {batch}, {args.epochs} epochs, "
        f"{sum(p.numel() for p in make_model(args.width).parameters()):,} parameters"
    )
    if device.type == "cpu" and any(name.startswith("LARS") for name in names):
        _prepare_native_backend(log)  # outside the timed steps
    results = [_train(name, builders[name], data, args, device, log) for name in names]
    print()
    print(format_table(results))
    for r in results:
        if r.backend:
            log(f"{r.name} backend: {r.backend}")
    if not args.no_plot:
        _plot(results, args.plot, log)
    log(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
