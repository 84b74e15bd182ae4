r"""Framework-agnostic LARS: pure update functions over NumPy or CuPy arrays.

State is passed explicitly, optax style::

    from cupylars import functional as F

    state = F.init_state(param, optim_bits=8)
    for _ in range(steps):
        grad = compute_grad(param)
        F.lars_update(param, grad, state, lr=0.1, momentum=0.9, weight_decay=1e-4)

One API over any array that speaks DLPack and can be written in place: NumPy
and CuPy arrays, torch tensors on the CPU or a CUDA device (zero-copy; a
bfloat16 tensor needs no ``dtype``). Host arrays take the native CPU backend
(:mod:`cupylars.cpu`, the CUDA kernels' math compiled for the host), CUDA
arrays the fused CUDA kernels (:mod:`cupylars.cuda`); ``backend="reference"``
(or ``CUPYLARS_BACKEND=reference``) takes the NumPy reference
(:mod:`cupylars.reference`), the specification the others are tested against.
:func:`backend_for` says which backend a call would take, and why
(:mod:`cupylars.backends`).

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

import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backends, streams
from . import batch as batch_module
from .backends import Backend
from .batch import PreparedBatch, module_of
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
    "prepare",
    "quantize_blockwise",
]


def init_state(
    param: Any,
    *,
    optim_bits: int = 32,
    min_8bit_size: int = 4096,
    dtype: str | None = None,
    stream: Any = None,
) -> LarsState:
    """A fresh state for ``param`` (no values are read), in ``param``'s array module:
    NumPy arrays for host arrays and CPU tensors, CuPy arrays for CUDA ones.

    With ``optim_bits=8`` a tensor of at least ``min_8bit_size`` elements keeps
    its momentum as 8-bit blockwise codes; smaller tensors keep float32.
    ``dtype='bfloat16'`` declares a uint16 array of bfloat16 bit patterns.
    CUDA state is filled on the stream :func:`lars_update` would step on (``stream``).
    """
    with _launch_scope([param], stream):
        param, declared = _as_array(param, "param")
        fmt = resolve_format(param, dtype or declared)
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
    backend: str | None = None,
    stream: Any = None,
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
        dtype: storage format when the arrays cannot tell (``'bfloat16'`` for
            uint16 bit patterns; torch bfloat16 tensors tell).
        backend: None (default: ``CUPYLARS_BACKEND``, else the native CPU
            backend for host arrays and the CUDA kernels for CUDA arrays),
            ``'reference'``, ``'cpu'`` or ``'cuda'``.
        stream: the CUDA stream of the step (CUDA arrays only): a CuPy stream or
            any object with ``__cuda_stream__`` (a ``torch.cuda.Stream``). By
            default torch CUDA tensors step on torch's current stream of their
            device and CuPy arrays on CuPy's current stream.

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
        backend=backend,
        stream=stream,
    )


def lars_update_many(
    params: Sequence[Any],
    grads: Sequence[Any],
    states: Sequence[LarsState],
    *,
    config: LarsConfig | None = None,
    dtype: str | None = None,
    backend: str | None = None,
    stream: Any = None,
    **hyperparameters: Any,
) -> None:
    """:func:`lars_update` over a list of tensors in one call.

    Takes the keyword arguments of :func:`lars_update`, or a validated
    :class:`LarsConfig` as ``config`` (then no hyperparameter keywords). Each tensor is its own
    layer (its own norms and trust ratio). On CuPy arrays the whole list costs
    a constant number of kernel launches. Everything is validated before any
    tensor is touched; with ``nonfinite='raise'`` no tensor is updated when any
    gradient is non-finite; with ``'skip'`` each tensor skips on its own.

    Repeated calls over the same parameters and states (a training loop) are
    cheap on the host: what was validated about the states is remembered until
    one of their attributes is assigned (``state.momentum = ...``), so a later
    call checks only what can change between steps, the gradients and the
    parameters' type, dtype and shape. A state's arrays changed in place
    (reshaped, made read-only) are not seen: assign them instead.

    Args:
        params: the parameters, each as in :func:`lars_update`; all NumPy (or CPU
            tensors), or all on one CUDA device.
        grads: their gradients, in the same order.
        states: their states, in the same order.
        config: the hyperparameters, validated; or None to build a :class:`LarsConfig`
            from ``hyperparameters``.
        dtype: as in :func:`lars_update`, for every tensor.
        backend: as in :func:`lars_update`.
        stream: as in :func:`lars_update`: by default torch CUDA tensors step on
            torch's current stream of their device, CuPy arrays on CuPy's current stream.
        **hyperparameters: the keyword arguments of :func:`lars_update` (``lr``,
            ``momentum``, ...), when ``config`` is None.

    Raises:
        TypeError, ValueError: on any invalid argument; nothing is modified.
        FloatingPointError: with ``nonfinite='raise'``, naming every tensor whose
            gradient holds NaN or Inf; nothing is modified.
    """
    if config is None:
        cfg = LarsConfig(**hyperparameters)
    elif hyperparameters:
        raise TypeError(f"pass either config or hyperparameters, not both (got {sorted(hyperparameters)})")
    elif not isinstance(config, LarsConfig):
        raise TypeError(f"config must be a LarsConfig, got {type(config).__name__}")
    else:
        cfg = config
    tensors = None
    with _launch_scope(params, stream):
        if not _plain_arrays(params) or not _plain_arrays(grads):
            tensors = [p for p in params if type(p).__module__.split(".")[0] == "torch"]
            params, grads, dtype = _as_arrays(params, grads, dtype)
        _batch_for(params, states, dtype, backend).step(params, grads, states, cfg)  # it holds for them
    if tensors:
        # The arrays wrote the tensors behind autograd's back: tell it, so a backward
        # through a graph that saved the old values fails loudly instead of silently.
        sys.modules["torch"].autograd.graph.increment_version(tensors)


def prepare(
    params: Sequence[Any],
    states: Sequence[LarsState],
    *,
    dtype: str | None = None,
    backend: str | None = None,
) -> PreparedBatch:
    """Validate ``params`` against ``states`` once, for repeated steps.

    Returns a :class:`~cupylars.batch.PreparedBatch`; ``batch.update(params,
    grads, states, config)`` steps it with a :class:`LarsConfig`, checking per
    step only the gradients and that the params and states are unchanged. It
    owns the backend's tables and scratch: batches share nothing. Takes NumPy
    or CuPy arrays (convert other arrays first, e.g. with ``np.from_dlpack``).

    Args:
        params: NumPy arrays, or CuPy arrays on one device.
        states: their states (:func:`init_state`), in the same order.
        dtype: ``'bfloat16'`` when the params are uint16 arrays of bfloat16 bit
            patterns; None otherwise (float32 and float16 arrays tell).
        backend: as in :func:`lars_update`: None (``CUPYLARS_BACKEND``, else the
            default for the arrays), ``'reference'``, ``'cpu'`` or ``'cuda'``. The batch
            is bound to it for its life.
    """
    if not _plain_arrays(params):
        raise TypeError("prepare takes NumPy or CuPy arrays; convert other arrays with from_dlpack")
    return _prepare(params, states, dtype, backend)


def _prepare(
    params: Sequence[Any], states: Sequence[LarsState], dtype: str | None, backend: str | None
) -> PreparedBatch:
    chosen = backends.select(module_of(params) if len(params) else "numpy", backend)
    return batch_module.prepare(params, states, dtype, chosen)


# Recent batches of lars_update_many, keyed by (length, first state's id, dtype and backend
# arguments, the backend a `use` block forces); an entry is used only when it holds for the
# call (PreparedBatch.holds_for), so a reused id costs a validation, no more.
_BATCHES: dict[tuple, PreparedBatch] = {}
_BATCHES_SIZE = 64
_BATCHES_LOCK = threading.Lock()


def _fresh_lock_after_fork() -> None:
    # A forked child has only the thread that forked: a lock another thread held is
    # never released there.
    global _BATCHES_LOCK
    _BATCHES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def _batch_for(
    params: Sequence[Any], states: Sequence[LarsState], dtype: str | None, backend: str | None
) -> PreparedBatch:
    try:
        key: tuple | None = (len(states), id(states[0]) if len(states) else None, dtype, backend,
                             id(backends.forced()))
        hash(key)
    except TypeError:  # an unhashable dtype argument: nothing is remembered
        key = None
    known = None if key is None else _BATCHES.get(key)
    if known is not None and known.holds_for(params, states):
        return known  # the caller may step it without checking again
    made = _prepare(params, states, dtype, backend)
    if key is not None:
        with _BATCHES_LOCK:
            _BATCHES.pop(key, None)
            if len(_BATCHES) >= _BATCHES_SIZE:
                del _BATCHES[next(iter(_BATCHES))]  # the oldest
            _BATCHES[key] = made
    return made


# -- backends ------------------------------------------------------------------------


def backend_for(params: Sequence[Any], backend: str | None = None) -> Backend:
    """The backend an update of ``params`` takes; its ``.reason`` says why."""
    arrays = [_as_array(p, f"params[{i}]")[0] for i, p in enumerate(params)]
    return backends.select(module_of(arrays), backend)


# -- streams ----------------------------------------------------------------------------


def _launch_scope(params: Sequence[Any], stream: Any) -> contextlib.AbstractContextManager[Any]:
    """The stream contract of cupylars/streams.py: torch CUDA tensors on torch's current
    stream of their device, CuPy arrays on CuPy's current stream, ``stream`` over both."""
    first: Any = params[0] if len(params) else None
    if type(first).__module__.split(".")[0] == "torch" and first.device.type == "cuda":
        import cupy

        return streams.torch_device_scope(cupy, first.device.index, stream)
    if stream is None:
        return contextlib.nullcontext()
    if first is None or isinstance(first, np.ndarray) or int(first.__dlpack_device__()[0]) != _KDL_CUDA:
        raise TypeError("stream= applies to CUDA arrays; these params live on the host")
    import cupy

    return streams.on_stream(cupy, stream)


