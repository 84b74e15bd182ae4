"""What the distributed tests share: the model, the training loop, snapshots, and a
spawn of WORLD gloo processes (retried once on another port)."""

from __future__ import annotations

import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

WORLD = 2
ATTEMPTS = 3


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Linear(80, 7): shards of 4 and 3 rows, so FSDP2 pads and shards are uneven.
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 7))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    """``steps`` steps on the batches numbered from ``start`` (the same on every rank)."""
    for k in range(start, start + steps):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(k))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) parameters by name, without DDP's ``module.`` prefix."""
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = p.detach().clone()
    return out


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    # Restored afterwards: other tests compare against subprocesses that use torch's default.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[[int, int, str], None], outdir: Path) -> None:
    """``worker(rank, port, outdir)`` in WORLD fresh processes."""
    import torch.multiprocessing as mp

    here = str(Path(__file__).resolve().parent)  # spawned children import the test modules by name
    if here not in sys.path:
        sys.path.insert(0, here)
    # A run can fail for reasons outside the code under test: the free port taken between
    # choosing and binding it, or gloo aborting a process while the machine is loaded (seen
    # here about once in 15 runs, with no message from the worker). Each failure is reported;
    # the third one fails the test.
    for attempt in range(1, ATTEMPTS + 1):
        try:
            mp.spawn(worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=True)
            return
        except Exception as exc:
            if attempt == ATTEMPTS:
                raise
            warnings.warn(f"distributed run {attempt} failed, retrying on another port: {exc}", stacklevel=2)
