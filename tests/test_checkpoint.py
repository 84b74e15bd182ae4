"""Checkpoints of the torch optimizers: round trips, fresh processes, foreign formats."""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cupylars import functional as F  # noqa: E402
from cupylars.optim import LARS, LARS8bit, LARS32bit  # noqa: E402
from cupylars.quantization import dynamic_map, num_blocks, quantize_blockwise  # noqa: E402
from cupylars.state import LarsState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HYPER = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, percentile_clipping=30)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 10))


def train(model, opt, steps, start=0):
    for k in range(start, start + steps):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(32, 64, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", [LARS32bit, LARS8bit])
def test_round_trip_is_bit_exact(cls):
    model = make_model()
    opt = cls(model.parameters(), min_8bit_size=1000, **HYPER)
    train(model, opt, 3)
    saved = roundtrip(opt.state_dict())
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(saved["state"][0][key], value) and saved["state"][0][key].dtype == value.dtype

    twin = copy.deepcopy(model)
    twin_opt = cls(twin.parameters(), lr=1.0)  # hyperparameters come from the checkpoint
    twin_opt.load_state_dict(saved)
    assert twin_opt.param_groups[0]["lr"] == HYPER["lr"]
    train(model, opt, 3, start=3)
    train(twin, twin_opt, 3, start=3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(twin_opt.state[q][key], value)
            assert twin_opt.state[q][key].data_ptr() != value.data_ptr()  # loaded as copies


def test_fresh_process_continues_bit_for_bit(tmp_path):
    n = 4
    model = make_model()
    opt = LARS8bit(model.parameters(), min_8bit_size=1000, **HYPER)
    train(model, opt, n)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, opt, n, start=n)  # 2N steps in this process

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import make_model, train, HYPER
        from cupylars.optim import LARS8bit
        ckpt = torch.load({str(tmp_path / "ckpt.pt")!r}, weights_only=True)
        model = make_model(seed=123)
        model.load_state_dict(ckpt["model"])
        opt = LARS8bit(model.parameters(), lr=0.0, momentum=0.5)
        opt.load_state_dict(ckpt["opt"])
        train(model, opt, {n}, start={n})
        torch.save(model.state_dict(), {str(tmp_path / "resumed.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed[key], value), key


def test_half_precision_parameters_keep_float32_and_uint8_state():
    # torch's default load casts floating state to the parameter dtype; ours must not.
    model = make_model().to(torch.bfloat16)
    opt = LARS8bit(model.parameters(), min_8bit_size=1000, **HYPER)
    train_bf16 = [torch.randn(80, 64).to(torch.bfloat16), torch.randn(80).to(torch.bfloat16)]
    model[0].weight.grad, model[0].bias.grad = train_bf16
    opt.step()
    twin = copy.deepcopy(model)
    twin_opt = LARS8bit(twin.parameters(), lr=0.1)
    twin_opt.load_state_dict(roundtrip(opt.state_dict()))
    assert twin_opt.state[twin[0].weight]["state1"].dtype == torch.uint8
    assert twin_opt.state[twin[0].bias]["state1"].dtype == torch.float32
    assert twin_opt.state[twin[0].weight]["absmax1"].dtype == torch.float32


# -- foreign checkpoints -----------------------------------------------------------------


def bnb_state_dict(param, *, eight_bit, step, blocks=256, with_history=False, non_blockwise=False):
    """A state dict in bitsandbytes' layout (see cupylars.optim.checkpoint), built from a known momentum."""
    gen = torch.Generator().manual_seed(7)
    momentum = torch.randn(param.shape, generator=gen) * 0.01
    state = {"step": step, "unorm_vec": torch.zeros(1)}
    if eight_bit:
        book = torch.from_numpy(dynamic_map())
        flat = momentum.reshape(-1).numpy()
        if non_blockwise:
            scale = np.abs(flat).max(keepdims=True)
            codes = np.abs(book.numpy()[None, :] - (flat / scale)[:, None]).argmin(1).astype(np.uint8)
            state["max1"], state["new_max1"] = torch.from_numpy(scale.astype(np.float32)), torch.zeros(1)
        elif blocks == 256:
            codes, absmax = quantize_blockwise(flat)
            state["absmax1"] = torch.from_numpy(absmax)
        else:
            nb = -(-flat.size // blocks)
            padded = np.zeros(nb * blocks, np.float32)
            padded[: flat.size] = flat
            absmax = np.abs(padded.reshape(nb, blocks)).max(1)
            scaled = padded / np.repeat(absmax, blocks)
            codes = np.abs(book.numpy()[None, :] - scaled[: flat.size, None]).argmin(1).astype(np.uint8)
            state["absmax1"] = torch.from_numpy(absmax.astype(np.float32))
        state["state1"] = torch.from_numpy(np.ascontiguousarray(codes)).reshape(param.shape)
        state["qmap1"] = book
    else:
        state["state1"] = momentum
    if with_history:
        hist = torch.zeros(100)
        hist[1 : step + 1] = torch.rand(step, generator=gen) + 0.5
        state["gnorm_vec"] = hist
    return {
        "state": {0: state},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.0), "eps": 0.0, "weight_decay": 1e-3, "params": [0]}],
    }


def continue_with_functional(param0, grad, saved_state, eight_bit, **hyper):
    """The next step computed by cupylars.functional from the equivalent LarsState."""
    arr = param0.detach().numpy().copy()
    state = F.init_state(arr, optim_bits=8 if eight_bit else 32, min_8bit_size=0)
    state.step_count[...] = saved_state["step"]
    if "gnorm_vec" in saved_state:
        hist = saved_state["gnorm_vec"].numpy().copy()
        hist[0] = hist[1]
        hist[saved_state["step"] + 1 :] = hist[1]
        state.history[...] = hist
    state.ensure_momentum(np)
    if eight_bit:
        state.codes[...] = saved_state["state1"].numpy()
        state.absmax[...] = saved_state["absmax1"].numpy()
    else:
        state.momentum[...] = saved_state["state1"].numpy()
    F.lars_update(arr, grad.numpy(), state, **hyper)
    return arr, state


@pytest.mark.parametrize("eight_bit", [False, True], ids=["LARS32bit", "LARS8bit"])
def test_bitsandbytes_state_dict_loads_and_continues(eight_bit):
    p = torch.nn.Parameter(torch.randn(40, 130))
    sd = bnb_state_dict(p, eight_bit=eight_bit, step=5, with_history=True)
    opt = (LARS8bit if eight_bit else LARS32bit)([p], lr=1.0, percentile_clipping=20, min_8bit_size=0)
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["dampening"], group["weight_decay"]) == (
        0.1,
        0.9,
        0.0,
        1e-3,
    )
    assert "betas" not in group and group["eps"] == 1e-8  # bitsandbytes' unused eps is not taken
    st = opt.state[p]
    assert int(st["step"]) == 5 and st["state1"].dtype == (torch.uint8 if eight_bit else torch.float32)
    assert torch.equal(st["state1"], sd["state"][0]["state1"])  # taken bit for bit

    param0 = p.detach().clone()
    p.grad = torch.randn(40, 130)
    opt.step()
    expected, state = continue_with_functional(
        param0,
        p.grad,
        sd["state"][0],
        eight_bit,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        percentile_clipping=20,
    )
    np.testing.assert_array_equal(p.detach().numpy(), expected)
    np.testing.assert_array_equal(opt.state[p]["gnorm_vec"].numpy(), state.history)


@pytest.mark.parametrize("layout", ["blocks of 2048", "one absmax"])
def test_older_bitsandbytes_8bit_layouts_are_requantized(layout):
    p = torch.nn.Parameter(torch.randn(5000))
    sd = bnb_state_dict(p, eight_bit=True, step=3, blocks=2048, non_blockwise=layout == "one absmax")
    saved = sd["state"][0]
    book = dynamic_map()
    if layout == "one absmax":
        decoded = book[saved["state1"].numpy()] * saved["max1"].numpy()[0]
    else:
        decoded = book[saved["state1"].numpy()] * np.repeat(saved["absmax1"].numpy(), 2048)[:5000]
    opt = LARS8bit([p], lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="re-quantized"):
        opt.load_state_dict(sd)
    st = opt.state[p]
    assert st["absmax1"].shape == (num_blocks(5000),)
    state = LarsState(
        shape=(5000,),
        param_format="float32",
        is_8bit=True,
        step_count=np.zeros((), np.int64),
        skip_count=np.zeros((), np.int64),
        history=np.full(100, -1.0, np.float32),
        codes=st["state1"].numpy(),
        absmax=st["absmax1"].numpy(),
    )
    state.step_count[...] = 1
    np.testing.assert_allclose(state.momentum_buffer(), decoded, rtol=0.05, atol=1e-3 * np.abs(decoded).max())


def test_torch_sgd_state_dict_loads():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, sgd, 2)
    opt = LARS32bit(model.parameters(), lr=1.0, max_unorm=0.0)
    opt.load_state_dict(sgd.state_dict())
    buf = sgd.state[model[0].weight]["momentum_buffer"]
    assert torch.equal(opt.state[model[0].weight]["state1"], buf)
    assert int(opt.state[model[0].weight]["step"]) == 1
    assert opt.param_groups[0]["lr"] == 0.05
    # with no clipping and no weight decay, LARS is SGD: the next steps agree
    twin = copy.deepcopy(model)
    twin_sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    twin_sgd.load_state_dict(sgd.state_dict())
    train(model, opt, 2, start=2)
    train(twin, twin_sgd, 2, start=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "corrupt,error,match",
    [
        (lambda s: s["state"][0].update(exp_avg=torch.zeros(80, 64)), ValueError, "exp_avg"),
        (lambda s: s["state"][1].update(state1=torch.zeros(3)), ValueError, "shape"),
        (lambda s: s["state"][0].update(state1=torch.zeros(80, 64, dtype=torch.int32)), TypeError, "int32"),
        (lambda s: s["state"][0].update(absmax1=torch.zeros(7)), ValueError, "absmax1"),
        (lambda s: s["state"][0].update(step=-1), ValueError, "step"),
        (lambda s: s["param_groups"].append(s["param_groups"][0]), ValueError, "groups"),
        (lambda s: s["param_groups"][0].update(momentum=1.5), ValueError, "momentum"),
    ],
)
def test_bad_state_dict_raises_and_changes_nothing(corrupt, error, match):
    model = make_model()
    opt = LARS8bit(model.parameters(), min_8bit_size=1000, **HYPER)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        assert all(torch.equal(after["state"][i][k], v) for k, v in st.items())


