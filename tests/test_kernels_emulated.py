"""The fused kernels against the NumPy reference, on both host backends that run them:
the CUDA kernels run on the CPU by the emulator, and the native CPU backend compiled
from the same math (rawkernels/lars_math.h). Tests of the CUDA launcher itself
(launch counts, table uploads, quad-access flags) run on the emulator only.

Each step starts the reference from a copy of the kernels' own state, so the two
never drift apart and every step is compared on its own: the kernels use fused
multiply-adds and take ||u|| from dot products, so they agree with the reference
to float32 rounding, not bit for bit; 8-bit codes may differ by one code where m
sits on a rounding boundary.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import zlib

import native_builds
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import CONFIGS, FULL, _assert_param_close, _assert_state_close, reference_step
from lars_cases import (
    SHAPES,
    compare_step,
    dtype_arg,
    hyperparameters,
    random_grad,
    random_problem,
    to_storage,
)

from cupylars import backends, cuda, plan
from cupylars import functional as F
from cupylars.testing import emulated_cuda, native_cpu

# A mark rather than a module-level skip (kept from when the GPU tests imported this module).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cupylars._emulator") is None,
    reason="the CPU emulator (cupylars/_emulator.py) is not available",
)

FORMATS = ["float32", "float16", "bfloat16"]
SMALL_CHUNK = 512  # several chunks per tensor from a few thousand elements



def emulated_cuda_f32_partials():
    """The emulated kernels built with the float32-partials stats pass (the GPU build's
    on sm_86, sm_87 and sm_89; docs/kernels.md, "float32 partials")."""
    return backends.use(cuda.emulated_backend(defines=cuda.STATS_F32_PARTIALS))


# Every test but the launcher's runs on each: the float64 stats pass (sm_80, sm_90), the
# float32-partials one, and the native CPU backend as built for this host and without
# AVX-512 VBMI and AVX-512 (its other vector paths: tests/native_builds.py).
KERNEL_BACKENDS = {
    "emulated-cuda": emulated_cuda,
    "emulated-cuda-f32-partials": emulated_cuda_f32_partials,
    "cpu": native_cpu,
    "cpu-no-avx512vbmi": lambda: native_builds.use("no-avx512vbmi"),
    "cpu-no-avx512": lambda: native_builds.use("no-avx512"),
}
_current = ["emulated-cuda"]
cuda_launcher = pytest.mark.cuda_launcher  # a test of the CUDA launcher: emulator only


@pytest.fixture(autouse=True, params=list(KERNEL_BACKENDS))
def kernel_backend(request):
    """Every test runs on each kernel backend (``kernels()`` enters the current one)."""
    if request.param != "emulated-cuda" and request.node.get_closest_marker("cuda_launcher"):
        pytest.skip("tests the CUDA launcher: run on the default emulated build only")
    if request.param.startswith("cpu-"):
        native_builds.skip_unless_buildable(request.param[len("cpu-") :])
    _current[0] = request.param
    yield request.param
    _current[0] = "emulated-cuda"


def kernels():
    """The kernel backend of the running test, as a context manager."""
    return KERNEL_BACKENDS[_current[0]]()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(plan, "CHUNK_SIZE", SMALL_CHUNK)


# ---- helpers ------------------------------------------------------------------------------------
def _make(rng, shapes, fmt, bits, min_8bit_size=0):
    params = [random_problem(rng, s, fmt) for s in shapes]
    states = [
        F.init_state(p, optim_bits=bits, min_8bit_size=min_8bit_size, dtype=dtype_arg(fmt)) for p in params
    ]
    return params, states


def step_and_compare(params, grads, states, hp, dtype, what=""):
    """One emulated step, checked against the reference run from the same state."""
    prev_states = copy.deepcopy(states)
    before = [p.copy() for p in params]
    ref_error = emu_error = None
    try:
        ref_params, ref_states, raw_m = reference_step(params, grads, states, hp, dtype)
    except FloatingPointError as e:  # nothing changed: compare with the inputs
        ref_error = e
        ref_params, ref_states, raw_m = before, prev_states, {}
    try:
        with kernels():
            F.lars_update_many(params, grads, states, dtype=dtype, **hp)
    except FloatingPointError as e:
        emu_error = e
    assert (ref_error is None) == (emu_error is None), (ref_error, emu_error)
    if emu_error is not None:
        assert str(emu_error) == str(ref_error)
    for i, (p, rp, b, fmt) in enumerate(zip(params, ref_params, before, _formats(params, dtype))):
        label = f"{what} tensor {i} {p.shape} {fmt}"
        _assert_param_close(p, rp, b, fmt, label)
        _assert_state_close(states[i], ref_states[i], prev_states[i], hp, label, raw_m.get(id(ref_states[i])))


def _formats(params, dtype):
    return ["bfloat16" if dtype == "bfloat16" else str(p.dtype) for p in params]


def _grads(rng, params, fmt):
    return [random_grad(rng, p.shape, fmt) for p in params]


# ---- shapes x formats x state --------------------------------------------------------------------
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_shape_format_and_state_over_10_steps(shape, fmt, bits):
    rng = np.random.default_rng(zlib.crc32(repr((shape, fmt, bits)).encode()))
    params, states = _make(rng, [shape], fmt, bits)
    for t in range(10):
        step_and_compare(params, _grads(rng, params, fmt), states, FULL, dtype_arg(fmt), f"step {t}")
    assert states[0].step == 10


# ---- every switch, mixed tensor list, several chunks per tensor ----------------------------------
MIXED_SHAPES = [(1,), (3,), (255,), (257,), (513,), (1024,), (33, 65), (4097,)]


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_switch_on_a_mixed_list(name, bits, small_chunks):
    hp = CONFIGS[name]
    fmt = "bfloat16" if bits == 8 else "float32"
    rng = np.random.default_rng(len(name) * 7 + bits)
    # min_8bit_size splits the list into 8-bit and float32 state
    params, states = _make(rng, MIXED_SHAPES, fmt, bits, min_8bit_size=256)
    for t in range(10):
        step_and_compare(params, _grads(rng, params, fmt), states, hp, dtype_arg(fmt), f"{name} step {t}")
    assert all(s.step == 10 for s in states)


def test_float32_and_float16_tensors_in_one_call(small_chunks):
    rng = np.random.default_rng(5)
    shapes = [(1,), (700,), (2049,), (16,), (1500,)]
    fmts = ["float32", "float16", "float16", "float32", "float32"]
    params = [random_problem(rng, s, f) for s, f in zip(shapes, fmts)]
    states = [F.init_state(p, optim_bits=8, min_8bit_size=1000) for p in params]
    for t in range(6):
        grads = [random_grad(rng, p.shape, f) for p, f in zip(params, fmts)]
        step_and_compare(params, grads, states, FULL, None, f"step {t}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hp=hyperparameters(),
    fmt=st.sampled_from(FORMATS),
    bits=st.sampled_from([32, 8]),
    sizes=st.lists(st.integers(1, 2600), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_hyperparameters(hp, fmt, bits, sizes, seed):
    rng = np.random.default_rng(seed)
    params, states = _make(rng, [(n,) for n in sizes], fmt, bits, min_8bit_size=512)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan, "CHUNK_SIZE", 768)
        for t in range(3):
            step_and_compare(params, _grads(rng, params, fmt), states, hp, dtype_arg(fmt), f"step {t}")


def test_default_chunking_of_a_large_tensor():
    rng = np.random.default_rng(14)
    n = 2 * plan.CHUNK_SIZE + 1000  # three chunks of the default size, the last one short
    params, states = _make(rng, [(n,), (5,)], "float16", 8, min_8bit_size=4096)
    for t in range(3):
        step_and_compare(params, _grads(rng, params, "float16"), states, FULL, None, f"step {t}")


# The kernels without m (stats "gradonly" and "nostate", update "nostate") load a
# warp's next tile before its arithmetic; a warp has several tiles only in chunks of
# more than 2048 elements (8 warps x 256), so these run at the default chunk size:
# one full chunk (8 tiles a warp) and a short one (partial tiles, idle warps).
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "hp",
    [
        # stats reads g (whose norm percentile clipping uses), update without state
        {"lr": 0.1, "max_unorm": 0.0, "percentile_clipping": 5},
        {"lr": 0.1, "weight_decay": 0.1, "max_unorm": 0.02},  # stats reads g and p
        # stats reads g, update with state
        {"lr": 0.1, "momentum": 0.9, "max_unorm": 0.0, "percentile_clipping": 5},
    ],
    ids=["gradonly", "nostate", "momentum-gradonly"],
)
def test_several_tiles_per_warp(fmt, hp):
    rng = np.random.default_rng(zlib.crc32(repr((fmt, sorted(hp.items()))).encode()))
    shapes = [(plan.CHUNK_SIZE + 2500,), (4097,)]
    params, states = _make(rng, shapes, fmt, 8, min_8bit_size=5000)  # one 8-bit, one float32 state
    for t in range(3):
        step_and_compare(params, _grads(rng, params, fmt), states, hp, dtype_arg(fmt), f"step {t}")


def test_percentile_history_wraps_around():
    rng = np.random.default_rng(15)
    params, states = _make(rng, [(300,)], "float32", 32)
    hp = {"lr": 0.01, "momentum": 0.9, "percentile_clipping": 10}
    for t in range(105):  # past the 100 history entries
        grads = [random_grad(rng, (300,), "float32") * np.float32(1 + (t % 7))]
        step_and_compare(params, grads, states, hp, None, f"step {t}")
    assert states[0].step == 105


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from(SHAPES),
    fmt=st.sampled_from(FORMATS),
    bits=st.sampled_from([32, 8]),
    hp=hyperparameters(),
    seed=st.integers(0, 2**32 - 1),
)
def test_against_the_independent_float64_spec(shape, fmt, bits, hp, seed):
    """The kernels against tests/spec64.py, as tests/test_reference.py holds the reference."""
    rng = np.random.default_rng(seed)
    param = random_problem(rng, shape, fmt)
    state = F.init_state(param, optim_bits=bits, min_8bit_size=256, dtype=dtype_arg(fmt))

    def update(p, g, st):
        with kernels():
            F.lars_update(p, g, st, dtype=dtype_arg(fmt), **hp)

    for _ in range(15):
        compare_step(param, random_grad(rng, shape, fmt), state, hp, fmt, update)
    assert state.step == 15


# ---- special values ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [32, 8])
def test_zero_parameters_and_zero_gradients(bits, small_chunks):
    rng = np.random.default_rng(1)
    params = [np.zeros(700, np.float32), np.zeros(300, np.float32), random_problem(rng, (600,), "float32")]
    states = [F.init_state(p, optim_bits=bits, min_8bit_size=0) for p in params]
    grads = [random_grad(rng, (700,), "float32"), np.zeros(300, np.float32), np.zeros(600, np.float32)]
    for t in range(3):
        step_and_compare(params, grads, states, FULL, None, f"step {t}")


def test_momentum_switched_on_after_plain_steps():
    rng = np.random.default_rng(2)
    params, states = _make(rng, [(600,)], "float32", 32)
    for t in range(2):
        step_and_compare(params, _grads(rng, params, "float32"), states, CONFIGS["plain"], None, f"plain {t}")
    for t in range(3):  # t > 1 with a fresh (zero) momentum buffer
        step_and_compare(params, _grads(rng, params, "float32"), states, FULL, None, f"momentum {t}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reference's float32 history
def test_large_values_stay_finite_in_the_norms():
    rng = np.random.default_rng(3)
    params = [to_storage(rng.standard_normal(3000) * 1e18, "float32")]
    states = [F.init_state(params[0])]
    grads = [to_storage(rng.standard_normal(3000) * 3e18, "float32")]
    step_and_compare(params, grads, states, FULL, None)


# ---- non-finite gradients ------------------------------------------------------------------------
def _poison(grads, index, value=np.nan):
    grads[index] = grads[index].copy()
    flat = grads[index].reshape(-1)
    flat[min(5, flat.size - 1)] = value
    return grads


@pytest.mark.parametrize("bits", [32, 8])
def test_skip_leaves_only_the_bad_tensor_untouched(bits, small_chunks):
    rng = np.random.default_rng(4)
    params, states = _make(rng, [(600,), (1300,), (50,)], "float32", bits)
    step_and_compare(params, _grads(rng, params, "float32"), states, FULL, None, "warm-up")
    for value in (np.nan, np.inf, -np.inf):
        grads = _poison(_grads(rng, params, "float32"), 1, value)
        snap = [p.copy() for p in params], copy.deepcopy(states)
        step_and_compare(params, grads, states, FULL, None, f"skip {value}")
        np.testing.assert_array_equal(params[1], snap[0][1])
        for k, a in snap[1][1].arrays().items():
            if k != "skip_count":
                np.testing.assert_array_equal(getattr(states[1], k), a, err_msg=k)
        assert not np.array_equal(params[0], snap[0][0])
    assert [s.skipped for s in states] == [0, 3, 0]
    assert [s.step for s in states] == [4, 1, 4]


@pytest.mark.parametrize("bits", [32, 8])
def test_raise_modifies_nothing(bits, small_chunks):
    rng = np.random.default_rng(6)
    params, states = _make(rng, [(600,), (1300,)], "float32", bits)
    grads = _poison(_grads(rng, params, "float32"), 1)
    snap = [p.copy() for p in params]
    with kernels(), pytest.raises(FloatingPointError, match=r"tensor\(s\) \[1\]"):
        F.lars_update_many(params, grads, states, **{**FULL, "nonfinite": "raise"})
    for p, s in zip(params, snap):
        np.testing.assert_array_equal(p, s)
    assert all(s.step == 0 and s.skipped == 0 and not s.has_momentum for s in states)
    assert all((s.history == -1).all() for s in states)
    # and a finite step afterwards works from the untouched state
    step_and_compare(params, _grads(rng, params, "float32"), states, {**FULL, "nonfinite": "raise"}, None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference computing with NaN and Inf
@pytest.mark.parametrize("percentile", [100, 50])
@pytest.mark.parametrize("bits", [32, 8])
def test_propagate_matches_the_reference(bits, percentile, small_chunks):
    rng = np.random.default_rng(7)
    params, states = _make(rng, [(600,), (1300,)], "float32", bits)
    hp = {**FULL, "nonfinite": "propagate", "percentile_clipping": percentile}
    step_and_compare(params, _grads(rng, params, "float32"), states, hp, None, "warm-up")
    grads = _poison(_grads(rng, params, "float32"), 1, np.nan)
    step_and_compare(params, grads, states, hp, None, "nan")
    assert states[1].step == 2 and states[1].skipped == 0
    # a NaN in the history sorts last, as in numpy.sort
    fresh = [random_problem(rng, (700,), "float32")]
    fresh_states = [F.init_state(fresh[0])]
    for t, poison in enumerate([None, np.nan, np.inf, None]):
        grads = _grads(rng, fresh, "float32")
        if poison is not None:
            grads = _poison(grads, 0, poison)
        step_and_compare(fresh, grads, fresh_states, hp, None, f"history {t}")


# ---- the launcher ------------------------------------------------------------------------------
def _run(params, grads, states, hp=FULL, dtype=None):
    with kernels():
        F.lars_update_many(params, grads, states, dtype=dtype, **hp)


@cuda_launcher
@pytest.mark.parametrize("n_tensors", [1, 7, 40])
def test_launch_count_does_not_depend_on_the_number_of_tensors(n_tensors, small_chunks):
    rng = np.random.default_rng(n_tensors)
    shapes = [(int(rng.integers(1, 1500)),) for _ in range(n_tensors)]
    params, states = _make(rng, shapes, "float32", 32)
    with cuda.record_launches() as launches:
        _run(params, _grads(rng, params, "float32"), states)
    assert [name for name, _, _ in launches] == [
        "lars_stats_f32_state32",
        "lars_finalize",
        "lars_unorm_exact",  # max_unorm is on: the exact-norm passes always launch
        "lars_unorm_finalize",
        "lars_update_f32_state32",
    ]
    chunks = sum(-(-s[0] // SMALL_CHUNK) for s in shapes)
    assert launches[0][1] == launches[2][1] == launches[4][1] == (chunks,)
    assert launches[1][1] == launches[3][1] == (n_tensors,)


@cuda_launcher
def test_launches_per_kernel_variant_not_per_tensor(small_chunks):
    rng = np.random.default_rng(8)
    params, states = _make(rng, [(100,)] * 30 + [(3000,)] * 30, "float16", 8, min_8bit_size=1000)
    with cuda.record_launches() as launches:
        _run(params, _grads(rng, params, "float16"), states)
    assert sorted(name for name, _, _ in launches) == sorted(
        [
            "lars_stats_f16_state32",
            "lars_stats_f16_state8",
            "lars_finalize",
            "lars_unorm_exact",
            "lars_unorm_finalize",
            "lars_update_f16_state32",
            "lars_update_f16_state8",
        ]
    )
    # without momentum the stats pass needs no state: one launch per pass
    with cuda.record_launches() as launches:
        _run(params, _grads(rng, params, "float16"), states, {"lr": 0.1})
    names = [n for n, _, _ in launches]
    assert names == [
        "lars_stats_f16_nostate",
        "lars_finalize",
        "lars_unorm_exact",
        "lars_unorm_finalize",
        "lars_update_f16_nostate",
    ]
    # without trust ratio and max_unorm it reads only g (the g.g of the skip policy
    # and percentile clipping); momentum without max_unorm needs no m in the stats
    for hp in ({"lr": 0.1, "max_unorm": 0.0}, {"lr": 0.1, "momentum": 0.9, "max_unorm": 0.0}):
        with cuda.record_launches() as launches:
            _run(params, _grads(rng, params, "float16"), states, hp)
        stats = sorted({n for n, _, _ in launches if n.startswith("lars_stats")})
        assert stats == ["lars_stats_f16_gradonly"], hp
        # without max_unorm there is no norm to check: no exact-norm launches
        assert not [n for n, _, _ in launches if n.startswith("lars_unorm")], hp


def test_two_runs_are_bitwise_identical(small_chunks):
    def run():
        rng = np.random.default_rng(9)
        params, states = _make(rng, [(1,), (700,), (2500,), (33, 65)], "bfloat16", 8, min_8bit_size=600)
        for _ in range(4):
            _run(params, _grads(rng, params, "bfloat16"), states, FULL, "bfloat16")
        return params, states

    (p1, s1), (p2, s2) = run(), run()
    for a, b in zip(p1, p2):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(s1, s2):
        for k, arr in a.arrays().items():
            assert arr.tobytes() == getattr(b, k).tobytes(), k


@cuda_launcher
def test_steady_state_steps_upload_no_tables(monkeypatch):
    backend = cuda.emulated_backend()
    uploads = []
    original = backend.runtime.upload
    monkeypatch.setattr(backend.runtime, "upload", lambda host: uploads.append(host.size) or original(host))
    rng = np.random.default_rng(10)
    params, states = _make(rng, [(300,), (5000,)], "float32", 32)
    grads = _grads(rng, params, "float32")
    for _ in range(3):  # new gradient values in the same arrays, as a training loop has
        for g, new in zip(grads, _grads(rng, params, "float32")):
            g[...] = new
        _run(params, grads, states)
    assert len(uploads) == 1
    _run(params, _grads(rng, params, "float32"), states)  # gradients in new arrays: new tables
    assert len(uploads) == 2
    params.append(np.ones(10, np.float32))
    states.append(F.init_state(params[-1]))
    grads.append(np.ones(10, np.float32))
    _run(params, grads, states)
    assert len(uploads) == 3


def test_fresh_gradient_arrays_match_reused_ones(small_chunks):
    # zero_grad(set_to_none=True) gives a training loop new gradient arrays every step: the
    # cached tables then get a new gradient column; results must not depend on it.
    def run(fresh):
        rng = np.random.default_rng(20)
        params, states = _make(rng, [(1,), (700,), (2500,), (33, 65)], "float16", 8, min_8bit_size=600)
        grads = _grads(rng, params, "float16")
        for _ in range(4):
            new = _grads(rng, params, "float16")
            if fresh:
                grads = new
            else:
                for g, n in zip(grads, new):
                    g[...] = n
            _run(params, grads, states)
        return params, states

    (p1, s1), (p2, s2) = run(False), run(True)
    for a, b in zip(p1, p2):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(s1, s2):
        for k, arr in a.arrays().items():
            assert arr.tobytes() == getattr(b, k).tobytes(), k


@cuda_launcher
def test_gradients_moving_between_aligned_and_unaligned_memory():
    # The quad-access flag of a tensor depends on its gradient's address: it must follow
    # the gradients when only they move.
    rng = np.random.default_rng(21)
    params, states = _make(rng, [(2000,), (3000,)], "float32", 32)
    bases = [random_grad(rng, (p.size + 1,), "float32") for p in params]
    aligned = [random_grad(rng, p.shape, "float32") for p in params]
    unaligned = [b[1:] for b in bases]  # 4 bytes past a 16-byte boundary
    for t, grads in enumerate([aligned, unaligned, aligned, unaligned]):
        step_and_compare(params, grads, states, FULL, None, f"step {t}")
        emulated = [b for b in F._BATCHES.values() if b.backend is cuda.emulated_backend()]
        newest = next(iter(emulated[-1].cuda_plans.values()))  # the batch of these states, its tables
        want = int(grads is aligned)
        assert newest.host_tensors[:, plan.FIELD_VECTOR].tolist() == [want] * len(params)


def test_replaced_state_arrays_and_params_are_updated(small_chunks):
    rng = np.random.default_rng(22)
    params, states = _make(rng, [(700,), (1500,)], "float32", 32)
    twins, twin_states = [p.copy() for p in params], copy.deepcopy(states)
    for t in range(5):
        grads = _grads(rng, params, "float32")
        if t == 2:
            old_m = states[1].momentum
            states[1].momentum = old_m.copy()  # the state now holds another array
            frozen_m = old_m.copy()
        if t == 3:
            old_p = params[0]
            params[0] = old_p.copy()  # the list another parameter (of the same shape)
            frozen_p = old_p.copy()
        _run(params, grads, states)
        F.lars_update_many(twins, grads, twin_states, backend="reference", **FULL)
    np.testing.assert_array_equal(old_m, frozen_m)  # the replaced arrays were left alone
    np.testing.assert_array_equal(old_p, frozen_p)
    for p, q in zip(params, twins):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(states[1].momentum, twin_states[1].momentum, rtol=1e-4, atol=1e-7)


def test_bad_input_after_steady_state_steps_still_raises_and_touches_nothing():
    rng = np.random.default_rng(23)
    params, states = _make(rng, [(300,), (5000,)], "float32", 8, min_8bit_size=1000)
    grads = _grads(rng, params, "float32")
    for _ in range(3):
        _run(params, grads, states)
    before = [p.copy() for p in params]
    snap = copy.deepcopy(states)

    def read_only(a):
        a = a.copy()
        a.flags.writeable = False
        return a

    cases = [
        ("grads[1] has shape", lambda: (params, [grads[0], grads[1][:-1]], states)),
        ("grads[0] is float16", lambda: (params, [grads[0].astype(np.float16), grads[1]], states)),
        ("grads[1] is a builtins.list", lambda: (params, [grads[0], list(grads[1])], states)),
        ("params[0] is read-only", lambda: ([read_only(params[0]), params[1]], grads, states)),
        ("states[0] is a dict", lambda: (params, grads, [states[0].to_dict(), states[1]])),
        ("appears twice", lambda: ([params[0], params[0]], [grads[0], grads[0]], [states[0], states[0]])),
    ]
    if _current[0] == "emulated-cuda":  # the CPU backend reads strided gradients through a copy
        strided = np.repeat(grads[1], 2)[::2]
        cases.append(("grads[1] is not C-contiguous", lambda: (params, [grads[0], strided], states)))
    for match, make in cases:
        with kernels(), pytest.raises((TypeError, ValueError), match=re.escape(match)):
            F.lars_update_many(*make(), **FULL)
    states[1].codes = states[1].codes[:-1]  # an assigned array is checked again
    with kernels(), pytest.raises(ValueError, match="codes"):
        F.lars_update_many(params, grads, states, **FULL)
    states[1].codes = snap[1].codes.copy()
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)
    for a, b in zip(states, snap):
        for k, arr in b.arrays().items():
            np.testing.assert_array_equal(getattr(a, k), arr, err_msg=k)


def test_copies_of_a_state_are_validated_on_their_own():
    # Validations are remembered per state version; a copy (or an unpickled state) holds
    # other arrays and must not inherit the version of the state it was made from.
    import pickle

    state = F.init_state(np.ones(10, np.float32))
    versions = {state._version}
    for twin in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert twin._version not in versions
        versions.add(twin._version)
    before = state._version
    state.ensure_momentum(np)
    assert state._version != before


@cuda_launcher
def test_unaligned_views_take_the_scalar_path():
    rng = np.random.default_rng(11)
    base_p = random_problem(rng, (2001,), "float32")
    base_g = random_grad(rng, (2001,), "float32")
    params = [base_p[1:]]  # 4 bytes past a 16-byte boundary
    grads = [base_g[1:]]
    assert params[0].__array_interface__["data"][0] % 16 != 0
    states = [F.init_state(params[0])]
    for t in range(3):
        step_and_compare(params, grads, states, FULL, None, f"step {t}")


@cuda_launcher
def test_empty_tensors_are_a_no_op():
    rng = np.random.default_rng(12)
    empty = np.zeros((0, 3), np.float32)
    params = [empty, random_problem(rng, (300,), "float32")]
    states = [F.init_state(p) for p in params]
    grads = [np.zeros((0, 3), np.float32), random_grad(rng, (300,), "float32")]
    step_and_compare(params, grads, states, FULL, None)
    assert states[0].step == 0 and states[1].step == 1
    with cuda.record_launches() as launches:
        _run([empty], [empty.copy()], [states[0]])
    assert launches == [] and states[0].step == 0


@cuda_launcher
def test_non_contiguous_and_read_only_arrays_are_rejected():
    rng = np.random.default_rng(13)
    p = random_problem(rng, (64, 8), "float32")
    g = random_grad(rng, (64, 8), "float32")
    pt = p.T  # transposed view: not C-contiguous
    state = F.init_state(pt)
    with kernels(), pytest.raises(ValueError, match="C-contiguous"):
        F.lars_update(pt, np.ascontiguousarray(g.T), state, lr=0.1)
    assert state.step == 0
    ro = p.copy()
    ro.flags.writeable = False
    with kernels(), pytest.raises(ValueError, match="read-only"):
        F.lars_update(ro, g, F.init_state(ro), lr=0.1)


@cuda_launcher
def test_backend_reports_why_it_was_chosen():
    with kernels():
        backend = F.backend_for([np.zeros(3, np.float32)])
    assert backend.name == "emulated-cuda"
    assert "emulated_cuda" in backend.reason
