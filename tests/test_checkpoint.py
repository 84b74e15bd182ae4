"""Checkpoints of the torch optimizers: round trips, fresh processes, foreign formats."""

from __future__ import annotations

import copy
import functools
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
from cupylars.optim import LARS, GlobalOptimManager, LARS8bit, LARS32bit, checkpoint  # noqa: E402
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
        # counters beyond 2**53 (cupylars.state.MAX_COUNT): 2**63 - 1 once failed inside torch
        (lambda s: s["state"][1].update(step=torch.tensor(2**63 - 1)), ValueError, r"1: state 'step' is 92"),
        (lambda s: s["state"][1].update(step=2**53 + 1), ValueError, r"'step' is 9007199254740993, outside"),
        (lambda s: s["state"][1].update(skipped=torch.tensor(2**62)), ValueError, r"'skipped' is 4611"),
        # a negative scale flips the momentum's sign; above float32's range it would be Inf
        (lambda s: s["state"][2]["absmax1"].__setitem__(1, -0.5), ValueError, "2: state 'absmax1' holds"),
        (
            lambda s: s["state"][2].update(absmax1=s["state"][2]["absmax1"].double().fill_(1e39)),
            ValueError,
            "2: state 'absmax1' holds .*beyond float32's range",
        ),
        (lambda s: s["param_groups"].append(s["param_groups"][0]), ValueError, "groups"),
        (lambda s: s["param_groups"][0].update(momentum=1.5), ValueError, "momentum"),
        # NaN/Inf would make every later step of the tensor NaN (the last tensors fail, so
        # the first ones would have loaded if the check came late)
        (lambda s: s["state"][3]["state1"].__setitem__(4, float("nan")), ValueError, "3: state 'state1'"),
        (lambda s: s["state"][2]["absmax1"].__setitem__(0, float("inf")), ValueError, "absmax1.*NaN or Inf"),
        (lambda s: s["state"][3]["gnorm_vec"].__setitem__(7, float("nan")), ValueError, "gnorm_vec"),
        (lambda s: s["state"][3].update({checkpoint.BNB_WRAPPED_KEY: 1}), TypeError, "must be a dict"),
        (
            lambda s: s["state"][3].update({checkpoint.BNB_WRAPPED_KEY: {"state1": torch.zeros(10)}}),
            ValueError,
            "both inside and outside",
        ),
        (lambda s: s["state"][3].update(state1=torch.zeros(40, dtype=torch.uint8)), ValueError, "absmax1 or"),
    ],
)
def test_bad_state_dict_raises_and_changes_nothing(corrupt, error, match):
    model = make_model()
    model[2] = torch.nn.Linear(80, 40)  # 3200 elements: 8-bit too, the third state
    opt = LARS8bit(model.parameters(), min_8bit_size=1000, **HYPER)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    train(model, opt, 1, start=2)  # the optimizer moves on: a partial load would show
    before = copy.deepcopy(opt.state_dict())
    tensors = {i: dict(st) for i, st in opt.state_dict()["state"].items()}
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        assert after["state"][i].keys() == st.keys()
        assert all(torch.equal(after["state"][i][k], v) for k, v in st.items())
        assert all(after["state"][i][k] is v for k, v in tensors[i].items())  # the same tensors


