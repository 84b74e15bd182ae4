"""The functional API's contract: bad input, non-finite gradients, state persistence, lists."""

import copy

import numpy as np
import pytest

from cupylars import functional as F


def _problem(n=300, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)


def _snapshot(param, state):
    return param.copy(), copy.deepcopy(state.to_dict())


def _assert_untouched(param, state, snap):
    p, d = snap
    np.testing.assert_array_equal(param, p)
    now = state.to_dict()
    assert now.keys() == d.keys()
    for k in d:
        np.testing.assert_array_equal(now[k], d[k])


def _warm_state(param, grad, bits=8):
    state = F.init_state(param, optim_bits=bits, min_8bit_size=0)
    F.lars_update(param, grad, state, lr=0.1, momentum=0.9, percentile_clipping=50)
    return state


BAD_HYPERPARAMETERS = [
    ({"lr": -0.1}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"lr": "0.1"}, TypeError, "lr"),
    ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
    ({"max_unorm": -0.02}, ValueError, "max_unorm"),
    ({"eps": -1e-8}, ValueError, "eps"),
    ({"trust_coefficient": -0.001}, ValueError, "trust_coefficient"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": -0.1}, ValueError, "momentum"),
    ({"dampening": 1.0}, ValueError, "dampening"),
    ({"dampening": -0.5}, ValueError, "dampening"),
    ({"nesterov": True, "momentum": 0.0}, ValueError, "nesterov"),
    ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "nesterov"),
    ({"percentile_clipping": 0}, ValueError, "percentile_clipping"),
    ({"percentile_clipping": 101}, ValueError, "percentile_clipping"),
    ({"percentile_clipping": 50.0}, TypeError, "percentile_clipping"),
    ({"percentile_clipping": True}, TypeError, "percentile_clipping"),
    ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
    ({"trust_clip": "yes"}, TypeError, "trust_clip"),
]


@pytest.mark.parametrize("overrides, error, name", BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise_and_touch_nothing(overrides, error, name):
    p, g = _problem()
    state = _warm_state(p, g)
    snap = _snapshot(p, state)
    kwargs = {"lr": 0.1, "momentum": 0.9, **overrides}
    with pytest.raises(error, match=name):
        F.lars_update(p, g, state, **kwargs)
    _assert_untouched(p, state, snap)


@pytest.mark.parametrize("bits", [0, 4, 16, 64, "8"])
def test_bad_optim_bits(bits):
    with pytest.raises((ValueError, TypeError), match="optim_bits"):
        F.init_state(np.ones(10, np.float32), optim_bits=bits)


def test_bad_min_8bit_size():
    with pytest.raises(ValueError, match="min_8bit_size"):
        F.init_state(np.ones(10, np.float32), optim_bits=8, min_8bit_size=-1)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.complex64, np.bool_, np.float64])
def test_unsupported_dtypes(dtype):
    p = np.ones(10, dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):
        F.init_state(p)
    state = F.init_state(np.ones(10, np.float32))
    with pytest.raises(TypeError, match="dtype"):
        F.lars_update(p, p, state, lr=0.1)


def test_uint16_needs_an_explicit_bfloat16():
    bits = np.zeros(10, np.uint16)
    with pytest.raises(TypeError, match="bfloat16"):
        F.init_state(bits)
    with pytest.raises(TypeError, match="uint16"):
        F.init_state(np.ones(10, np.float32), dtype="bfloat16")


MISMATCHES = {
    "grad shape": lambda p, g, s: (p, g[:-1], s),
    "grad dtype": lambda p, g, s: (p, g.astype(np.float16), s),
    "state shape": lambda p, g, s: (p.reshape(10, 30), g.reshape(10, 30), s),
    "state format": lambda p, g, s: (p.astype(np.float16), g.astype(np.float16), s),
    "grad module": lambda p, g, s: (p, list(g), s),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatches_raise_and_touch_nothing(case):
    p, g = _problem()
    state = _warm_state(p, g)
    snap = _snapshot(p, state)
    param, grad, st = MISMATCHES[case](p, g, state)
    with pytest.raises((ValueError, TypeError)):
        F.lars_update(param, grad, st, lr=0.1, momentum=0.9)
    _assert_untouched(p, state, snap)


def test_a_bad_tensor_late_in_a_list_leaves_the_earlier_ones_untouched():
    params = [_problem(50, s)[0] for s in range(3)]
    grads = [_problem(50, s + 10)[0] for s in range(3)]
    states = [F.init_state(p) for p in params]
    grads[2] = grads[2][:10]
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"grads\[2\]"):
        F.lars_update_many(params, grads, states, lr=0.1)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)
    assert all(s.step == 0 for s in states)


