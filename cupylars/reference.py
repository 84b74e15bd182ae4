r"""The LARS step in NumPy: the CPU backend and the specification of the kernels.

One call of :func:`apply_step` performs, for one tensor at applied step
:math:`t` (the numbering of docs/algorithm.md)::

    1. gamma = percentile clipping factor from the history of ||g||^2   (P < 100)
    2. d     = gamma * g + lam * p
    3. d     = r * d,  r = eta ||p|| / (gamma ||g|| + lam ||p|| + eps)   (eta > 0)
                       r = min(r / lr, 1) with trust_clip
    4. m     = d  (t == 1)   or   mu * m + (1 - delta) * d                (mu > 0)
       u     = d + mu * m  (nesterov)   or   m   (or d without momentum)
    5. s     = max_unorm ||p|| / ||u||  if ||u|| > max_unorm ||p|| > 0, else 1
    6. p     = p - lr * s * u

Norms are float64 sums of float32 values, all taken over the tensor as it was
before the step; scalar factors are computed in float64 and applied as float32;
elementwise work is float32 in the order written above; the parameter is
rounded to nearest even into its storage format. 8-bit state is dequantized
before step 4 and the new m quantized after it (steps 4-6 use the float32 m).

The CUDA kernels compute the same quantities (norms of u through dot
products, fused multiply-adds) and match this to float32 rounding; the tests
hold them to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import quantization
from .config import LarsConfig, nonfinite_error
from .formats import from_float32, to_float32
from .state import HISTORY_SIZE, LarsState

__all__ = [
    "apply_step",
    "grad_is_finite",
    "history_slot",
    "percentile_factor",
    "trust_ratio",
    "unorm_scale",
    "update_many",
]

_f32 = np.float32


def _norm(x: np.ndarray) -> float:
    """Euclidean norm of a float32 vector, accumulated in float64."""
    x64 = x.astype(np.float64)
    return math.sqrt(float(np.dot(x64, x64)))


def grad_is_finite(grad: np.ndarray, fmt: str) -> bool:
    return bool(np.isfinite(to_float32(np, grad, fmt)).all())


def history_slot(t: int) -> int:
    """The history entry of applied step ``t``: ``t % 100`` of ``t`` as an unsigned 64-bit
    count, as the kernels compute it (lars_math.h's history_slot), so that no count, even
    one that wrapped, indexes outside the history."""
    return (int(t) % 2**64) % HISTORY_SIZE


def percentile_factor(history: np.ndarray, t: int, grad_sq_norm: float, percentile: int) -> float:
    """Step 1: record ``||g||^2`` in ``history`` (in place) and return gamma.

    ``history[t % 100]`` receives the squared norm; the first recorded step
    fills all entries with it. gamma = clip / current when the current norm
    exceeds the ``percentile``-th smallest recorded one, else 1.
    """
    entry = _f32(grad_sq_norm)
    slot = history_slot(t)
    if history[0] < 0:  # never recorded
        history[:] = entry
    else:
        history[slot] = entry
    current = math.sqrt(float(history[slot]))
    clip = math.sqrt(float(np.sort(history)[percentile]))
    return clip / current if current > clip else 1.0


def trust_ratio(cfg: LarsConfig, p_norm: float, g_norm: float, gamma: float) -> float:
    """Step 3: the classic LARS trust ratio r (with the LARC clip)."""
    if p_norm > 0 and g_norm > 0:
        r = cfg.trust_coefficient * p_norm / (gamma * g_norm + cfg.weight_decay * p_norm + cfg.eps)
    else:
        r = 1.0
    if cfg.trust_clip:
        r = min(r / cfg.lr, 1.0) if cfg.lr > 0 else 1.0
    return r


def unorm_scale(max_unorm: float, p_norm: float, u_norm: float) -> float:
    """Step 5: s, the factor that caps ||s u|| at ``max_unorm * ||p||``.

    A zero parameter norm leaves the update as it is (s = 1), so tensors that
    start at zero still train.
    """
    if p_norm > 0 and u_norm > max_unorm * p_norm:
        return max_unorm * p_norm / u_norm
    return 1.0


def _load_momentum(state: LarsState) -> np.ndarray:
    if state.is_8bit:
        return quantization.dequantize_blockwise(state.codes, state.absmax).ravel()
    return state.momentum.reshape(-1)


def _store_momentum(state: LarsState, m: np.ndarray) -> None:
    if state.is_8bit:
        codes, absmax = quantization.quantize_blockwise(m)
        state.codes[...] = codes.reshape(state.shape)
        state.absmax[...] = absmax
    else:
        state.momentum[...] = m.reshape(state.shape)


def update_direction(
    cfg: LarsConfig, t: int, g: Any, p: Any, m_old: Any, gamma: float, r: float
) -> tuple[Any, Any]:
    """Steps 2-4, elementwise in float32: the update direction u and the new momentum m.

    ``g``, ``p`` and ``m_old`` are float32 vectors (NumPy, or any array module);
    ``m_old`` is ignored at ``t == 1`` and without momentum, when ``m`` is None.
    ``gamma`` and ``r`` come from :func:`percentile_factor` and :func:`trust_ratio`.
    """
    d = _f32(gamma) * g + _f32(cfg.weight_decay) * p  # 2. coupled weight decay
    if cfg.uses_trust_ratio:
        d = _f32(r) * d  # 3. trust ratio
    if not cfg.uses_momentum:
        return d, None
    mu = _f32(cfg.momentum)  # 4. momentum
    m = d.copy() if t == 1 else mu * m_old + _f32(1.0 - cfg.dampening) * d
    return (d + mu * m if cfg.nesterov else m), m


def apply_step(param: np.ndarray, grad: np.ndarray, state: LarsState, cfg: LarsConfig, fmt: str) -> None:
    """Apply one LARS step to ``param`` and ``state`` in place (validated inputs).

    The non-finite policy is the caller's: this applies the step as it is.
    """
    if param.size == 0:
        return
    t = state.step + 1
    p = to_float32(np, param, fmt).reshape(-1)
    g = to_float32(np, grad, fmt).reshape(-1)
    g_norm = _norm(g)
    p_norm = _norm(p)

    gamma = 1.0  # 1. percentile clipping of the gradient
    if cfg.clips_percentile:
        gamma = percentile_factor(state.history, t, g_norm * g_norm, cfg.percentile_clipping)
    r = trust_ratio(cfg, p_norm, g_norm, gamma) if cfg.uses_trust_ratio else 1.0
    m_old = None
    if cfg.uses_momentum:
        state.ensure_momentum(np)
        if t > 1:
            m_old = _load_momentum(state)
    u, m = update_direction(cfg, t, g, p, m_old, gamma, r)

    # 5. update-norm clipping, 6. the update
    s = unorm_scale(cfg.max_unorm, p_norm, _norm(u)) if cfg.clips_update_norm else 1.0
    p_new = p - _f32(cfg.lr * s) * u
    param[...] = from_float32(np, p_new, fmt).reshape(param.shape)
    if m is not None:
        _store_momentum(state, m)
    state.step_count[...] += 1


def update_many(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    states: Sequence[LarsState],
    cfg: LarsConfig,
    formats: Sequence[str],
) -> None:
    """One step over a list of validated tensors, with the non-finite policy.

    ``'raise'`` checks every gradient before any tensor is touched; ``'skip'``
    leaves a tensor with a non-finite gradient as it was and counts the skip.
    """
    finite = [cfg.nonfinite == "propagate" or grad_is_finite(g, f) for g, f in zip(grads, formats)]
    if cfg.nonfinite == "raise" and not all(finite):
        bad = [i for i, ok in enumerate(finite) if not ok]
        raise nonfinite_error(bad)
    for param, grad, state, fmt, ok in zip(params, grads, states, formats, finite):
        if param.size == 0:
            continue
        if ok:
            apply_step(param, grad, state, cfg, fmt)
        else:
            state.skip_count[...] += 1
