"""Distributed training with the torch optimizers: DDP, ZeroRedundancyOptimizer, FSDP2 (DTensor).

Two processes on the gloo backend (CPU) train tiny models; the results must
equal a single-process run. Every rank feeds the same batch, so the averaged
gradient equals the single-process gradient exactly ((g + g) / 2 == g) and any
difference comes from the optimizer. One spawn runs every scenario, to keep
the cost of starting processes down.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_common import WORLD, make_model, snapshot, spawn, torch_threads, train  # noqa: E402

from cupylars.optim import LARS8bit, LARS32bit  # noqa: E402

STEPS = 3
# torch's CPU kernels split reductions (a matmul's gradient) by thread, so a gradient's last
# bits depend on the thread count: the workers and the single-process reference use the same.
THREADS = 1
# 8-bit for the 80x64 weight (5120 elements; a 40-row shard is 10 whole blocks of 256).
HYPER8 = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, min_8bit_size=1000)
# Every reduced norm in play: percentile clipping, trust ratio and update-norm clipping.
HYPER32 = dict(
    lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3, percentile_clipping=40, trust_coefficient=0.02
)


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback interface
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        results = {}
        ddp = DistributedDataParallel(make_model())
        train(ddp, LARS8bit(ddp.parameters(), **HYPER8), STEPS)
        results["ddp"] = snapshot(ddp)

        ddp = DistributedDataParallel(make_model())
        zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=LARS8bit, **HYPER8)
        train(ddp, zero, STEPS)
        results["zero"] = snapshot(ddp)
        results["zero_owned"] = sorted(
            name
            for name, p in ddp.module.named_parameters()
            if any(p is q for q in zero.optim.param_groups[0]["params"])
        )
        zero.consolidate_state_dict(to=0)
        if rank == 0:
            results["zero_state"] = zero.state_dict()

        mesh = init_device_mesh("cpu", (WORLD,))
        for name, cls, hyper in (("fsdp32", LARS32bit, HYPER32), ("fsdp8", LARS8bit, HYPER8)):
            model = make_model()
            fully_shard(model, mesh=mesh)
            opt = cls(model.parameters(), **hyper)
            train(model, opt, STEPS)
            results[name] = snapshot(model)
            results[name + "_kinds"] = {
                k: type(v).__name__ for k, v in opt.state[next(model.parameters())].items()
            }
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("distributed")
    spawn(_worker, outdir)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(cls, hyper):
    with torch_threads(THREADS):
        model = make_model()
        opt = cls(model.parameters(), **hyper)
        train(model, opt, STEPS)
    return snapshot(model), opt, model


def test_ddp_equals_single_process(ranks):
    expected, _, _ = single_process(LARS8bit, HYPER8)
    for result in ranks:
        for name, value in expected.items():
            assert torch.equal(result["ddp"][name], value), name


def test_zero_redundancy_optimizer_equals_single_process(ranks):
    expected, opt, model = single_process(LARS8bit, HYPER8)
    owned = [set(r["zero_owned"]) for r in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1]  # each rank owns whole tensors
    for result in ranks:
        for name, value in expected.items():
            assert torch.equal(result["zero"][name], value), name
    # the consolidated checkpoint holds the single-process state, and loads into a plain optimizer
    state = ranks[0]["zero_state"]
    fresh = LARS8bit(make_model().parameters(), lr=1.0)
    fresh.load_state_dict(state)
    for p, q in zip(model.parameters(), fresh.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[q][key], value), key


@pytest.mark.parametrize("name,cls,hyper", [("fsdp32", LARS32bit, HYPER32), ("fsdp8", LARS8bit, HYPER8)])
def test_fsdp2_sharded_step_equals_single_process(ranks, name, cls, hyper):
    expected, _, _ = single_process(cls, hyper)
    for result in ranks:
        for key, value in expected.items():
            # Norms are sums of per-shard partial sums: equal up to the order of the additions.
            torch.testing.assert_close(result[name][key], value, rtol=1e-5, atol=1e-6)
    kinds = ranks[0][name + "_kinds"]
    assert kinds["state1"] == "DTensor"  # momentum is sharded like its parameter
    if cls is LARS8bit:
        assert kinds["absmax1"] == "DTensor"
