"""Sharded checkpoints: FSDP2 with torch.distributed.checkpoint, on gloo with two CPU processes.

A first spawn trains N steps, saves the sharded state with ``dcp.save`` and a
full (unsharded) optimizer state dict; a second spawn, fresh processes, loads
the sharded checkpoint into freshly built models and trains N more steps, and
also trains 2N steps uninterrupted. The pytest process loads the full state
dict into single-process optimizers. Every process runs torch with one thread,
so the forward and backward passes are the same computation everywhere and the
remaining differences come from the order of the sharded norms' additions.
"""

from __future__ import annotations

import datetime
import os
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_common import WORLD, make_model, snapshot, spawn, torch_threads, train  # noqa: E402

from cupylars.optim import LARS8bit, LARS32bit  # noqa: E402

N = 3
HYPER32 = dict(
    lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3, percentile_clipping=40, trust_coefficient=0.02
)
# 8-bit 80x64 weight: 40-row shards of 10 whole blocks each, the unsharded blocking.
HYPER8 = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, min_8bit_size=1000)
# Also the 7x80 weight in 8 bits: shards of 320 and 240 elements, blocks that straddle them.
HYPER8_UNEVEN = dict(HYPER8, min_8bit_size=500)
SCENARIOS = {
    "dcp32": (LARS32bit, HYPER32),
    "dcp8": (LARS8bit, HYPER8),
    "dcp8_uneven": (LARS8bit, HYPER8_UNEVEN),
}


def _setup(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback interface
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))


def _sharded(seed: int, cls, hyper):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return model, cls(model.parameters(), **hyper)


def _save_worker(rank: int, port: int, outdir: str) -> None:
    """N steps, then the sharded checkpoint (dcp.save) and a full optimizer state dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    _setup(rank, port)
    try:
        results = {}
        for name, (cls, hyper) in SCENARIOS.items():
            model, opt = _sharded(0, cls, hyper)
            train(model, opt, N, 0)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=str(Path(outdir) / name))
            full = StateDictOptions(full_state_dict=True)
            results[name] = {
                "model": get_model_state_dict(model, options=full),
                "optim": get_optimizer_state_dict(model, opt, options=full),
                "absmax_shapes": {
                    n: tuple(opt.state[p]["absmax1"].shape)
                    for n, p in model.named_parameters()
                    if "absmax1" in opt.state[p]
                },
            }
        if rank == 0:
            torch.save(results, Path(outdir) / "saved.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def _load_worker(rank: int, port: int, outdir: str) -> None:
    """Fresh processes: load the sharded checkpoint and train N more; and 2N uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _setup(rank, port)
    try:
        results = {}
        for name, (cls, hyper) in SCENARIOS.items():
            model, opt = _sharded(0, cls, hyper)
            train(model, opt, 2 * N, 0)
            results[name + "_2n"] = snapshot(model)

            # Other initial weights and hyperparameters: everything must come from the checkpoint.
            model, opt = _sharded(1, cls, dict(hyper, lr=0.0))
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=str(Path(outdir) / name))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            train(model, opt, N, N)
            results[name + "_resumed"] = snapshot(model)
            results[name + "_steps"] = sorted({int(st["step"]) for st in opt.state.values()})

        # A corrupt sharded state: NaN in one rank's shard only. Every rank must refuse it
        # (a rank that went on would wait for the others in the next collective).
        model, opt = _sharded(0, LARS8bit, HYPER8)
        train(model, opt, 1, 0)
        osd = get_optimizer_state_dict(model, opt)
        weight_state = osd["state"]["0.weight"]
        if rank == 1:
            weight_state["absmax1"].to_local()[0] = float("nan")
        before = weight_state["state1"].to_local().clone()
        try:
            set_optimizer_state_dict(model, opt, osd)
            results["nan"] = None
        except ValueError as exc:
            results["nan"] = str(exc)
        results["nan_untouched"] = torch.equal(opt.state[model[0].weight]["state1"].to_local(), before)
        torch.save(results, Path(outdir) / f"loaded{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dcp")
    spawn(_save_worker, outdir)
    spawn(_load_worker, outdir)  # fresh processes
    saved = torch.load(outdir / "saved.pt", weights_only=False)
    loaded = [torch.load(outdir / f"loaded{r}.pt", weights_only=False) for r in range(WORLD)]
    return saved, loaded


@pytest.fixture
def one_thread():
    # The sharded runs used one thread; the single-process run must do the same arithmetic.
    with torch_threads(1):
        yield


def assert_close(actual, expected):
    # Sharded norms are sums of per-shard partial sums: equal up to the order of the additions
    # (the tolerance the FSDP2 step test of tests/test_distributed.py holds).
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_dcp_save_load_in_fresh_processes_equals_uninterrupted(runs, name):
    _, loaded = runs
    for rank in loaded:
        assert rank[name + "_steps"] == [2 * N]
        assert_close(rank[name + "_resumed"], rank[name + "_2n"])


def test_sharded_absmax_layouts(runs):
    saved, _ = runs
    # whole blocks per shard: the unsharded layout; otherwise (shards, blocks per shard)
    assert saved["dcp8"]["absmax_shapes"] == {"0.weight": (20,)}
    assert saved["dcp8_uneven"]["absmax_shapes"] == {"0.weight": (20,), "2.weight": (2, 2)}


@pytest.mark.parametrize("name", ["dcp32", "dcp8"])
def test_full_state_dict_loads_into_a_single_process(runs, one_thread, name):
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved, loaded = runs
    cls, hyper = SCENARIOS[name]
    model = make_model(seed=1)
    model.load_state_dict(saved[name]["model"])
    opt = cls(model.parameters(), **dict(hyper, lr=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing re-quantized: the gathered state is ours
        set_optimizer_state_dict(model, opt, saved[name]["optim"])
    if cls is LARS8bit:
        assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
    train(model, opt, N, N)
    assert_close(snapshot(model), loaded[0][name + "_2n"])


def test_full_state_dict_of_uneven_8bit_shards_is_refused(runs):
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved, _ = runs
    model = make_model(seed=1)
    opt = LARS8bit(model.parameters(), **HYPER8_UNEVEN)
    train(model, opt, 1, 0)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    with pytest.raises(ValueError, match=r"absmax1 has shape \(2, 2\).*sharded the same way"):
        set_optimizer_state_dict(model, opt, saved["dcp8_uneven"]["optim"])
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in before.items())


def test_sharded_state_with_nan_is_refused_on_every_rank(runs):
    _, loaded = runs
    for rank in loaded:
        assert rank["nan"] is not None and "absmax1" in rank["nan"] and "NaN or Inf" in rank["nan"]
        assert rank["nan_untouched"]