def test_list_lengths_must_agree():
    p, g = _problem()
    with pytest.raises(ValueError, match="length"):
        F.lars_update_many([p], [g, g], [F.init_state(p)], lr=0.1)


def test_same_param_twice_is_rejected():
    p, g = _problem()
    s = F.init_state(p)
    with pytest.raises(ValueError, match="twice"):
        F.lars_update_many([p, p], [g, g], [s, F.init_state(p)], lr=0.1)


def test_later_calls_check_what_changed_since_the_last():
    # Validation is remembered between calls over the same states; whatever changed since
    # (an assigned state attribute, a parameter reshaped in place, a new gradient) is checked.
    p, g = _problem()
    state = _warm_state(p, g)
    F.lars_update(p, g, state, lr=0.1, momentum=0.9, percentile_clipping=50)
    snap = _snapshot(p, state)
    history = state.history
    state.history = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="history"):
        F.lars_update(p, g, state, lr=0.1, momentum=0.9, percentile_clipping=50)
    state.history = history
    state.is_8bit = False  # codes and absmax no longer fit
    with pytest.raises(ValueError, match="32-bit state"):
        F.lars_update(p, g, state, lr=0.1, momentum=0.9)
    state.is_8bit = True
    p.shape = (10, 30)
    with pytest.raises(ValueError, match="shape"):
        F.lars_update(p, g.reshape(10, 30), state, lr=0.1, momentum=0.9)
    p.shape = (300,)
    with pytest.raises(TypeError, match=r"grads\[0\] is float16"):
        F.lars_update(p, g.astype(np.float16), state, lr=0.1, momentum=0.9)
    _assert_untouched(p, state, snap)
    F.lars_update(p, g, state, lr=0.1, momentum=0.9, percentile_clipping=50)
    assert state.step == 3