# -- arrays from other frameworks -------------------------------------------------------
_KDL_CPU, _KDL_CUDA = 1, 2
_PLAIN = (np.ndarray,)
_PLAIN_TYPES: set[type] = {np.ndarray}


def _plain_arrays(arrays: Sequence[Any]) -> bool:
    """Whether every array is a NumPy or CuPy array (no conversion needed)."""
    types = set(map(type, arrays))  # a training loop passes one or two types: cheap
    if types <= _PLAIN_TYPES:
        return True
    for kind in types:
        if not (issubclass(kind, np.ndarray) or kind.__module__.startswith("cupy")):
            return False
        _PLAIN_TYPES.add(kind)
    return True


def _as_array(x: Any, name: str) -> tuple[Any, str | None]:
    """``x`` as a NumPy or CuPy array sharing its memory, and the format it declares
    (``'bfloat16'`` for a torch bfloat16 tensor, else None)."""
    if isinstance(x, _PLAIN) or type(x).__module__.startswith("cupy"):
        return x, None
    if not hasattr(x, "__dlpack__"):
        raise TypeError(
            f"{name} is a {type(x).__module__}.{type(x).__name__}; expected an array that speaks DLPack "
            "(NumPy, CuPy, a torch tensor)"
        )
    declared = None
    if type(x).__module__.split(".")[0] == "torch":
        torch = sys.modules["torch"]
        x = x.detach()  # the same memory; DLPack refuses tensors that require grad
        if x.dtype == torch.bfloat16:
            x, declared = x.view(torch.int16), "bfloat16"  # NumPy and CuPy have no bfloat16
    device_type = int(x.__dlpack_device__()[0])
    if device_type == _KDL_CPU:
        array = np.from_dlpack(x)
    elif device_type == _KDL_CUDA:
        import cupy

        array = cupy.from_dlpack(x)
    else:
        raise TypeError(
            f"{name} lives on DLPack device type {device_type}; cupylars updates host and CUDA arrays"
        )
    if declared == "bfloat16":
        array = array.view(np.uint16)
    return array, declared


def _as_arrays(
    params: Sequence[Any], grads: Sequence[Any], dtype: str | None
) -> tuple[list[Any], list[Any], str | None]:
    """Params and grads as NumPy/CuPy arrays (zero-copy), and the dtype argument they imply."""
    converted = [_as_array(p, f"params[{i}]") for i, p in enumerate(params)]
    grad_arrays = [_as_array(g, f"grads[{i}]")[0] for i, g in enumerate(grads)]
    declared = {d for _, d in converted}
    if "bfloat16" in declared:
        if declared != {"bfloat16"}:
            raise TypeError(
                "params mix bfloat16 tensors with other dtypes; "
                "update the bfloat16 ones in a call of their own"
            )
        if dtype not in (None, "bfloat16"):
            raise TypeError(f"dtype={dtype!r} does not match the bfloat16 params")
        dtype = "bfloat16"
    return [a for a, _ in converted], grad_arrays, dtype
