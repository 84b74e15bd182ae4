r"""Framework-agnostic LARS: pure update functions over NumPy or CuPy arrays.

State is passed explicitly, optax style::

    from cupylars import functional as F

    state = F.init_state(param, optim_bits=8)
    for _ in range(steps):
        grad = compute_grad(param)
        F.lars_update(param, grad, state, lr=0.1, momentum=0.9, weight_decay=1e-4)

One API, two backends, chosen by the arrays' module: NumPy arrays take the
NumPy reference (:mod:`cupylars.reference`, the specification), CuPy arrays
the fused CUDA kernels (:mod:`cupylars.cuda`). Inside
``cupylars.testing.emulated_cuda()`` NumPy arrays take the CUDA kernels
compiled for and run on the CPU. :func:`backend_for` says which backend a
call would take, and why.

The step, per tensor, at applied step :math:`t` (docs/algorithm.md):

.. math::
    \begin{aligned}
    &\gamma = \text{percentile clip factor of } \|g\| \quad (P < 100) \\
    &d = \gamma g + \lambda p \\
    &d \leftarrow r d, \quad r = \frac{\eta \|p\|}{\gamma\|g\| + \lambda\|p\| + \epsilon}
        \quad (\eta > 0;\ r \leftarrow \min(r / \text{lr}, 1) \text{ with trust\_clip}) \\
    &m = d \ (t = 1), \quad m = \mu m + (1 - \delta) d \ (t > 1) \quad (\mu > 0) \\
    &u = d + \mu m \text{ (nesterov)}, \quad u = m, \quad u = d \ (\mu = 0) \\
    &s = \min\left(1, \frac{\text{max\_unorm} \|p\|}{\|u\|}\right) \quad (\|p\| > 0) \\
    &p \leftarrow p - \text{lr}\, s\, u
    \end{aligned}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import reference
from .config import NONFINITE_POLICIES, LarsConfig
from .formats import resolve_format
from .quantization import dequantize_blockwise, dynamic_map, quantize_blockwise
from .state import LarsState, array_module

__all__ = [
    "NONFINITE_POLICIES",
    "LarsConfig",
    "LarsState",
    "backend_for",
    "dequantize_blockwise",
    "dynamic_map",
    "init_state",
    "lars_update",
    "lars_update_many",
    "quantize_blockwise",
]


def init_state(
    param: Any, *, optim_bits: int = 32, min_8bit_size: int = 4096, dtype: str | None = None
) -> LarsState:
    """A fresh state for ``param`` (NumPy or CuPy array; no values are read).

    With ``optim_bits=8`` a tensor of at least ``min_8bit_size`` elements keeps
    its momentum as 8-bit blockwise codes; smaller tensors keep float32.
    ``dtype='bfloat16'`` declares a uint16 array of bfloat16 bit patterns.
    """
    fmt = resolve_format(param, dtype)
    xp = array_module(param)
    if xp is not np:
        with xp.cuda.Device(param.device.id):
            return LarsState.create(
                xp, param.shape, fmt, optim_bits=optim_bits, min_8bit_size=min_8bit_size
            )
    return LarsState.create(xp, param.shape, fmt, optim_bits=optim_bits, min_8bit_size=min_8bit_size)


def lars_update(
    param: Any,
    grad: Any,
    state: LarsState,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    max_unorm: float = 0.02,
    percentile_clipping: int = 100,
    trust_coefficient: float = 0.0,
    trust_clip: bool = False,
    eps: float = 1e-8,
    nonfinite: str = "skip",
    dtype: str | None = None,
) -> None:
    """Apply one LARS step to ``param`` and ``state``, in place.

    Args:
        param: the parameter (float32, float16, or uint16 with ``dtype='bfloat16'``).
        grad: its gradient, same shape and storage format.
        state: from :func:`init_state` for this parameter.
        lr: learning rate (>= 0).
        momentum: mu in [0, 1); 0 keeps no momentum state.
        dampening: delta in [0, 1), scales the new gradient into the momentum.
        weight_decay: lambda >= 0, coupled L2 decay added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        max_unorm: cap on ||update|| / ||param||; 0 turns it off.
        percentile_clipping: clip ||g|| at this percentile of the last 100
            gradient norms; 100 turns it off.
        trust_coefficient: eta of the classic LARS trust ratio; 0 turns it off.
        trust_clip: LARC clipping of the trust ratio, r = min(r / lr, 1).
        eps: added to the trust-ratio denominator.
        nonfinite: a gradient with NaN/Inf is ``'skip'`` ped (state.skipped
            counts it), ``'raise'`` s FloatingPointError, or ``'propagate'`` s.
        dtype: storage format when the arrays cannot tell (``'bfloat16'``).

    Raises:
        TypeError, ValueError: on any invalid argument; nothing is modified.
    """
    lars_update_many(
        [param],
        [grad],
        [state],
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        max_unorm=max_unorm,
        percentile_clipping=percentile_clipping,
        trust_coefficient=trust_coefficient,
        trust_clip=trust_clip,
        eps=eps,
        nonfinite=nonfinite,
        dtype=dtype,
    )


def lars_update_many(
    params: Sequence[Any],
    grads: Sequence[Any],
    states: Sequence[LarsState],
    *,
    dtype: str | None = None,
    **hyperparameters: Any,
) -> None:
    """:func:`lars_update` over a list of tensors in one call.

    Takes the keyword arguments of :func:`lars_update`. Each tensor is its own
    layer (its own norms and trust ratio). On CuPy arrays the whole list costs
    a constant number of kernel launches. Everything is validated before any
    tensor is touched; with ``nonfinite='raise'`` no tensor is updated when any
    gradient is non-finite; with ``'skip'`` each tensor skips on its own.
    """
    cfg = LarsConfig(**hyperparameters)
    formats = validate_inputs(params, grads, states, dtype)
    backend = backend_for(params)
    if backend.name == "reference":
        _reference_update_many(params, grads, states, cfg, formats)
    else:
        backend.update_many(params, grads, states, cfg, formats)


# -- validation ----------------------------------------------------------------------


def _check_same_module(name: str, array: Any, xp: Any, index: int) -> None:
    if array_module(array) is not xp:
        raise TypeError(
            f"{name}[{index}] is a {type(array).__module__}.{type(array).__name__}, but params[{index}] "
            f"is a {xp.__name__} array: param, grad and state must live in the same array module"
        )


def validate_inputs(
    params: Sequence[Any], grads: Sequence[Any], states: Sequence[LarsState], dtype: str | None
) -> list[str]:
    """Check every tensor against its gradient and state; return their formats."""
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(
            f"params, grads and states differ in length: {len(params)}, {len(grads)}, {len(states)}"
        )
    formats = []
    seen: set[int] = set()
    for i, (param, grad, state) in enumerate(zip(params, grads, states)):
        if not isinstance(state, LarsState):
            raise TypeError(f"states[{i}] is a {type(state).__name__}, expected a LarsState")
        fmt = resolve_format(param, dtype, name=f"params[{i}]")
        grad_fmt = resolve_format(grad, dtype, name=f"grads[{i}]")
        if grad_fmt != fmt:
            raise TypeError(f"grads[{i}] is {grad_fmt} but params[{i}] is {fmt}")
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(
                f"grads[{i}] has shape {tuple(grad.shape)}, params[{i}] has {tuple(param.shape)}"
            )
        if tuple(state.shape) != tuple(param.shape):
            raise ValueError(
                f"states[{i}] was made for shape {state.shape}, params[{i}] has {tuple(param.shape)}"
            )
        if state.param_format != fmt:
            raise TypeError(f"states[{i}] was made for {state.param_format} params, params[{i}] is {fmt}")
        xp = array_module(param)
        _check_same_module("grads", grad, xp, i)
        for name, array in state.arrays().items():
            _check_same_module(f"states.{name}", array, xp, i)
        state.check()
        if id(param) in seen:
            raise ValueError(f"params[{i}] appears twice in one update")
        seen.add(id(param))
        formats.append(fmt)
    return formats


# -- backends ------------------------------------------------------------------------


class _ReferenceBackend:
    name = "reference"
    reason = "NumPy arrays: the NumPy reference implementation"


def backend_for(params: Sequence[Any]) -> Any:
    """The backend an update of ``params`` takes; its ``.reason`` says why."""
    modules = {array_module(p).__name__ for p in params}
    if len(modules) > 1:
        raise TypeError(f"params mix array modules {sorted(modules)}; update each module separately")
    if modules == {"cupy"}:
        from . import cuda

        return cuda.cupy_backend()
    from . import testing

    emulated = testing.active_emulation()
    if emulated is not None:
        return emulated
    return _ReferenceBackend()


def _reference_update_many(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    states: Sequence[LarsState],
    cfg: LarsConfig,
    formats: Sequence[str],
) -> None:
    finite = [
        cfg.nonfinite == "propagate" or reference.grad_is_finite(g, f) for g, f in zip(grads, formats)
    ]
    if cfg.nonfinite == "raise" and not all(finite):
        bad = [i for i, ok in enumerate(finite) if not ok]
        raise FloatingPointError(f"non-finite gradient in tensor(s) {bad}; nothing was updated")
    for param, grad, state, fmt, ok in zip(params, grads, states, formats, finite):
        if param.size == 0:
            continue
        if ok:
            reference.apply_step(param, grad, state, cfg, fmt)
        else:
            state.skip_count[...] += 1
