"""The torch.optim adapter: cupylars.optim.LARS / LARS8bit / LARS32bit.

Each optimizer is checked against two independent computations: the
functional API run on NumPy copies (must agree bit for bit, since the adapter
only hands it zero-copy views), and a float64 torch implementation of the
algorithm written below from docs/algorithm.md (agrees to float32 rounding).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cupylars import functional as F  # noqa: E402
from cupylars.optim import (  # noqa: E402
    LARS,
    GlobalOptimManager,
    LARS8bit,
    LARS32bit,
    bridge,
    exclude_bias_and_norm,
    step_plan,
)

SHAPES = [(40, 128), (300,), (7, 3, 3), (4100,)]  # 5120 and 4100 elements reach min_8bit_size
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _fresh_manager():
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in shapes]


def make_grads(params, step, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=gen) * scale * (1 + step % 3)).to(p.dtype) for p in params]


def as_numpy(t):
    t = t.detach()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy().copy()


def fmt_of(t):
    return bridge.storage_format(t)


HYPER = {
    "plain": dict(momentum=0.0, max_unorm=0.0),
    "momentum": dict(momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, max_unorm=0.02),
    "trust": dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02, trust_clip=True, max_unorm=0.0),
    "percentile": dict(momentum=0.5, percentile_clipping=5, max_unorm=0.05),
}


def run_functional(params0, grads_per_step, *, lr, optim_bits, min_8bit_size=4096, lrs=None, **hyper):
    """The same training on NumPy copies through cupylars.functional."""
    arrays = [as_numpy(p) for p in params0]
    fmts = [fmt_of(p) for p in params0]
    states = [
        F.init_state(a, optim_bits=optim_bits, min_8bit_size=min_8bit_size, dtype=bridge.dtype_argument(f))
        for a, f in zip(arrays, fmts)
    ]
    for step, grads in enumerate(grads_per_step):
        for a, g, s, f in zip(arrays, grads, states, fmts):
            F.lars_update(
                a, as_numpy(g), s, lr=lrs[step] if lrs else lr, dtype=bridge.dtype_argument(f), **hyper
            )
    return arrays, states


def run_torch(cls, params, grads_per_step, **kwargs):
    opt = cls(params, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


def assert_state_matches(opt, params, states):
    for p, s in zip(params, states):
        st = opt.state[p]
        assert int(st["step"]) == s.step
        assert int(st["skipped"]) == s.skipped
        if s.is_8bit and s.codes is not None:
            np.testing.assert_array_equal(st["state1"].numpy(), s.codes)
            np.testing.assert_array_equal(st["absmax1"].numpy(), s.absmax)
        elif s.momentum is not None:
            np.testing.assert_array_equal(st["state1"].numpy(), s.momentum)
        else:
            assert "state1" not in st


@pytest.mark.parametrize("hyper", list(HYPER), ids=list(HYPER))
@pytest.mark.parametrize("cls,bits", [(LARS32bit, 32), (LARS8bit, 8)], ids=["32bit", "8bit"])
def test_matches_functional_bit_for_bit(cls, bits, hyper):
    params = make_params()
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k) for k in range(4)]
    opt = run_torch(cls, params, grads, lr=0.3, **HYPER[hyper])
    arrays, states = run_functional(params0, grads, lr=0.3, optim_bits=bits, **HYPER[hyper])
    for p, a in zip(params, arrays):
        np.testing.assert_array_equal(as_numpy(p), a)
    assert_state_matches(opt, params, states)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_half_precision_cpu_tensors(dtype, optim_bits):
    params = make_params(TORCH_DTYPES[dtype])
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k, scale=0.1) for k in range(3)]
    hyper = dict(momentum=0.9, weight_decay=1e-3, max_unorm=0.02)
    opt = run_torch(LARS, params, grads, lr=0.5, optim_bits=optim_bits, **hyper)
    arrays, states = run_functional(params0, grads, lr=0.5, optim_bits=optim_bits, **hyper)
    for p, a in zip(params, arrays):
        assert p.dtype == TORCH_DTYPES[dtype]
        np.testing.assert_array_equal(as_numpy(p), a)
    assert_state_matches(opt, params, states)
    assert all(
        opt.state[p]["state1"].dtype == (torch.uint8 if s.is_8bit else torch.float32)
        for p, s in zip(params, states)
    )


def test_mixed_storage_formats_in_one_optimizer():
    params = [
        *make_params(torch.float32, shapes=[(40, 128)]),
        *make_params(torch.float16, seed=1, shapes=[(300,)]),
        *make_params(torch.bfloat16, seed=2, shapes=[(4100,)]),
    ]
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k, scale=0.1) for k in range(3)]
    hyper = dict(momentum=0.9, weight_decay=1e-3)
    run_torch(LARS8bit, params, grads, lr=0.5, **hyper)
    arrays, _ = run_functional(params0, grads, lr=0.5, optim_bits=8, **hyper)
    for p, a in zip(params, arrays):
        np.testing.assert_array_equal(as_numpy(p), a)


# -- an independent float64 implementation of docs/algorithm.md -----------------------


def float64_lars(
    params0,
    grads_per_step,
    *,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    max_unorm=0.02,
    percentile_clipping=100,
    trust_coefficient=0.0,
    trust_clip=False,
    eps=1e-8,
):
    ps = [p.detach().double().clone() for p in params0]
    ms = [None] * len(ps)
    hist = [torch.full((100,), -1.0, dtype=torch.float64) for _ in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(ps, grads)):
            g = g.double()
            g_norm, p_norm = g.norm().item(), p.norm().item()
            gamma = 1.0
            if percentile_clipping < 100:
                if hist[i][0] < 0:
                    hist[i][:] = g_norm**2
                else:
                    hist[i][t % 100] = g_norm**2
                current = math.sqrt(hist[i][t % 100].item())
                clip = math.sqrt(torch.sort(hist[i]).values[percentile_clipping].item())
                gamma = clip / current if current > clip else 1.0
            d = gamma * g + weight_decay * p
            if trust_coefficient > 0:
                r = 1.0
                if p_norm > 0 and g_norm > 0:
                    r = trust_coefficient * p_norm / (gamma * g_norm + weight_decay * p_norm + eps)
                if trust_clip:
                    r = min(r / lr, 1.0)
                d = r * d
            if momentum > 0:
                ms[i] = d.clone() if t == 1 else momentum * ms[i] + (1 - dampening) * d
                u = d + momentum * ms[i] if nesterov else ms[i]
            else:
                u = d
            s = 1.0
            if max_unorm > 0:
                u_norm = u.norm().item()
                if p_norm > 0 and u_norm > max_unorm * p_norm:
                    s = max_unorm * p_norm / u_norm
            p -= lr * s * u
    return ps


@pytest.mark.parametrize("hyper", list(HYPER), ids=list(HYPER))
def test_lars32bit_matches_float64_torch_implementation(hyper):
    params = make_params()
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k) for k in range(5)]
    run_torch(LARS32bit, params, grads, lr=0.3, **HYPER[hyper])
    expected = float64_lars(params0, grads, lr=0.3, **HYPER[hyper])
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=2e-5, atol=2e-6)


def test_lars8bit_tracks_float64_implementation():
    params = make_params()
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k) for k in range(5)]
    run_torch(LARS8bit, params, grads, lr=0.3, momentum=0.9, weight_decay=1e-3)
    expected = float64_lars(params0, grads, lr=0.3, momentum=0.9, weight_decay=1e-3)
    for p, e in zip(params, expected):
        # 8-bit momentum: within a few quantization steps of the exact trajectory
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=5e-3 * e.abs().max().item())


# -- state layout and memory ---------------------------------------------------------


def test_8bit_state_layout_and_bytes():
    big, small = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(100))
    opt = LARS8bit([big, small], lr=0.1, momentum=0.9)
    big.grad, small.grad = torch.randn(5000), torch.randn(100)
    opt.step()
    st = opt.state[big]
    assert st["state1"].dtype == torch.uint8 and st["state1"].shape == big.shape
    assert st["absmax1"].dtype == torch.float32 and st["absmax1"].shape == (math.ceil(5000 / 256),)
    assert set(st) == {"step", "skipped", "state1", "absmax1"}
    nbytes = sum(t.numel() * t.element_size() for t in st.values())
    assert nbytes == 5000 + 4 * math.ceil(5000 / 256) + 16  # codes + absmax + two int64 counters
    assert opt.state[small]["state1"].dtype == torch.float32  # below min_8bit_size


def test_state_without_momentum_or_clipping_is_tiny_and_grows_on_demand():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = LARS8bit([p], lr=0.1)
    p.grad = torch.randn(5000)
    opt.step()
    assert set(opt.state[p]) == {"step", "skipped"}
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["percentile_clipping"] = 10
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    assert opt.state[p]["gnorm_vec"].shape == (100,)
    assert int(opt.state[p]["step"]) == 2


def test_state_tensors_are_the_storage():
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = LARS32bit([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(64, 80)
    opt.step()
    buf = opt.state[p]["state1"]
    ptr = buf.data_ptr()
    before = buf.clone()
    opt.step()
    assert opt.state[p]["state1"].data_ptr() == ptr  # updated in place, no reallocation
    assert not torch.equal(before, buf)


def test_cached_views_follow_replaced_storage():
    p = torch.nn.Parameter(torch.randn(300))
    opt = LARS32bit([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(300)
    opt.step()
    p.data = p.data.clone()  # new storage behind the same Parameter
    opt.state[p]["state1"] = opt.state[p]["state1"].clone()
    ref = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), ref)  # the new storage was updated, not the old one


# -- torch.optim behaviour -----------------------------------------------------------


def test_signatures_match_bitsandbytes():
    expected = [
        "params",
        "lr",
        "momentum",
        "dampening",
        "weight_decay",
        "nesterov",
        "optim_bits",
        "args",
        "min_8bit_size",
        "percentile_clipping",
        "max_unorm",
    ]
    sig = inspect.signature(LARS)
    positional = [n for n, p in sig.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == expected
    for cls in (LARS8bit, LARS32bit):
        params = inspect.signature(cls).parameters
        assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == [
            n for n in expected if n != "optim_bits"
        ]
    defaults = {n: p.default for n, p in sig.parameters.items()}
    assert defaults["min_8bit_size"] == 4096 and defaults["max_unorm"] == 0.02
    assert defaults["percentile_clipping"] == 100 and defaults["optim_bits"] == 32
    assert issubclass(LARS8bit, torch.optim.Optimizer)


def test_args_object_overrides_keywords():
    class Args:
        optim_bits = 8
        min_8bit_size = 10
        percentile_clipping = 50
        max_unorm = 0.0

    p = torch.nn.Parameter(torch.randn(300))
    opt = LARS([p], lr=0.1, momentum=0.9, args=Args())
    g = opt.param_groups[0]
    assert (g["optim_bits"], g["min_8bit_size"], g["percentile_clipping"], g["max_unorm"]) == (8, 10, 50, 0.0)
    p.grad = torch.randn(300)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8


def test_param_groups_override_hyperparameters_and_add_param_group():
    params = make_params()
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k) for k in range(3)]
    opt = LARS8bit(
        [{"params": params[:2]}, {"params": [params[2]], "lr": 0.05, "momentum": 0.5, "optim_bits": 32}],
        lr=0.3,
        momentum=0.9,
    )
    opt.add_param_group({"params": [params[3]], "weight_decay": 0.1, "max_unorm": 0.0})
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    settings = [
        dict(lr=0.3, momentum=0.9, optim_bits=8),
        dict(lr=0.3, momentum=0.9, optim_bits=8),
        dict(lr=0.05, momentum=0.5, optim_bits=32),
        dict(lr=0.3, momentum=0.9, optim_bits=8, weight_decay=0.1, max_unorm=0.0),
    ]
    for i, kw in enumerate(settings):
        arrays, _ = run_functional([params0[i]], [[g[i]] for g in grads], **kw)
        np.testing.assert_array_equal(as_numpy(params[i]), arrays[0])


def test_lr_scheduler_changes_lr_every_step():
    params = make_params(shapes=[(40, 128)])
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k) for k in range(4)]
    opt = LARS32bit(params, lr=0.4, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for gs in grads:
        lrs.append(opt.param_groups[0]["lr"])
        params[0].grad = gs[0].clone()
        opt.step()
        sched.step()
    assert lrs == [0.4, 0.2, 0.1, 0.05]
    arrays, _ = run_functional(params0, grads, lr=None, lrs=lrs, optim_bits=32, momentum=0.9)
    np.testing.assert_array_equal(as_numpy(params[0]), arrays[0])


def test_tensor_lr_is_accepted():
    p = torch.nn.Parameter(torch.randn(300))
    opt = LARS32bit([p], lr=torch.tensor(0.1), momentum=0.9)
    p.grad = torch.randn(300)
    opt.step()
    assert int(opt.state[p]["step"]) == 1


def test_closure_hooks_zero_grad_and_skipping_params_without_grad():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    frozen = model[0].bias
    opt = LARS32bit(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x = torch.randn(5, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        frozen.grad = None  # as if it took no part in the loss
        return loss

    before = frozen.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    assert torch.equal(frozen.detach(), before) and frozen not in opt.state
    assert int(opt.state[model[1].weight]["step"]) == 1
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_bumps_autograd_version():
    lin = torch.nn.Linear(4, 3)
    opt = LARS32bit(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(2, 4)).sum().backward()
    out = lin(torch.randn(2, 4, requires_grad=True)).pow(2).sum()  # saves the weight
    opt.step()  # modifies it through array views
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_foreach_false_matches_multi_tensor_path():
    grads = None
    results = []
    for foreach in (None, False):
        params = make_params()
        grads = grads or [make_grads(params, k) for k in range(3)]
        run_torch(LARS8bit, params, grads, lr=0.3, momentum=0.9, weight_decay=1e-3, foreach=foreach)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_contiguous_parameter():
    base = torch.randn(16, 8, 3, 3).to(memory_format=torch.channels_last)
    p = torch.nn.Parameter(base)
    assert not p.is_contiguous()
    p0 = p.detach().contiguous().clone()
    grads = [[torch.randn(16, 8, 3, 3)] for _ in range(3)]
    run_torch(LARS8bit, [p], grads, lr=0.2, momentum=0.9, min_8bit_size=16)
    arrays, _ = run_functional([p0], grads, lr=0.2, momentum=0.9, optim_bits=8, min_8bit_size=16)
    np.testing.assert_array_equal(p.detach().contiguous().numpy(), arrays[0])


def test_backend_report():
    p = torch.nn.Parameter(torch.randn(10))
    opt = LARS32bit([p], lr=0.1)
    p.grad = torch.randn(10)
    opt.step()
    assert opt.backends["cpu"].startswith("cpu: ")  # the native CPU backend
    assert "zero copy" in opt.backends["cpu"]


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=0.1, momentum=1.0), ValueError, "momentum"),
        (dict(lr=0.1, nesterov=True), ValueError, "nesterov"),
        (dict(lr=0.1, optim_bits=16), ValueError, "optim_bits"),
        (dict(lr=0.1, min_8bit_size=-1), ValueError, "min_8bit_size"),
        (dict(lr=0.1, percentile_clipping=0), ValueError, "percentile_clipping"),
        (dict(lr=0.1, nonfinite="ignore"), ValueError, "nonfinite"),
        (dict(lr="fast"), TypeError, "lr"),
        (dict(lr=0.1, foreach="yes"), TypeError, "foreach"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LARS([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_invalid_group_raises_and_is_not_added():
    opt = LARS([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError, match="param group 1: momentum"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "momentum": -0.5})
    assert len(opt.param_groups) == 1


def test_group_edited_to_invalid_value_raises_before_any_update():
    params = make_params()
    opt = LARS32bit([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    opt.param_groups[1]["lr"] = -3.0
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="param group 1: lr"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
def test_unsupported_parameter_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        LARS([torch.zeros(3, dtype=dtype)], lr=0.1)


def test_sparse_gradient_raises_cleanly():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 1)
    opt = LARS32bit(list(lin.parameters()) + list(emb.parameters()), lr=0.1, momentum=0.9)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), emb.weight)]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip((*lin.parameters(), emb.weight), before))


def test_gradient_dtype_mismatch():
    p = torch.nn.Parameter(torch.randn(3))
    opt = LARS([p], lr=0.1)
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # recent torch refuses a mismatched grad unless told to allow it
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"gradient is torch\.float64"):
        opt.step()


# -- non-finite gradients and GradScaler ------------------------------------------------


def test_nonfinite_policies():
    params = make_params(shapes=[(300,), (200,)])
    opt = LARS32bit(params, lr=0.1, momentum=0.9)
    grads = make_grads(params, 0)
    grads[0][3] = float("nan")
    for p, g in zip(params, grads):
        p.grad = g
    before = [p.detach().clone() for p in params]
    with pytest.warns(RuntimeWarning, match="steps skipped so far: 0: 1"):
        opt.step()  # "skip": the NaN tensor is skipped, counted and reported; the other one steps
    assert torch.equal(params[0].detach(), before[0]) and not torch.equal(params[1].detach(), before[1])
    assert int(opt.state[params[0]]["skipped"]) == 1 and int(opt.state[params[0]]["step"]) == 0
    assert int(opt.state[params[1]]["step"]) == 1

    opt.param_groups[0]["nonfinite"] = "raise"
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match="parameter 0"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))

    opt.param_groups[0]["nonfinite"] = "propagate"
    opt.step()
    assert torch.isnan(params[0].detach()).any()


def test_grad_scaler_unscales_and_skips_overflowing_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    reference_model = copy.deepcopy(model)
    opt = LARS32bit(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = LARS32bit(reference_model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(16, 8)

    # a step whose scaled gradients overflow is skipped and the scale backs off
    opt.zero_grad()
    scaler.scale(model(x).sum() * 1e36).backward()
    scaler.step(opt)
    scaler.update()
    assert len(opt.state) == 0 and scaler.get_scale() < 1024.0

    for _ in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        reference_model(x).pow(2).mean().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # power-of-two scales: exact up to rounding
    assert int(opt.state[model.weight]["step"]) == 3


# -- GlobalOptimManager and recipes -----------------------------------------------------


def test_global_optim_manager_overrides():
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Linear(64, 80))
    mng = GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())
    opt = LARS8bit(model.parameters(), lr=0.1, momentum=0.9)
    mng.override_config(model[0].weight, "optim_bits", 32)
    mng.override_config(model[1].weight, key_value_dict={"max_unorm": 0.0, "lr": 0.01})
    params0 = [p.detach().clone() for p in model.parameters()]
    grads = [make_grads(list(model.parameters()), k) for k in range(2)]
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8
    arrays, _ = run_functional(
        [params0[2]], [[g[2]] for g in grads], lr=0.01, momentum=0.9, optim_bits=8, max_unorm=0.0
    )
    np.testing.assert_array_equal(as_numpy(model[1].weight), arrays[0])


def test_global_optim_manager_position_follows_replaced_tensor():
    mng = GlobalOptimManager.get_instance()
    p = torch.randn(5000)
    mng.override_config(p, "optim_bits", 32)
    mng.register_parameters([p])
    replacement = torch.randn(5000, requires_grad=True)  # as `p = p.cuda()` would make
    del p
    opt = LARS8bit([replacement], lr=0.1, momentum=0.9)
    replacement.grad = torch.randn(5000)
    opt.step()
    assert opt.state[replacement]["state1"].dtype == torch.float32


def test_global_optim_manager_rejects_bad_overrides():
    mng = GlobalOptimManager.get_instance()
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="betas"):
        mng.override_config(p, "betas", (0.9, 0.99))
    with pytest.raises(ValueError, match="optim_bits"):
        mng.override_config(p, "optim_bits", 4)
    with pytest.raises(ValueError, match="momentum"):
        mng.override_config(p, key_value_dict={"momentum": 2.0})
    with pytest.raises(RuntimeError, match="get_instance"):
        GlobalOptimManager()


def test_exclude_bias_and_norm_groups_and_training():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3)
    )
    model[0].bias.requires_grad_(False)
    groups = exclude_bias_and_norm(model, 1e-3)
    assert [len(g["params"]) for g in groups] == [
        2,
        3,
    ]  # conv+linear weights | bn weight, bn bias, linear bias
    assert groups[0]["weight_decay"] == 1e-3
    assert groups[1] == {**groups[1], "weight_decay": 0.0, "max_unorm": 0.0, "trust_coefficient": 0.0}
    opt = LARS8bit(groups, lr=0.1, momentum=0.9, trust_coefficient=0.001)
    bias = model[3].bias
    b0 = bias.detach().clone()
    model(torch.randn(8, 1, 8, 8)).pow(2).mean().backward()
    g = bias.grad.clone()
    opt.step()
    arrays, _ = run_functional(
        [b0],
        [[g]],
        lr=0.1,
        momentum=0.9,
        optim_bits=8,
        weight_decay=0.0,
        max_unorm=0.0,
        trust_coefficient=0.0,
    )
    np.testing.assert_array_equal(as_numpy(bias), arrays[0])
    with pytest.raises(TypeError):
        exclude_bias_and_norm([torch.zeros(3)], 0.1)


# -- later steps: what the last full step found is reused ---------------------------------


def _count_full_steps(monkeypatch, opt):
    """Steps that built a new step plan (not reusing the last step's)."""
    full = []
    build = step_plan.build

    def counted(owner, groups, state, resources):
        if state is opt.state:
            full.append(1)
        return build(owner, groups, state, resources)

    monkeypatch.setattr(step_plan, "build", counted)
    return full


def _set_grads(params, step):
    for p, g in zip(params, make_grads(params, step, scale=0.1)):
        p.grad = g


@pytest.mark.parametrize("emulated", [False, True], ids=["reference", "emulated"])
def test_reused_steps_match_full_steps_through_every_change(emulated, monkeypatch):
    # The same training, with every step in full and with later steps reusing the last full
    # step's views, through the changes a reused step must notice: bit-identical results.
    if emulated and importlib.util.find_spec("cupylars._emulator") is None:
        pytest.skip("the CPU emulator of the kernels is absent")
    from contextlib import nullcontext

    from cupylars.testing import emulated_cuda

    def train(reuse):
        shapes = [(40, 128), (300,), (4100,), (16, 8, 3, 3), (64,)]
        params = make_params(shapes=shapes)
        params[3] = torch.nn.Parameter(params[3].detach().to(memory_format=torch.channels_last))
        groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "max_unorm": 0.0}]
        hyper = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, percentile_clipping=20, min_8bit_size=1000)
        opt = LARS8bit(groups, **hyper)
        if not reuse:
            # every step builds its plan anew
            opt.register_step_post_hook(lambda o, args, kwargs: setattr(o, "_plan", None))
        full = _count_full_steps(monkeypatch, opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
        for k in range(16):
            _set_grads(params, k)
            # each change follows a step that reused the last full one
            if k == 2:
                params[1].grad = None  # no gradient: skipped this step
            if k == 5:
                params[0].data = params[0].data.clone()  # new storage behind the same Parameter
            if k == 7:
                opt.state[params[2]]["state1"] = opt.state[params[2]]["state1"].clone()
            if k == 9:
                opt.state[params[4]]["state1"].data = opt.state[params[4]]["state1"].data.clone()
            if k == 11:
                opt.param_groups[1]["momentum"] = 0.5  # a value: read at every step
                opt.param_groups[0]["percentile_clipping"] = 100  # a switch
            if k == 13:
                opt.param_groups[1]["foreach"] = False
            with emulated_cuda() if emulated else nullcontext():
                opt.step()
            sched.step()
        return params, opt, len(full)

    (p1, opt1, full1), (p2, opt2, full2) = train(False), train(True)
    assert (full1, full2) == (16, 8)  # the first step, and one per change (two at k = 2, 3)
    for a, b in zip(p1, p2):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(p1, p2):
        s1, s2 = opt1.state[a], opt2.state[b]
        assert s1.keys() == s2.keys()
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not p2[3].is_contiguous()


def test_steady_state_steps_reuse_the_last_full_step(monkeypatch):
    params = make_params()
    opt = LARS32bit(params, lr=0.1, momentum=0.9)
    full = _count_full_steps(monkeypatch, opt)
    for k in range(4):
        _set_grads(params, k)  # new gradient tensors every step, as zero_grad() leaves
        opt.step()
        opt.param_groups[0]["lr"] *= 0.5
    assert len(full) == 1
    params[0].data = params[0].data.clone()
    _set_grads(params, 4)
    opt.step()
    opt.step()
    assert len(full) == 2
    GlobalOptimManager.get_instance().override_config(params[1], "lr", 0.0)
    before = params[1].detach().clone()
    opt.step()  # overrides are found by a full step
    assert len(full) == 3 and torch.equal(params[1].detach(), before)


def test_bad_input_after_reused_steps_raises_before_any_update(monkeypatch):
    params = make_params()
    opt = LARS32bit([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9, nonfinite="raise")
    for k in range(3):
        _set_grads(params, k)
        opt.step()

    def unchanged(action, error, match):
        before = [p.detach().clone() for p in params]
        steps = [int(opt.state[p]["step"]) for p in params]
        undo = action()
        with pytest.raises(error, match=match):
            opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
        assert [int(opt.state[p]["step"]) for p in params] == steps
        undo()

    group = opt.param_groups[1]

    def bad_lr():
        group["lr"] = -3.0
        return lambda: group.update(lr=0.1)

    unchanged(bad_lr, ValueError, "param group 1: lr")
    grad = params[3].grad

    def bad_value():
        params[3].grad = grad.clone()
        params[3].grad[5] = float("inf")
        return lambda: setattr(params[3], "grad", grad)

    unchanged(bad_value, FloatingPointError, "parameter 1 of param group 1")

    def bad_dtype():
        if hasattr(params[0], "grad_dtype"):
            params[0].grad_dtype = None
        params[0].grad = params[0].grad.double()
        return lambda: setattr(params[0], "grad", params[0].grad.float())

    unchanged(bad_dtype, TypeError, r"gradient is torch\.float64")
    opt.step()
    assert all(int(opt.state[p]["step"]) == 4 for p in params)


def test_reused_steps_bump_the_autograd_version():
    lin = torch.nn.Linear(4, 3)
    opt = LARS32bit(lin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        lin(torch.randn(2, 4)).sum().backward()
        opt.step()
    out = lin(torch.randn(2, 4, requires_grad=True)).pow(2).sum()
    opt.step()  # a reused step, writing the weight through the cached views
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


# -- backends --------------------------------------------------------------------------


def test_host_copy_backend_matches_views_and_warns_once(monkeypatch):
    params = make_params()
    params0 = [p.detach().clone() for p in params]
    grads = [make_grads(params, k) for k in range(3)]
    host = bridge._HostCopyBackend(torch.device("cpu"), "testing the host-copy path")
    monkeypatch.setattr(bridge, "backend_for_device", lambda device: host)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = run_torch(LARS8bit, params, grads, lr=0.3, momentum=0.9, percentile_clipping=20)
    assert [str(w.message) for w in caught] == ["cupylars.optim: testing the host-copy path"]
    report = opt.backends["cpu"]
    assert report.startswith("cpu: ") and "host copy: testing the host-copy path" in report
    arrays, states = run_functional(
        params0, grads, lr=0.3, optim_bits=8, momentum=0.9, percentile_clipping=20
    )
    for p, a in zip(params, arrays):
        np.testing.assert_array_equal(as_numpy(p), a)
    assert_state_matches(opt, params, states)


def test_cuda_without_cupy_falls_back_with_reason(monkeypatch):
    monkeypatch.setattr(bridge, "_cupy_import", (None, "CuPy is not importable (ImportError: testing)"))
    backend = bridge.backend_for_device(torch.device("cuda", 0))
    assert not backend.zero_copy and "CuPy is not importable" in backend.reason
    assert "slow" in backend.reason


def test_meta_parameters_are_rejected():
    with pytest.raises(RuntimeError, match="meta"):
        bridge.backend_for_device(torch.device("meta"))


@pytest.mark.skipif(
    importlib.util.find_spec("cupylars._emulator") is None, reason="the CPU emulator of the kernels is absent"
)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_kernels_through_the_adapter_emulated_on_cpu(dtype):
    # The kernels' code path of the adapter (contiguous staging, state views, one call per
    # device and format) with the CUDA kernels compiled for the CPU.
    from cupylars.testing import emulated_cuda

    shapes = [(40, 128), (300,), (4100,)]
    params = make_params(TORCH_DTYPES[dtype], shapes=shapes)
    conv = torch.nn.Parameter(
        torch.randn(16, 8, 3, 3).to(TORCH_DTYPES[dtype]).to(memory_format=torch.channels_last)
    )
    params.append(conv)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hyper = dict(lr=0.3, momentum=0.9, weight_decay=1e-3, percentile_clipping=20, trust_coefficient=0.01)
    grads = [make_grads(params, k, scale=0.1) for k in range(3)]
    run_torch(LARS8bit, params, grads, min_8bit_size=1000, **hyper)
    with emulated_cuda():
        opt = run_torch(LARS8bit, twins, grads, min_8bit_size=1000, **hyper)
    assert opt.backends["cpu"].startswith("emulated")
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    for p, q in zip(params, twins):
        torch.testing.assert_close(q.detach().float(), p.detach().float(), rtol=tol, atol=tol)
    assert not twins[-1].is_contiguous()  # the layout of the parameter is kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("cls", [LARS32bit, LARS8bit])
def test_cuda_tensors_match_cpu(cls, dtype):
    pytest.importorskip("cupy")
    cpu = make_params(TORCH_DTYPES[dtype])
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    mixed = [torch.nn.Parameter(p.detach().clone()) for p in cpu[:2]] + [
        torch.nn.Parameter(p.detach().cuda()) for p in cpu[2:]
    ]
    grads = [make_grads(cpu, k, scale=0.1) for k in range(3)]
    hyper = dict(lr=0.3, momentum=0.9, weight_decay=1e-3, percentile_clipping=20)
    run_torch(cls, cpu, grads, **hyper)
    opt = run_torch(cls, gpu, [[g.cuda() for g in gs] for gs in grads], **hyper)
    mixed_opt = run_torch(cls, mixed, [[g.to(p.device) for p, g in zip(mixed, gs)] for gs in grads], **hyper)
    assert opt.backends["cuda:0"].startswith("cuda")
    assert set(mixed_opt.backends) == {"cpu", "cuda:0"}
    for c, g, m in zip(cpu, gpu, mixed):
        torch.testing.assert_close(g.detach().cpu().float(), c.detach().float(), rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(m.detach().cpu().float(), c.detach().float(), rtol=1e-2, atol=1e-3)


# -- the fixed-bits classes' errors and the skip report ----------------------------------


@pytest.mark.parametrize("cls", [LARS8bit, LARS32bit])
def test_fixed_bits_classes_name_themselves_in_argument_errors(cls):
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\): missing a required argument: 'lr'$"):
        cls(params)
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\): got an unexpected keyword argument 'betas'$"):
        cls(params, lr=0.1, betas=(0.9, 0.0))
    other = "LARS32bit" if cls is LARS8bit else "LARS8bit"
    bits = 8 if cls is LARS8bit else 32
    for value in (8, 32):
        with pytest.raises(TypeError) as info:
            cls(params, lr=0.1, optim_bits=value)
        message = str(info.value)
        assert message.startswith(f"{cls.__name__} fixes the bit width of its momentum at {bits}")
        assert f"optim_bits={value}" in message and f"use {other}" in message and "LARS(" in message
    # optim_bits given positionally lands on args (as in bitsandbytes): refused, not ignored
    with pytest.raises(TypeError, match="args must be an object"):
        cls(params, 0.1, 0.9, 0, 0, False, 32)


@pytest.mark.parametrize("cls", [LARS, LARS8bit, LARS32bit])
def test_value_errors_name_the_class_called(cls):
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: momentum must be in \[0, 1\), got 2.0$"):
        cls(params, lr=0.1, momentum=2.0)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: min_8bit_size must be >= 0, got -1$"):
        cls(params, lr=0.1, min_8bit_size=-1)
    with pytest.raises(TypeError, match=rf"^{cls.__name__}: nesterov must be a bool, got 'yes'$"):
        cls(params, lr=0.1, momentum=0.9, nesterov="yes")


def test_fixed_bits_classes_bind_every_argument():
    params = [torch.nn.Parameter(torch.randn(3))]
    args = type("Args", (), {"percentile_clipping": 7})()
    opt = LARS8bit(params, 0.1, 0.9, 0.1, 1e-3, False, args, 10, 50, 0.5, eps=1e-6, foreach=False)
    group = opt.param_groups[0]
    assert [group[k] for k in ("lr", "momentum", "dampening", "weight_decay")] == [0.1, 0.9, 0.1, 1e-3]
    assert (group["min_8bit_size"], group["percentile_clipping"], group["max_unorm"]) == (10, 7, 0.5)
    assert (group["optim_bits"], group["eps"], group["foreach"]) == (8, 1e-6, False)
    assert LARS32bit(params, lr=0.2).param_groups[0]["optim_bits"] == 32


def _nan_at(params, steps_with_nan, steps):
    """Gradients for ``steps`` steps; params[0]'s holds a NaN at the steps listed."""
    out = []
    for k in range(steps):
        grads = make_grads(params, k)
        if k in steps_with_nan:
            grads[0][0] = float("nan")
        out.append(grads)
    return out


def _step_and_catch(opt, params, grads):
    """Which steps (0-based) warned, and their messages."""
    warned = []
    for k, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        warned += [(k, str(w.message)) for w in caught if issubclass(w.category, RuntimeWarning)]
    return warned


def test_a_skip_warns_once_at_the_next_look():
    params = make_params(shapes=[(300,), (200,)])
    opt = LARS32bit(params, lr=0.1, momentum=0.9)
    # The counters are read after steps 1, 2, 4, ..., 64 and then every skip_check_interval steps:
    # a NaN at step 5 (k = 4) is found after step 8, and the warning is not repeated.
    warned = _step_and_catch(opt, params, _nan_at(params, {4, 9}, 12))
    assert [k for k, _ in warned] == [7]
    message = warned[0][1]
    assert message.startswith("LARS32bit skipped the update of tensors whose gradient held NaN or Inf")
    assert "steps skipped so far: 0: 1." in message and "skipped_steps()" in message
    assert opt.skipped_steps() == {0: 2, 1: 0}
    assert int(opt.state[params[0]]["step"]) == 10 and int(opt.state[params[1]]["step"]) == 12


def test_skip_checks_follow_the_interval_and_never_warn_without_skips(monkeypatch):
    params = make_params(shapes=[(300,), (200,)])
    opt = LARS32bit(params, lr=0.1, momentum=0.9)
    opt.skip_check_interval = 3
    looks = []
    original = LARS32bit.skipped_steps

    def counting(self):
        looks.append(self._steps_run)
        return original(self)

    monkeypatch.setattr(LARS32bit, "skipped_steps", counting)
    assert _step_and_catch(opt, params, _nan_at(params, set(), 10)) == []
    assert looks == [1, 2, 3, 4, 6, 8, 9]  # powers of two up to 64, and multiples of 3


def test_skipped_steps_are_keyed_by_name_when_groups_carry_names():
    model = torch.nn.Linear(4, 3)
    opt = LARS8bit(model.named_parameters(), lr=0.1)
    model.weight.grad = torch.full((3, 4), float("inf"))
    model.bias.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="'weight': 1"):
        opt.step()
    assert opt.skipped_steps() == {"weight": 1, "bias": 0}


def test_loaded_skips_are_not_reported_again():
    params = make_params(shapes=[(300,), (200,)])
    opt = LARS32bit(params, lr=0.1)
    assert len(_step_and_catch(opt, params, _nan_at(params, {0}, 1))) == 1
    twin = LARS32bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1)
    twin.load_state_dict(opt.state_dict())
    twin_params = twin.param_groups[0]["params"]
    assert twin.skipped_steps() == {0: 1, 1: 0}
    assert _step_and_catch(twin, twin_params, _nan_at(params, set(), 2)) == []  # old skips: no warning
    warned = _step_and_catch(twin, twin_params, _nan_at(params, {0}, 2))  # a new one warns
    assert [k for k, _ in warned] == [1] and "0: 2" in warned[0][1]  # found after step 4


