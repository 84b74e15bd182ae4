"""The native CPU step's schedule: stats -> finalize -> update per group of consecutive
tensors that fit in the cache (docs/kernels.md, "The native CPU backend"). Any group budget
and any thread count give the same bits as one group over the whole step."""

from __future__ import annotations

import native_builds
import numpy as np
import pytest
from lars_cases import random_grad, random_problem

from cupylars import cpu, plan, quantization
from cupylars import functional as F
from cupylars.testing import native_cpu

FULL = dict(
    lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, max_unorm=0.05, percentile_clipping=50
)
# Sizes around the 1024-element chunks used here and the 8-element lanes: groups of one
# tensor, of several, and tensors split over many chunks.
SHAPES = [(9000,), (300,), (70, 41), (5,), (20000,), (1,), (4099,), (1024,)]
ONE_GROUP = 0
BUDGETS = [1, 9000, 40_000, 200_000]  # bytes of p, g and m per group


@pytest.fixture
def backend():
    """The process's CPU backend, its group budget restored afterwards."""
    with native_cpu():
        backend = cpu.cpu_backend()
        before = backend.set_group_bytes(ONE_GROUP)
        backend.set_group_bytes(before)
        yield backend
        backend.set_group_bytes(before)


def _dtype(fmt: str) -> str | None:
    return "bfloat16" if fmt == "bfloat16" else None


def _cancelling(rng: np.random.Generator, n: int):
    """(param, grad, state) after one step at momentum 0.5 whose u = mu m_old + g cancels to
    float32 rounding: the dot products cannot resolve ||u||, the exact-norm phase runs."""
    g = (rng.choice([-1.0, 1.0], n) * (1.0 + 0.5 * rng.random(n))).astype(np.float32)
    m_old = -2.0 * g
    m_old += rng.integers(-1, 2, n).astype(np.float32) * np.spacing(np.abs(m_old))
    state = F.init_state(np.empty(n, dtype=np.float32), optim_bits=32)
    state.ensure_momentum(np)
    state.momentum[...] = m_old
    state.step_count[...] = 1
    u_norm = np.linalg.norm((np.float32(0.5) * m_old + g).astype(np.float64))
    param = (rng.choice([-1.0, 1.0], n) * u_norm / (4.0 * 0.05 * np.sqrt(n))).astype(np.float32)
    return param, g, state


def _problem(fmt: str, bits: int):
    rng = np.random.default_rng(7)
    params = [random_problem(rng, shape, fmt) for shape in SHAPES]
    states = [F.init_state(p, optim_bits=bits, min_8bit_size=1000, dtype=_dtype(fmt)) for p in params]
    grads = [[random_grad(rng, p.shape, fmt) for p in params] for _ in range(3)]
    return params, states, grads


def _train(backend, budget: int, threads: int, monkeypatch, fmt: str, bits: int):
    monkeypatch.setattr(cpu, "num_threads", lambda: threads)
    backend.set_group_bytes(budget)
    params, states, grads = _problem(fmt, bits)
    for step_grads in grads:
        F.lars_update_many(params, step_grads, states, dtype=_dtype(fmt), **FULL)
    return params, states


def _bits(params, states) -> list[bytes]:
    out = [p.tobytes() for p in params]
    for s in states:
        out += [np.asarray(a).tobytes() for _, a in sorted(s.arrays().items())]
    return out


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bits", [32, 8])
def test_groups_and_threads_give_the_bits_of_one_group(backend, monkeypatch, fmt, bits):
    monkeypatch.setattr(plan, "CHUNK_SIZE", 1024)  # many chunks per tensor
    monkeypatch.setattr(cpu, "WORK_PER_THREAD", 1)  # threads even for this small work
    expected = _bits(*_train(backend, ONE_GROUP, 1, monkeypatch, fmt, bits))
    for budget in BUDGETS:
        for threads in (1, 2, 4):
            got = _bits(*_train(backend, budget, threads, monkeypatch, fmt, bits))
            assert got == expected, (budget, threads)


def test_exact_norms_in_a_group_of_several_tensors(backend, monkeypatch):
    """A tensor whose ||u|| cancels, between others in the same group and in groups of its own."""
    monkeypatch.setattr(plan, "CHUNK_SIZE", 1024)
    monkeypatch.setattr(cpu, "WORK_PER_THREAD", 1)
    hp = dict(lr=0.1, momentum=0.5, max_unorm=0.05)

    def run(budget: int, threads: int):
        monkeypatch.setattr(cpu, "num_threads", lambda: threads)
        backend.set_group_bytes(budget)
        rng = np.random.default_rng(3)
        params, grads, states = [], [], []
        for k, n in enumerate([3000, 5000, 2500, 7000]):
            if k in (1, 3):
                p, g, s = _cancelling(rng, n)
            else:
                p, g = random_problem(rng, (n,), "float32"), random_grad(rng, (n,), "float32")
                s = F.init_state(p, optim_bits=32)
            params.append(p), grads.append(g), states.append(s)
        before = [p.astype(np.float64) for p in params]
        F.lars_update_many(params, grads, states, **hp)
        return params, states, before

    params, states, before = run(ONE_GROUP, 1)
    for k in (1, 3):  # the cap holds: the exact norm ran
        step = np.linalg.norm(params[k] - before[k])
        assert step <= hp["lr"] * hp["max_unorm"] * np.linalg.norm(before[k]) * (1 + 2**-9)
    expected = _bits(params, states)
    for budget in (1, 40_000, 100_000):
        for threads in (1, 2, 4):
            assert _bits(*run(budget, threads)[:2]) == expected, (budget, threads)