def test_load_state_dict_hooks_run():
    model = make_model()
    opt = LARS32bit(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 1)
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post"]


def test_state_tensors_replaced_behind_the_optimizers_back_are_used():
    # ZeroRedundancyOptimizer.load_state_dict writes the local optimizer's state directly
    # (and moves zero-dim tensors to the CPU); the next step must use what it finds.
    model, ref = make_model(), make_model()
    opt, ref_opt = LARS(model.parameters(), **HYPER), LARS(ref.parameters(), **HYPER)
    train(model, opt, 1)
    train(ref, ref_opt, 1)
    st = opt.state[model[0].weight]
    st["step"] = st["step"].clone()
    st["state1"] = st["state1"].clone()
    train(model, opt, 1, start=1)
    train(ref, ref_opt, 1, start=1)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_another_device():
    model = make_model()
    opt = LARS8bit(model.parameters(), min_8bit_size=1000, **HYPER)
    train(model, opt, 2)
    gpu = copy.deepcopy(model).cuda()
    gpu_opt = LARS8bit(gpu.parameters(), lr=0.1)
    gpu_opt.load_state_dict(opt.state_dict())
    assert all(t.device.type == "cuda" for st in gpu_opt.state.values() for t in st.values())
    back = copy.deepcopy(model)
    back_opt = LARS8bit(back.parameters(), lr=0.1)
    back_opt.load_state_dict(roundtrip(gpu_opt.state_dict()))
    assert all(t.device.type == "cpu" for st in back_opt.state.values() for t in st.values())


def test_no_warning_for_native_checkpoints():
    model = make_model()
    opt = LARS8bit(model.parameters(), min_8bit_size=1000, **HYPER)
    train(model, opt, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(opt.state_dict())
    assert math.isfinite(float(opt.state[model[0].weight]["absmax1"].sum()))


def test_foreign_state_written_directly_is_translated_at_the_step():
    p = torch.nn.Parameter(torch.randn(40, 130))
    sd = bnb_state_dict(p, eight_bit=True, step=5)
    opt = LARS8bit([p], lr=0.1, momentum=0.9, weight_decay=1e-3, min_8bit_size=0)
    opt.state[p] = dict(sd["state"][0])  # as ZeroRedundancyOptimizer.load_state_dict does
    param0 = p.detach().clone()
    p.grad = torch.randn(40, 130)
    opt.step()
    assert set(opt.state[p]) == {"step", "skipped", "state1", "absmax1"}
    expected, _ = continue_with_functional(
        param0, p.grad, sd["state"][0], True, lr=0.1, momentum=0.9, weight_decay=1e-3
    )
    np.testing.assert_array_equal(p.detach().numpy(), expected)
