"""The NumPy reference against the independent float64 spec, and targeted behaviour."""

import numpy as np
import pytest
import spec64
from hypothesis import given, settings
from hypothesis import strategies as st
from lars_cases import (
    FORMATS,
    SHAPES,
    compare_step,
    dtype_arg,
    hyperparameters,
    random_grad,
    random_problem,
    to_storage,
    values_of,
)

from cupylars import functional as F
from cupylars.quantization import BLOCK_SIZE
from cupylars.testing import reference


@pytest.fixture(autouse=True)
def _the_reference():
    """Every update here runs the NumPy reference (the specification), whatever the default."""
    with reference():
        yield


def _reference_update(hp, fmt):
    def update(param, grad, state):
        F.lars_update(param, grad, state, dtype=dtype_arg(fmt), **hp)

    return update


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    fmt=st.sampled_from(FORMATS),
    bits=st.sampled_from([32, 8]),
    hp=hyperparameters(),
    zero_param=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_reference_matches_float64_spec_over_30_steps(shape, fmt, bits, hp, zero_param, seed):
    rng = np.random.default_rng(seed)
    param = random_problem(rng, shape, fmt, zero_param)
    state = F.init_state(param, optim_bits=bits, min_8bit_size=256, dtype=dtype_arg(fmt))
    update = _reference_update(hp, fmt)
    for _ in range(30):
        compare_step(param, random_grad(rng, shape, fmt), state, hp, fmt, update)
    assert state.step == 30


STABLE_CONFIGS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "max_unorm": 0.05},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "percentile_clipping": 20, "max_unorm": 0},
    {"lr": 0.5, "momentum": 0.9, "trust_coefficient": 0.01, "weight_decay": 1e-4},
    {"lr": 0.01, "momentum": 0.9, "trust_coefficient": 0.01, "trust_clip": True},
]


@pytest.mark.parametrize("hp", STABLE_CONFIGS)
def test_trajectory_follows_float64_spec(hp):
    """Not re-synchronised each step: a whole 40-step float32 trajectory of a stable
    problem stays near the float64 one."""
    rng = np.random.default_rng(0)
    target = rng.standard_normal(300)
    p32 = rng.standard_normal(300).astype(np.float32)
    p64 = p32.astype(np.float64)
    state = F.init_state(p32)
    spec = spec64.Spec64State()
    book = F.dynamic_map()
    for _ in range(40):
        g64 = p64 - target  # the same smooth problem for both: gradient of 0.5||p - target||^2
        F.lars_update(p32, (p32 - target).astype(np.float32), state, **hp)
        p64 = spec64.step(p64, g64, spec, hp, "float32", book)
    np.testing.assert_allclose(p32, p64, rtol=2e-3, atol=2e-4)


def test_momentum_zero_keeps_no_momentum_state():
    p = np.ones(1000, np.float32)
    state = F.init_state(p)
    F.lars_update(p, np.ones_like(p), state, lr=0.1)
    assert state.momentum is None and state.momentum_buffer() is None
    assert state.nbytes() < 500


def test_momentum_buffer_is_none_before_the_first_step():
    p = np.ones(10, np.float32)
    state = F.init_state(p)
    assert state.momentum_buffer() is None and state.step == 0 and state.skipped == 0