def test_fresh_gradient_arrays_match_reused_ones():
    results = []
    for fresh in (False, True):
        params = [_problem(n, seed=n)[0] for n in (10, 300, 5000)]
        states = [F.init_state(q, optim_bits=8, min_8bit_size=256) for q in params]
        grads = [np.zeros_like(q) for q in params]
        for step in range(4):
            new = [_problem(q.size, seed=100 + step)[1] for q in params]
            if fresh:
                grads = new
            else:
                for old, n in zip(grads, new):
                    old[...] = n
            F.lars_update_many(params, grads, states, lr=0.1, momentum=0.9, percentile_clipping=50)
        results.append((params, states))
    (p1, s1), (p2, s2) = results
    for a, b in zip(p1, p2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(s1, s2):
        for k, arr in a.arrays().items():
            np.testing.assert_array_equal(arr, getattr(b, k), err_msg=k)


@pytest.mark.parametrize("bits", [32, 8])
def test_nonfinite_skip_leaves_everything_but_the_skip_count(bits):
    p, g = _problem(5000)
    state = _warm_state(p, g, bits)
    snap = _snapshot(p, state)
    for bad in (np.nan, np.inf, -np.inf):
        g_bad = g.copy()
        g_bad[17] = bad
        F.lars_update(p, g_bad, state, lr=0.1, momentum=0.9, percentile_clipping=50)
    np.testing.assert_array_equal(p, snap[0])
    assert state.step == 1 and state.skipped == 3
    after = state.to_dict()
    for k, v in snap[1].items():
        if k != "skip_count":
            np.testing.assert_array_equal(after[k], v)


def test_nonfinite_raise_updates_no_tensor():
    params = [_problem(100, s)[0] for s in range(3)]
    grads = [_problem(100, s + 5)[0] for s in range(3)]
    grads[1][3] = np.inf
    states = [F.init_state(p) for p in params]
    before = [p.copy() for p in params]
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        F.lars_update_many(params, grads, states, lr=0.1, nonfinite="raise")
    for p, b, s in zip(params, before, states):
        np.testing.assert_array_equal(p, b)
        assert s.step == 0 and s.skipped == 0


def test_nonfinite_propagate_applies_the_step():
    p, g = _problem()
    g[0] = np.nan
    state = F.init_state(p)
    F.lars_update(p, g, state, lr=0.1, max_unorm=0, nonfinite="propagate")
    assert np.isnan(p[0]) and state.step == 1 and state.skipped == 0


def test_nonfinite_skip_is_per_tensor_in_a_list():
    params = [_problem(100, s)[0] for s in range(2)]
    grads = [_problem(100, s + 5)[0] for s in range(2)]
    grads[0][0] = np.nan
    states = [F.init_state(p) for p in params]
    before = [p.copy() for p in params]
    F.lars_update_many(params, grads, states, lr=0.1)
    np.testing.assert_array_equal(params[0], before[0])
    assert not np.array_equal(params[1], before[1])
    assert (states[0].step, states[0].skipped, states[1].step, states[1].skipped) == (0, 1, 1, 0)


def test_empty_tensor_is_a_no_op():
    p = np.zeros((0, 3), np.float32)
    state = F.init_state(p, optim_bits=8, min_8bit_size=0)
    F.lars_update(p, p.copy(), state, lr=0.1, momentum=0.9)
    assert state.step == 0


def test_non_contiguous_views_are_updated_in_place():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((40, 30)).astype(np.float32)
    view = base[::2, 1::3]
    g = rng.standard_normal(view.shape).astype(np.float32)
    contiguous = np.ascontiguousarray(view)
    s1, s2 = F.init_state(view), F.init_state(contiguous)
    untouched = base[1::2].copy()
    F.lars_update(view, g[::1], s1, lr=0.1, momentum=0.9)
    F.lars_update(contiguous, np.ascontiguousarray(g), s2, lr=0.1, momentum=0.9)
    np.testing.assert_array_equal(view, contiguous)
    np.testing.assert_array_equal(base[1::2], untouched)


@pytest.mark.parametrize("bits", [32, 8])
def test_many_equals_one_at_a_time(bits):
    shapes = [(1,), (300,), (17, 19), (5000,)]
    rng = np.random.default_rng(9)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    copies = [p.copy() for p in params]
    sa = [F.init_state(p, optim_bits=bits, min_8bit_size=256) for p in params]
    sb = [F.init_state(p, optim_bits=bits, min_8bit_size=256) for p in copies]
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 0.001}
    for _ in range(5):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        F.lars_update_many(params, grads, sa, **hp)
        for p, g, s in zip(copies, grads, sb):
            F.lars_update(p, g, s, **hp)
    for a, b in zip(params, copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_round_trip_continues_bit_exactly(bits, tmp_path):
    p, g = _problem(5000)
    q = p.copy()
    state = _warm_state(p, g, bits)
    twin = _warm_state(q, g, bits)
    np.savez(tmp_path / "state.npz", **state.to_dict())
    with np.load(tmp_path / "state.npz") as data:
        restored = F.LarsState.from_dict({k: data[k].copy() for k in data.files})
    assert restored.is_8bit == state.is_8bit and restored.shape == state.shape
    for seed in range(3):
        g2 = _problem(5000, seed + 1)[1]
        F.lars_update(p, g2, restored, lr=0.1, momentum=0.9, percentile_clipping=50)
        F.lars_update(q, g2, twin, lr=0.1, momentum=0.9, percentile_clipping=50)
    np.testing.assert_array_equal(p, q)
    assert restored.step == 4


def test_from_dict_rejects_inconsistent_arrays():
    p, g = _problem(5000)
    d = _warm_state(p, g, 8).to_dict()
    bad = dict(d, absmax=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="absmax"):
        F.LarsState.from_dict(bad)
    with pytest.raises(KeyError, match="history"):
        F.LarsState.from_dict({k: v for k, v in d.items() if k != "history"})


def test_backend_for_numpy_says_which_and_why(monkeypatch):
    monkeypatch.delenv("CUPYLARS_BACKEND", raising=False)
    params = [np.ones(3, np.float32)]
    native = F.backend_for(params)
    assert native.name == "cpu" and "native CPU backend" in native.reason
    asked = F.backend_for(params, backend="reference")
    assert asked.name == "reference" and "asked for" in asked.reason
    monkeypatch.setenv("CUPYLARS_BACKEND", "reference")
    assert F.backend_for(params).name == "reference"
    monkeypatch.setenv("CUPYLARS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CUPYLARS_BACKEND must be one of"):
        F.backend_for(params)
    with pytest.raises(ValueError, match="backend must be one of"):
        F.backend_for(params, backend="gpu")
    with pytest.raises(ValueError, match="CuPy arrays"):
        F.backend_for(params, backend="cuda")


def test_importing_cupylars_imports_neither_torch_nor_cupy():
    import subprocess
    import sys

    code = "import sys, cupylars, cupylars.functional; print('torch' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