def test_float32_momentum_loaded_into_8bit_tensors_is_quantized(bnb):
    # bitsandbytes' groups do not save optim_bits: the loading optimizer's 8 bits apply.
    model = make_model()
    model[2] = torch.nn.Linear(80, 40)
    src = bnb.optim.LARS32bit(model.parameters(), lr=0.1, momentum=0.9)
    train(model, src, 2)
    saved = roundtrip(src.state_dict())
    for st in saved["state"].values():
        st.update(st.pop(checkpoint.BNB_WRAPPED_KEY))
    mng = GlobalOptimManager.get_instance()
    mng.override_config(model[2].weight, "optim_bits", 32)  # this one is configured 32-bit
    try:
        opt = LARS8bit(model.parameters(), lr=1.0, min_8bit_size=1000)
        with pytest.warns(UserWarning, match="quantized") as record:
            opt.load_state_dict(saved)
    finally:
        mng.initialize()
    assert len(record) == 1 and "parameter 0" in str(record[0].message)  # only the 8-bit tensor
    w = opt.state[model[0].weight]
    assert w["state1"].dtype == torch.uint8 and w["absmax1"].shape == (num_blocks(80 * 64),)
    m = saved["state"][0]["state1"]
    # each block's largest |m| is exactly representable (code 0 or 255 times absmax)
    torch.testing.assert_close(w["absmax1"], m.abs().reshape(-1, 256).amax(1), rtol=0, atol=0)
    decoded = torch.from_numpy(dynamic_map())[w["state1"].long()].reshape(-1, 256) * w["absmax1"][:, None]
    # the dynamic map's largest gap between neighbouring codes, relative to absmax, is below 1/64
    err = (decoded.reshape(m.shape) - m).abs().reshape(-1, 256).amax(1) / w["absmax1"]
    assert float(err.max()) < 1 / 128
    for i in (1, 2, 3):  # small tensors and the override keep float32, bit for bit
        p = opt.param_groups[0]["params"][i]
        assert torch.equal(opt.state[p]["state1"], saved["state"][i]["state1"])


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


# -- the real bitsandbytes ----------------------------------------------------------------
#
# These tests build, train and save optimizers with bitsandbytes itself (CPU) and check
# what cupylars reads from them, and the statements docs/torch.md and docs/algorithm.md
# make about it. On the CPU, bitsandbytes 0.50.2's LARS update is: d = g + lam p;
# m = d at step 1, else mu m + d; p -= lr s m, with s the max_unorm cap computed from
# float32 norms for 32-bit state and s = 1 for 8-bit state. cupylars computes the same
# step when dampening = 0, nesterov = False, trust_coefficient = 0, percentile_clipping =
# 100, no tensor has norm 0, and max_unorm = 0 for 8-bit state.


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def bnb_trained(bnb, cls_name, steps, model=None, **hyper):
    model = make_model() if model is None else model
    opt = getattr(bnb.optim, cls_name)(model.parameters(), **hyper)
    train(model, opt, steps)
    return model, opt


def saved_and_loaded(opt, tmp_path):
    path = tmp_path / "bnb.pt"
    torch.save(opt.state_dict(), path)
    return torch.load(path, weights_only=True)


def assert_float32_close(actual, expected, steps):
    # Per step the two differ by the rounding of float32 sums and norms (bitsandbytes
    # takes norms in float32, cupylars in float64): a few ulps of each parameter.
    for p, q in zip(actual, expected):
        torch.testing.assert_close(p, q, rtol=4e-6 * steps, atol=1e-7 * steps)


BNB_32 = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)  # max_unorm: both default to 0.02
BNB_8 = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, min_8bit_size=1000, max_unorm=0.0)