def test_first_momentum_step_stores_d():
    p = np.full(4, 2.0, np.float32)
    g = np.array([1, -1, 2, 0], np.float32)
    state = F.init_state(p)
    F.lars_update(p, g, state, lr=0.5, momentum=0.9, dampening=0.5, weight_decay=0.1, max_unorm=0)
    np.testing.assert_allclose(state.momentum_buffer(), g + 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(p, 2.0 - 0.5 * (g + 0.2), rtol=1e-6)


def test_dampening_and_nesterov_second_step():
    p = np.full(3, 1.0, np.float32)
    g1 = np.array([1.0, 2.0, 3.0], np.float32)
    g2 = np.array([-1.0, 0.5, 1.0], np.float32)
    mu = 0.9
    state = F.init_state(p)
    F.lars_update(p, g1, state, lr=0.1, momentum=mu, nesterov=True, max_unorm=0)
    F.lars_update(p, g2, state, lr=0.1, momentum=mu, nesterov=True, max_unorm=0)
    m2 = mu * g1 + g2
    expected = 1.0 - 0.1 * (g1 + mu * g1) - 0.1 * (g2 + mu * m2)
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    q = np.full(3, 1.0, np.float32)
    state = F.init_state(q)
    F.lars_update(q, g1, state, lr=0.1, momentum=mu, dampening=0.25, max_unorm=0)
    F.lars_update(q, g2, state, lr=0.1, momentum=mu, dampening=0.25, max_unorm=0)
    np.testing.assert_allclose(state.momentum_buffer(), mu * g1 + 0.75 * g2, rtol=1e-6)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("trust", [0.0, 0.001])
def test_zero_initialised_tensor_trains(bits, trust):
    """||p|| == 0 must not freeze a tensor (s = 1 and r = 1 there)."""
    p = np.zeros(5000, np.float32)
    g = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    state = F.init_state(p, optim_bits=bits)
    F.lars_update(p, g, state, lr=0.1, momentum=0.9, trust_coefficient=trust)
    assert state.is_8bit == (bits == 8)
    np.testing.assert_allclose(p, -0.1 * g, rtol=1e-6)


def test_max_unorm_caps_the_update_norm():
    rng = np.random.default_rng(3)
    p = rng.standard_normal(1000).astype(np.float32)
    g = (rng.standard_normal(1000) * 100).astype(np.float32)
    before = p.copy()
    state = F.init_state(p)
    F.lars_update(p, g, state, lr=1.0, max_unorm=0.02)
    ratio = np.linalg.norm((p - before).astype(np.float64)) / np.linalg.norm(before.astype(np.float64))
    assert ratio == pytest.approx(0.02, rel=1e-4)


def test_trust_clip_with_tiny_lr_is_plain_sgd():
    """LARC: r = min(r / lr, 1) is 1 when lr is tiny, leaving d unscaled."""
    rng = np.random.default_rng(4)
    p = rng.standard_normal(500).astype(np.float32)
    g = rng.standard_normal(500).astype(np.float32)
    want = p - np.float32(1e-7) * (g + np.float32(0.01) * p)
    state = F.init_state(p)
    F.lars_update(
        p, g, state, lr=1e-7, weight_decay=0.01, trust_coefficient=0.02, trust_clip=True, max_unorm=0
    )
    np.testing.assert_allclose(p, want, rtol=1e-6)


def test_trust_ratio_scales_the_step():
    rng = np.random.default_rng(5)
    p = rng.standard_normal(500).astype(np.float32)
    g = rng.standard_normal(500).astype(np.float32)
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    r = 0.02 * np.linalg.norm(p64) / (np.linalg.norm(g64) + 1e-3 * np.linalg.norm(p64) + 1e-8)
    state = F.init_state(p)
    F.lars_update(p, g, state, lr=0.5, weight_decay=1e-3, trust_coefficient=0.02, max_unorm=0)
    np.testing.assert_allclose(p, p64 - 0.5 * r * (g64 + 1e-3 * p64), rtol=1e-5)


class TestPercentileHistory:
    def _run(self, norms, percentile):
        p = np.ones(16, np.float32)
        state = F.init_state(p)
        gammas = []
        for k, norm in enumerate(norms):
            g = np.zeros(16, np.float32)
            g[k % 16] = norm
            before = p.copy()
            F.lars_update(p, g, state, lr=1.0, max_unorm=0, percentile_clipping=percentile)
            gammas.append(float(np.linalg.norm(before - p) / norm))
        return state, gammas

    def test_first_step_fills_every_entry(self):
        state, gammas = self._run([3.0], 5)
        np.testing.assert_array_equal(state.history, np.full(100, 9.0, np.float32))
        assert gammas == [pytest.approx(1.0)]

    def test_ring_index_is_step_mod_100(self):
        norms = [float(k) for k in range(1, 106)]  # steps t = 1..105
        state, _ = self._run(norms, 50)
        want = np.full(100, 1.0, np.float32)  # the first step filled everything with 1^2
        for t, norm in enumerate(norms, start=1):
            want[t % 100] = norm**2
        np.testing.assert_array_equal(state.history, want)

    @pytest.mark.parametrize("percentile", [1, 2, 98, 99])
    def test_gamma_is_the_percentile_over_current(self, percentile):
        rng = np.random.default_rng(percentile)
        norms = list(rng.uniform(0.5, 5.0, 130))
        _, gammas = self._run(norms, percentile)
        history = None
        for t, (norm, gamma) in enumerate(zip(norms, gammas), start=1):
            sq = np.float32(norm * norm)
            history = np.full(100, sq, np.float32) if history is None else history
            history[t % 100] = sq
            clip = np.sqrt(np.float64(np.sort(history)[percentile]))
            current = np.sqrt(np.float64(sq))
            assert gamma == pytest.approx(clip / current if current > clip else 1.0, rel=1e-5)

    def test_percentile_100_records_nothing(self):
        state, gammas = self._run([1.0, 5.0], 100)
        assert np.all(state.history == -1.0) and gammas == [pytest.approx(1.0)] * 2


@pytest.mark.parametrize("n, is_8bit", [(4095, False), (4096, True)])
def test_min_8bit_size_boundary(n, is_8bit):
    p = np.ones(n, np.float32)
    state = F.init_state(p, optim_bits=8, min_8bit_size=4096)
    assert state.is_8bit is is_8bit
    F.lars_update(p, np.ones_like(p), state, lr=0.1, momentum=0.9)
    if is_8bit:
        assert state.codes.dtype == np.uint8 and state.codes.shape == (n,)
        assert state.absmax.shape == (-(-n // BLOCK_SIZE),) and state.momentum is None
        assert state.nbytes() == n + 4 * (-(-n // BLOCK_SIZE)) + 416
    else:
        assert state.momentum.dtype == np.float32 and state.codes is None


def test_8bit_tracks_32bit_on_a_smooth_problem():
    """100 steps of least squares: the 8-bit run stays close to the 32-bit run."""
    rng = np.random.default_rng(7)
    A = rng.standard_normal((512, 64))
    x_true = rng.standard_normal((64, 80))
    B = A @ x_true
    runs = {}
    for bits in (32, 8):
        W = (0.5 * np.random.default_rng(8).standard_normal((64, 80))).astype(np.float32)
        state = F.init_state(W, optim_bits=bits, min_8bit_size=0)
        losses = []
        for _ in range(100):
            R = A @ W - B
            losses.append(0.5 * np.mean(R**2))
            F.lars_update(W, (A.T @ R / 512).astype(np.float32), state, lr=0.5, momentum=0.9, max_unorm=0.1)
        runs[bits] = (W.astype(np.float64), losses)
    (w32, l32), (w8, l8) = runs[32], runs[8]
    param_gap = np.linalg.norm(w8 - w32) / np.linalg.norm(w32)
    loss_gap = abs(l8[-1] - l32[-1]) / l32[0]
    print(
        f"8-bit vs 32-bit after 100 steps: param gap {param_gap:.2e}, loss gap {loss_gap:.2e} "
        f"(final loss {l32[-1]:.3e} vs {l8[-1]:.3e}, initial {l32[0]:.3e})"
    )
    assert l32[-1] < 0.05 * l32[0]
    assert param_gap < 0.01 and loss_gap < 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_storage_formats_round_to_nearest_even(fmt):
    rng = np.random.default_rng(8)
    p = to_storage(rng.standard_normal(300), fmt)
    g = to_storage(rng.standard_normal(300), fmt)
    pv, gv = values_of(p, fmt), values_of(g, fmt)
    state = F.init_state(p, dtype=dtype_arg(fmt))
    F.lars_update(p, g, state, lr=0.01, max_unorm=0, dtype=dtype_arg(fmt))
    want32 = (pv.astype(np.float32) - np.float32(0.01) * gv.astype(np.float32)).astype(np.float64)
    np.testing.assert_array_equal(values_of(p, fmt), spec64.round_to(want32, fmt))
