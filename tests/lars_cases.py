"""Shared test machinery: random tensors in every storage format, and a step-by-step
comparison of a cupylars backend against the independent float64 spec (spec64)."""

from __future__ import annotations

import numpy as np
import spec64
from hypothesis import strategies as st

# Moved to the hypothesis-free kernel_checks; re-exported for the tests that import them here.
from kernel_checks import (  # noqa: F401
    assert_codes_match,
    dtype_arg,
    random_grad,
    random_problem,
    to_storage,
    values_of,
)

from cupylars import functional as F

SHAPES = [(1,), (255,), (256,), (257,), (4095,), (4096,), (4097,), (33, 65)]
FORMATS = ["float32", "float16", "bfloat16"]


@st.composite
def hyperparameters(draw: st.DrawFn) -> dict:
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    dampening = draw(st.sampled_from([0.0, 0.3])) if momentum > 0 else 0.0
    nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
    return {
        "lr": draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0])),
        "momentum": momentum,
        "dampening": dampening,
        "nesterov": nesterov,
        "weight_decay": draw(st.sampled_from([0.0, 1e-4, 0.1])),
        "max_unorm": draw(st.sampled_from([0.0, 0.02, 1.0])),
        "percentile_clipping": draw(st.sampled_from([100, 1, 5, 50, 99])),
        "trust_coefficient": draw(st.sampled_from([0.0, 1e-3, 1.0])),
        "trust_clip": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-8, 0.0])),
    }


def spec_state_from(state: F.LarsState) -> spec64.Spec64State:
    """The spec's view of a cupylars state (what it holds before a step)."""
    history = None if state.history[0] < 0 else np.array(state.history, dtype=np.float32)
    m = state.momentum_buffer()
    return spec64.Spec64State(
        t=state.step,
        skipped=state.skipped,
        history=history,
        m=None if m is None else np.asarray(m, dtype=np.float64).ravel(),
        is_8bit=state.is_8bit,
    )


def compare_step(param, grad, state, hp, fmt, update) -> None:
    """Run ``update`` (one backend step, in place) and check it against spec64 given the
    same inputs. Tolerances: one ulp of the storage format plus float32 rounding of
    the update; 8-bit codes may differ by one step at rare rounding boundaries."""
    book = F.dynamic_map()
    spec = spec_state_from(state)
    p_before = values_of(param, fmt).ravel()
    want = spec64.step(p_before, values_of(grad, fmt), spec, hp, fmt, book)
    update(param, grad, state)
    got = values_of(param, fmt).ravel()
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg="non-finite values differ")
    np.testing.assert_array_equal(got[~finite], want[~finite])  # same infinities, NaN as NaN
    got, want = got[finite], want[finite]
    tol = 2 * spec64.ulp(want, fmt) + 1e-5 * spec.extras.get("update_scale", 0.0) + 1e-30
    bad = np.abs(got - want) > tol
    assert not bad.any(), (
        f"param mismatch at {np.flatnonzero(bad)[:5]}: got {got[bad][:5]}, want {want[bad][:5]}, "
        f"tol {tol[bad][:5]}"
    )
    assert state.step == spec.t and state.skipped == spec.skipped
    if spec.history is not None:
        np.testing.assert_allclose(state.history, spec.history, rtol=1e-6, atol=0)
    if hp.get("momentum", 0.0) > 0 and spec.m is not None:
        if state.is_8bit:
            # The spec leaves the codes of a block holding Inf or NaN undefined (a
            # diverged run); compare the blocks whose absmax is finite.
            finite_block = np.repeat(np.isfinite(spec.absmax), 256)[: spec.codes.size]
            if not finite_block.any():
                return
            m_scale = spec.extras["m_scale"] + 1e-30
            assert_codes_match(
                state.codes.ravel()[finite_block],
                spec.codes.ravel()[finite_block],
                spec.extras["m_raw"][finite_block],
                np.repeat(spec.absmax, 256)[: spec.codes.size][finite_block],
                m_scale,
            )
            # absmax is a max of m: float32 rounding bounds its error by the size of
            # the terms summed into m, as for 32-bit m below, not by absmax itself.
            np.testing.assert_allclose(state.absmax, spec.absmax, rtol=1e-6, atol=1e-6 * m_scale)
        else:
            scale = spec.extras["m_scale"] + 1e-30
            np.testing.assert_allclose(state.momentum.ravel(), spec.m, rtol=0, atol=1e-6 * scale)