@pytest.mark.parametrize("cls_name,ours", [("LARS", LARS), ("LARS32bit", LARS32bit)])
def test_real_bitsandbytes_32bit_checkpoint_continues_as_bitsandbytes(bnb, tmp_path, cls_name, ours):
    n = 3
    model, opt = bnb_trained(bnb, cls_name, n, **BNB_32)
    saved = saved_and_loaded(opt, tmp_path)
    assert checkpoint.BNB_WRAPPED_KEY in saved["state"][0]  # the format 0.50.2 writes
    twin = copy.deepcopy(model)
    twin_opt = ours(twin.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bitsandbytes' 32-bit state is ours: nothing to warn about
        twin_opt.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(twin_opt.state[q]["state1"], opt.state[p]["state1"])
        assert int(twin_opt.state[q]["step"]) == n
    train(model, opt, n, start=n)  # bitsandbytes continues itself
    train(twin, twin_opt, n, start=n)
    assert_float32_close(list(twin.parameters()), list(model.parameters()), n)


def test_real_bitsandbytes_8bit_checkpoint_continues(bnb, tmp_path):
    n = 3
    model, opt = bnb_trained(bnb, "LARS8bit", n, **BNB_8)
    saved = saved_and_loaded(opt, tmp_path)
    weight = model[0].weight
    assert opt.state[weight]["state1"].dtype == torch.uint8  # 5120 >= min_8bit_size
    twin = copy.deepcopy(model)
    twin_opt = LARS8bit(twin.parameters(), lr=1.0, max_unorm=0.0, min_8bit_size=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same code book and blocks: taken bit for bit
        twin_opt.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in ("state1", "absmax1"):
            if key in opt.state[p]:
                assert torch.equal(twin_opt.state[q][key], opt.state[p][key]), key

    # The first step dequantizes the same codes and scales: equal to float32 rounding.
    before = [p.detach().clone() for p in twin.parameters()]
    train(model, opt, 1, start=n)
    train(twin, twin_opt, 1, start=n)
    assert_float32_close(list(twin.parameters()), list(model.parameters()), 1)

    # The new codes: recompute the float32 momentum m = mu * m_old + g + lam * p_old of the
    # 8-bit weight independently and check that cupylars stores the nearest code of
    # m / absmax. bitsandbytes' CPU quantizer does not always pick the nearest code
    # (about 0.15% of values, a few codes away), so its codes may differ there only.
    book = torch.from_numpy(dynamic_map())
    saved_w = saved["state"][0][checkpoint.BNB_WRAPPED_KEY]
    old = (book[saved_w["state1"].long()].reshape(-1, 256) * saved_w["absmax1"][:, None]).reshape(80, 64)
    m = 0.9 * old + (twin[0].weight.grad + 1e-3 * before[0])
    ours_st, their_st = twin_opt.state[twin[0].weight], opt.state[weight]
    torch.testing.assert_close(ours_st["absmax1"], m.abs().reshape(-1, 256).amax(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(their_st["absmax1"], ours_st["absmax1"], rtol=1e-6, atol=0)
    x = (m.reshape(-1, 256) / ours_st["absmax1"][:, None]).reshape(-1)
    ours_err = (x - book[ours_st["state1"].reshape(-1).long()]).abs()
    their_err = (x - book[their_st["state1"].reshape(-1).long()]).abs()
    assert torch.all(ours_err <= their_err + 1e-6)  # never further from m than bitsandbytes' code
    differ = ours_st["state1"] != their_st["state1"]
    assert float(differ.float().mean()) < 0.01

    # Training goes on from the loaded state.
    train(twin, twin_opt, n - 1, start=n + 1)
    assert all(torch.isfinite(p).all() for p in twin.parameters())
    assert int(twin_opt.state[twin[0].weight]["step"]) == 2 * n


def test_real_bitsandbytes_nested_and_flat_forms_load_the_same(bnb):
    model, opt = bnb_trained(bnb, "LARS8bit", 2, **BNB_8)
    nested = opt.state_dict()
    flat = copy.deepcopy(nested)
    for st in flat["state"].values():
        st.update(st.pop(checkpoint.BNB_WRAPPED_KEY))  # the flat layout of older releases
    a = LARS8bit(copy.deepcopy(model).parameters(), lr=1.0)
    b = LARS8bit(copy.deepcopy(model).parameters(), lr=1.0)
    a.load_state_dict(nested)
    b.load_state_dict(flat)
    assert nested["state"][0][checkpoint.BNB_WRAPPED_KEY]  # loading did not unwrap the caller's dict
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert a.state[p].keys() == b.state[q].keys()
        assert all(torch.equal(a.state[p][k], b.state[q][k]) for k in a.state[p])


# -- what the docs say about bitsandbytes, checked against it --------------------------------


def one_tensor_run(make_opt, steps=3, param=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(40, 130, generator=gen) if param is None else param.clone())
    opt = make_opt([p])
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("cls_name", ["LARS", "LARS8bit", "LARS32bit"])
def test_bitsandbytes_lars_rejects_momentum_0_and_percentile_clipping(bnb, cls_name):
    cls = getattr(bnb.optim, cls_name)
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(NotImplementedError):
        cls([p], lr=0.1)
    with pytest.raises(TypeError, match="percentile_clipping"):
        cls([p], lr=0.1, momentum=0.9, percentile_clipping=100)
    # A positional call written for 0.50.2 puts max_unorm where cupylars (and bitsandbytes'
    # documentation) has percentile_clipping: cupylars refuses the float instead of
    # clipping at a "0.05th percentile".
    positional = [0.1, 0.9, 0.0, 0.0, False] + ([32] if cls_name == "LARS" else []) + [None, 4096, 0.05]
    theirs = cls([p], *positional)
    assert theirs.args.max_unorm == 0.05
    ours = {"LARS": LARS, "LARS8bit": LARS8bit, "LARS32bit": LARS32bit}[cls_name]
    with pytest.raises((TypeError, ValueError), match="percentile_clipping"):
        ours([p], *positional)
    _, plain = one_tensor_run(lambda ps: ours(ps, lr=0.1))  # momentum 0 works here
    assert "state1" not in plain.state[plain.param_groups[0]["params"][0]]


def test_bitsandbytes_pytorch_lars_fails_without_momentum(bnb):
    with pytest.raises(UnboundLocalError):
        one_tensor_run(lambda ps: bnb.optim.PytorchLARS(ps, lr=0.1, momentum=0.0))


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_max_unorm_alone_is_bitsandbytes_pytorch_lars(bnb, nesterov, dampening):
    hyper = dict(lr=0.1, momentum=0.9, dampening=dampening, nesterov=nesterov, weight_decay=1e-3)
    theirs, _ = one_tensor_run(lambda ps: bnb.optim.PytorchLARS(ps, max_unorm=0.02, **hyper))
    ours, _ = one_tensor_run(lambda ps: LARS(ps, max_unorm=0.02, **hyper))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    # except for zero-norm tensors, which PytorchLARS freezes (s = 0) and cupylars trains
    zero = torch.zeros(40, 130)
    frozen, _ = one_tensor_run(lambda ps: bnb.optim.PytorchLARS(ps, max_unorm=0.02, **hyper), param=zero)
    trained, _ = one_tensor_run(lambda ps: LARS(ps, max_unorm=0.02, **hyper), param=zero)
    assert torch.equal(frozen, zero) and not torch.equal(trained, zero)


@pytest.mark.parametrize("cls_name,ours", [("LARS32bit", LARS32bit), ("LARS8bit", LARS8bit)])
def test_bitsandbytes_ignores_nesterov_and_dampening(bnb, cls_name, ours):
    cls = getattr(bnb.optim, cls_name)
    hyper = dict(lr=0.1, momentum=0.9, min_8bit_size=0)
    plain, _ = one_tensor_run(lambda ps: cls(ps, **hyper))
    for variant in (dict(nesterov=True), dict(dampening=0.5)):
        same, _ = one_tensor_run(functools.partial(cls, **hyper, **variant))
        assert torch.equal(same, plain), variant  # accepted, without effect
        ours_plain, _ = one_tensor_run(lambda ps: ours(ps, **hyper))
        ours_variant, _ = one_tensor_run(functools.partial(ours, **hyper, **variant))
        assert not torch.allclose(ours_variant, ours_plain), variant  # applied here


def test_bitsandbytes_8bit_threshold_is_min_8bit_size_alone(bnb):
    # 1200 elements: below 4096, above min_8bit_size; both keep 8-bit momentum.
    p = torch.nn.Parameter(torch.randn(1200))
    p.grad = torch.randn(1200)
    theirs = bnb.optim.LARS8bit([p], lr=0.0, momentum=0.9, min_8bit_size=1000)
    theirs.step()
    ours = LARS8bit([p], lr=0.0, momentum=0.9, min_8bit_size=1000)
    ours.step()
    assert theirs.state[p]["state1"].dtype == ours.state[p]["state1"].dtype == torch.uint8


def test_bitsandbytes_max_unorm_caps_32bit_state_only(bnb):
    # A large lr makes ||m|| > max_unorm ||p|| at every step, so the cap is active.
    hyper = dict(lr=1.0, momentum=0.9, min_8bit_size=0)
    for cls_name, capped in (("LARS32bit", True), ("LARS8bit", False)):
        cls = getattr(bnb.optim, cls_name)
        with_cap, _ = one_tensor_run(functools.partial(cls, max_unorm=0.02, **hyper))
        without, _ = one_tensor_run(functools.partial(cls, max_unorm=0.0, **hyper))
        assert torch.equal(with_cap, without) != capped, cls_name
    ours_cap, _ = one_tensor_run(lambda ps: LARS8bit(ps, max_unorm=0.02, **hyper))
    ours_free, _ = one_tensor_run(lambda ps: LARS8bit(ps, max_unorm=0.0, **hyper))
    assert not torch.equal(ours_cap, ours_free)


def test_bitsandbytes_freezes_zero_norm_tensors_with_max_unorm(bnb):
    zero = torch.zeros(40, 130)
    frozen, _ = one_tensor_run(lambda ps: bnb.optim.LARS32bit(ps, lr=0.1, momentum=0.9), param=zero)
    trained, _ = one_tensor_run(lambda ps: LARS32bit(ps, lr=0.1, momentum=0.9), param=zero)
    assert torch.equal(frozen, zero) and not torch.equal(trained, zero)


def test_bitsandbytes_applies_nonfinite_gradients(bnb):
    for cls_name in ("LARS32bit", "LARS8bit"):
        p = torch.nn.Parameter(torch.randn(1200))
        opt = getattr(bnb.optim, cls_name)([p], lr=0.1, momentum=0.9, min_8bit_size=0)
        p.grad = torch.randn(1200)
        p.grad[3] = float("nan")
        opt.step()
        assert torch.isnan(p).any(), cls_name
    q = torch.nn.Parameter(torch.randn(1200))
    before = q.detach().clone()
    ours = LARS8bit([q], lr=0.1, momentum=0.9, min_8bit_size=0)
    q.grad = p.grad
    ours.step()
    assert torch.equal(q.detach(), before) and int(ours.state[q]["skipped"]) == 1


def test_bitsandbytes_overrides_work_in_either_order(bnb):
    for register_first in (True, False):
        model = make_model()
        mng = bnb.optim.GlobalOptimManager.get_instance()
        mng.initialize()
        if register_first:
            mng.register_parameters(model.parameters())
        mng.override_config(model[0].weight, "optim_bits", 32)
        if not register_first:
            mng.register_parameters(model.parameters())
        opt = bnb.optim.LARS8bit(model.parameters(), lr=0.1, momentum=0.9, min_8bit_size=0)
        train(model, opt, 1)
        assert opt.state[model[0].weight]["state1"].dtype == torch.float32, register_first
        assert opt.state[model[2].weight]["state1"].dtype == torch.uint8
        mng.initialize()


def test_checkpoint_of_another_optim_bits_warns_and_keeps_its_state():
    # Saved hyperparameters replace the current ones (as in torch), optim_bits included:
    # a LARS32bit checkpoint makes a LARS8bit keep 32-bit momentum, which is said.
    model = make_model()
    src = LARS32bit(model.parameters(), **HYPER)
    train(model, src, 2)
    opt = LARS8bit(model.parameters(), lr=1.0, min_8bit_size=1000)
    with pytest.warns(UserWarning, match="optim_bits=32"):
        opt.load_state_dict(src.state_dict())
    assert torch.equal(opt.state[model[0].weight]["state1"], src.state[model[0].weight]["state1"])
    assert opt.param_groups[0]["optim_bits"] == 32


def test_float32_momentum_written_directly_into_8bit_state_is_quantized_at_the_step():
    # as ZeroRedundancyOptimizer.load_state_dict writes a bitsandbytes LARS32bit state
    p = torch.nn.Parameter(torch.randn(40, 130))
    sd = bnb_state_dict(p, eight_bit=False, step=5)
    opt = LARS8bit([p], lr=0.1, momentum=0.9, min_8bit_size=0)
    opt.state[p] = dict(sd["state"][0])
    p.grad = torch.randn(40, 130)
    with pytest.warns(UserWarning, match="quantized"):
        opt.step()
    st = opt.state[p]
    assert st["state1"].dtype == torch.uint8 and int(st["step"]) == 6
    assert st["absmax1"].shape == (num_blocks(40 * 130),)