def test_raise_sees_every_gradient_before_any_group_changes(backend, monkeypatch):
    monkeypatch.setattr(cpu, "WORK_PER_THREAD", 1)
    backend.set_group_bytes(1)  # a group per tensor
    params, states, grads = _problem("float32", 32)
    bad = [g.copy() for g in grads[0]]
    bad[-1][5] = np.nan  # the last tensor's group
    before = [p.copy() for p in params]
    with pytest.raises(FloatingPointError, match=rf"tensor\(s\) \[{len(SHAPES) - 1}\]"):
        F.lars_update_many(params, bad, states, **{**FULL, "nonfinite": "raise"})
    assert all(p.tobytes() == b.tobytes() for p, b in zip(params, before))
    assert all(s.step == 0 and s.history[0] < 0 for s in states)


def test_group_budget_is_half_the_largest_data_cache(tmp_path):
    caches = {"index0": ("Data", "32K"), "index1": ("Instruction", "64K"), "index2": ("Unified", "1024K")}
    caches["index3"] = ("Unified", "32768K")
    for name, (kind, size) in caches.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        (tmp_path / name / "size").write_text(size + "\n")
    assert cpu.cache_bytes(str(tmp_path)) == 32 * 2**20
    (tmp_path / "index3" / "size").write_text("2M\n")
    assert cpu.cache_bytes(str(tmp_path)) == 2 * 2**20
    assert cpu.cache_bytes(str(tmp_path / "absent")) is None
    size = cpu.cache_bytes()
    assert cpu.group_bytes() == (size // 2 if size else cpu.DEFAULT_GROUP_BYTES)


def test_a_negative_budget_is_refused(backend):
    with pytest.raises(ValueError, match="group bytes"):
        backend.set_group_bytes(-1)


# ---- the 8-bit codes of the update -----------------------------------------------------------
# Each check runs on the host's build and on builds without AVX-512 VBMI and without AVX-512
# (tests/native_builds.py): the codec has a path for each.
@pytest.fixture(params=list(native_builds.BUILDS))
def build(request):
    native_builds.skip_unless_buildable(request.param)
    return native_builds.library(request.param)


def _native_codes(lib, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.size, dtype=np.uint8)
    book = quantization.dynamic_map()
    lib.lars_cpu_nearest_codes(book.ctypes.data, x.ctypes.data, x.size, out.ctypes.data)
    return out


def test_codes_equal_the_rule_for_every_float32_in_minus_one_to_one(build):
    """Every float32 in [-1, 1] (x = m / absmax lies there), in ascending order: the codes
    start at the rule's code of -1 and step up by one exactly after each threshold (the
    largest float of each code), as quantization's rule has them (test_quantization_thresholds)."""
    t = quantization.code_thresholds()
    ordered_t = quantization._ordered(t).astype(np.int64)
    lo, hi = (int(i) for i in quantization._ordered(np.array([-1.0, 1.0], dtype=np.float32)))
    hi += 1
    span = 1 << 24
    sign = np.int32(-(2**31))
    for start in range(lo, hi, span):
        end = min(hi, start + span)
        ordered = np.arange(start, end, dtype=np.int32)
        x = np.where(ordered >= 0, ordered, np.negative(ordered) | sign).view(np.float32)
        codes = _native_codes(build, x)
        first = int(np.searchsorted(t, x[0], side="left"))
        assert codes[0] == first, (start, x[0])
        steps = np.flatnonzero(codes[1:] != codes[:-1]) + 1
        expected = ordered_t[(ordered_t + 1 > start) & (ordered_t + 1 < end)] + 1 - start
        np.testing.assert_array_equal(steps, expected, err_msg=f"steps in [{x[0]}, {x[-1]}]")
        assert np.all(codes[steps] == codes[steps - 1] + 1)


def test_codes_equal_the_rule_beyond_one_and_for_specials(build):
    """A sweep over all bit patterns (every exponent, both signs, NaNs of both signs,
    infinities), -0.0, and every length up to two 8-bit blocks (the vector paths' tails)."""
    bits = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45], dtype=np.float32)
    x = np.concatenate([bits.view(np.float32), specials])
    with np.errstate(invalid="ignore"):
        want = quantization._nearest_code(np, x)
    np.testing.assert_array_equal(_native_codes(build, x), want)
    rng = np.random.default_rng(3)
    for n in range(1, 513):
        at = int(rng.integers(0, x.size - n))
        got = _native_codes(build, x[at : at + n])
        np.testing.assert_array_equal(got, want[at : at + n], err_msg=f"n={n}")


def test_dequantized_codes_are_the_book_times_the_block_absmax(build):
    """Every code, in blocks of 256 with their own absmax (zero, subnormal, NaN, infinite and
    ordinary), and every length up to two blocks: book[code] * absmax in float32."""
    rng = np.random.default_rng(4)
    book = quantization.dynamic_map()
    codes = np.concatenate([np.arange(256, dtype=np.uint8), rng.integers(0, 256, 256 * 7, dtype=np.uint8)])
    absmax = np.array([1.0, 0.0, 1e-40, np.nan, np.inf, 3.5, 1e30, 0.01], dtype=np.float32)
    with np.errstate(invalid="ignore"):  # inf * 0 (code 127) is NaN, as in the step
        want = book[codes] * np.repeat(absmax, 256)
    for n in [*range(1, 513), codes.size]:
        out = np.full(n, -7.0, dtype=np.float32)
        build.lars_cpu_dequantize(book.ctypes.data, codes.ctypes.data, absmax.ctypes.data, n, out.ctypes.data)
        np.testing.assert_array_equal(out.view(np.uint32), want[:n].view(np.uint32), err_msg=f"n={n}")