def test_warnings_name_the_line_that_called_step():
    """The skip warning points at the caller's line, whatever frames torch's decorators add
    (no_grad, the torch.compile graph break, optimizer hooks)."""
    p = torch.nn.Parameter(torch.randn(10))
    opt = LARS([p], lr=0.1, momentum=0.9)
    p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped the update") as record:
        opt.step()
    assert [w.filename for w in record if "skipped" in str(w.message)] == [__file__]


@pytest.mark.skipif(
    importlib.util.find_spec("cupylars._emulator") is None, reason="the CPU emulator of the kernels is absent"
)
def test_a_backend_block_after_reused_steps_takes_its_backend():
    # Steps that reuse the last step's plan still follow a `cupylars.backends.use` block.
    from cupylars.testing import emulated_cuda, reference

    params = make_params()
    opt = LARS32bit(params, lr=0.1, momentum=0.9)
    for k in range(3):
        _set_grads(params, k)
        with reference():
            opt.step()
    assert opt.backends["cpu"].startswith("reference")
    _set_grads(params, 3)
    with emulated_cuda():
        opt.step()
    assert opt.backends["cpu"].startswith("emulated-cuda")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_capturable_tensor_lr_on_host_backends(backend):
    """A capturable group's tensor lr on CPU tensors: host backends read it on the host at
    each step (a scheduler's in-place update included), as a float lr would be."""
    from cupylars.testing import native_cpu, reference

    block = native_cpu if backend == "cpu" else reference
    params, twins = make_params(), make_params()
    lr = torch.tensor(0.1)
    opt = LARS32bit(params, lr=lr, momentum=0.9, capturable=True)
    twin = LARS32bit(twins, lr=0.1, momentum=0.9)
    for k, value in enumerate([0.125, 0.0625, 0.25]):  # exact in the float32 lr tensor
        lr.fill_(value)
        for group in twin.param_groups:
            group["lr"] = value
        _set_grads(params, k)
        _set_grads(twins, k)
        with block():
            opt.step()
            twin.step()
    assert opt.backends["cpu"].startswith(backend)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
