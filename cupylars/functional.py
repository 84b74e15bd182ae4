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

import itertools
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import numpy as np

from . import backends
from .backends import Backend, ReferenceBackend
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
    """A fresh state for ``param`` (no values are read), in ``param``'s array module:
    NumPy arrays for host arrays and CPU tensors, CuPy arrays for CUDA ones.

    With ``optim_bits=8`` a tensor of at least ``min_8bit_size`` elements keeps
    its momentum as 8-bit blockwise codes; smaller tensors keep float32.
    ``dtype='bfloat16'`` declares a uint16 array of bfloat16 bit patterns.
    """
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
        backend: ``'auto'`` (default: ``CUPYLARS_BACKEND``, else the native CPU
            backend for host arrays and the CUDA kernels for CUDA arrays),
            ``'reference'``, ``'cpu'`` or ``'cuda'``.

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
    )


def lars_update_many(
    params: Sequence[Any],
    grads: Sequence[Any],
    states: Sequence[LarsState],
    *,
    config: LarsConfig | None = None,
    dtype: str | None = None,
    backend: str | None = None,
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
    if not _plain_arrays(params) or not _plain_arrays(grads):
        tensors = [p for p in params if type(p).__module__.split(".")[0] == "torch"]
        params, grads, dtype = _as_arrays(params, grads, dtype)
    checked = _checked(params, grads, states, dtype)
    chosen = backends.select(checked.module, backend)
    if isinstance(chosen, ReferenceBackend):
        _check_no_overlap(params, checked.live)  # the others check it when they build tables
    chosen.update_many(params, grads, states, cfg, checked)
    if tensors:
        # The arrays wrote the tensors behind autograd's back: tell it, so a backward
        # through a graph that saved the old values fails loudly instead of silently.
        sys.modules["torch"].autograd.graph.increment_version(tensors)


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
        if not _writeable(param):
            raise ValueError(
                f"params[{i}] is read-only (a NumPy array without the write flag, or an immutable "
                "array such as JAX's): LARS updates parameters in place"
            )
        for name, array in state.arrays().items():
            if not _writeable(array):
                raise ValueError(f"states[{i}].{name} is read-only: the step writes it")
        if id(param) in seen:
            raise ValueError(f"params[{i}] appears twice in one update")
        seen.add(id(param))
        formats.append(fmt)
    return formats


def _writeable(array: Any) -> bool:
    # CuPy arrays have no read-only flag (cupy.ndarray.flags has no `writeable`).
    return getattr(array.flags, "writeable", True)


def _extent(array: Any) -> tuple[int, int]:
    """[first byte, last byte + 1) of an array's elements."""
    if array.size == 0:
        return (0, 0)
    interface = getattr(array, "__array_interface__", None) or array.__cuda_array_interface__
    start = end = int(interface["data"][0])
    for n, stride in zip(array.shape, array.strides):
        reach = (n - 1) * stride
        start, end = (start + reach, end) if reach < 0 else (start, end + reach)
    return (start, end + array.itemsize)


def _check_no_overlap(params: Sequence[Any], live: Sequence[int]) -> None:
    """Two parameters of one call must not share memory: the update would race on it."""
    from .plan import first_overlap, overlap_error

    pair = first_overlap([_extent(params[i]) for i in live])
    if pair is None:
        return
    i, j = live[pair[0]], live[pair[1]]
    a, b = params[i], params[j]
    if array_module(a) is np and not (a.flags.c_contiguous and b.flags.c_contiguous):
        if not np.shares_memory(a, b):  # interleaved strided views share no element
            return
    raise overlap_error(i, j)


_VERSION = attrgetter("_version")
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_TOKENS = itertools.count(1)


@dataclass(eq=False)
class _Checked:
    """What a full validation of (params, grads, states) established.

    Kept by :func:`lars_update_many` and handed to the backend. It applies to a
    later call whose states carry the same versions (no attribute of any
    state was assigned since) and whose params and grads have the same types,
    dtypes and shapes: everything validation reads is then the same. ``token``
    is unique per validated set of states, so a backend may key what it derives
    from the states (the CUDA backend's tables) on it.
    """

    token: int
    versions: list[int]
    param_types: list[type]
    grad_types: list[type]
    dtypes: list[Any]
    shapes: list[tuple[int, ...]]
    formats: list[str]
    module: str  # "numpy" or "cupy"
    live: list[int]  # tensors with at least one element
    nbytes: list[int]  # bytes of each parameter
    has_momentum: bool  # every live state holds its momentum arrays

    def matches(self, params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any]) -> bool:
        """Whether this validation holds for these arguments (False: validate them)."""
        if len(grads) != len(self.versions) or not self.holds_for(params, states):
            return False
        return (
            list(map(type, grads)) == self.grad_types
            and list(map(_SHAPE, grads)) == self.shapes
            and list(map(_DTYPE, grads)) == self.dtypes
        )

    def holds_for(self, params: Sequence[Any], states: Sequence[Any]) -> bool:
        """:meth:`matches` without the gradients."""
        n = len(self.versions)
        if len(params) != n or len(states) != n:
            return False
        # Versions are unique per LarsState, not across every object with a _version.
        if not all(map(is_, map(type, states), repeat(LarsState))):
            return False
        return (
            list(map(_VERSION, states)) == self.versions
            and list(map(type, params)) == self.param_types
            and list(map(_SHAPE, params)) == self.shapes
            and list(map(_DTYPE, params)) == self.dtypes
            and len(set(map(id, params))) == n
        )

    def renew(self, states: Sequence[LarsState]) -> None:
        """After the backend gave every live state its (zeroed) momentum arrays."""
        self.versions = list(map(_VERSION, states))
        self.has_momentum = True
        self.token = next(_TOKENS)


# Recent validations, keyed by (length, first state's id, dtype argument); an entry is
# used only when it matches (_Checked.matches), so a reused id costs a validation, no more.
_CHECKED: dict[tuple, _Checked] = {}
_CHECKED_SIZE = 64
_CHECKED_LOCK = threading.Lock()


def _checked(
    params: Sequence[Any], grads: Sequence[Any], states: Sequence[LarsState], dtype: str | None
) -> _Checked:
    """The validation of these arguments: remembered, or done now (raising on bad input)."""
    key = _memo_key(states, dtype)
    known = None if key is None else _CHECKED.get(key)
    if known is not None and known.matches(params, grads, states):
        return known
    formats = validate_inputs(params, grads, states, dtype)
    module = _module_of(params)
    live = [i for i, p in enumerate(params) if p.size > 0]
    _check_no_overlap(params, live)
    checked = _Checked(
        token=next(_TOKENS),
        versions=list(map(_VERSION, states)),
        param_types=list(map(type, params)),
        grad_types=list(map(type, grads)),
        dtypes=list(map(_DTYPE, params)),
        shapes=list(map(_SHAPE, params)),
        formats=formats,
        module=module,
        live=live,
        nbytes=[int(p.nbytes) for p in params],
        has_momentum=all(states[i].has_momentum for i in live),
    )
    if key is not None:
        with _CHECKED_LOCK:
            _CHECKED.pop(key, None)
            if len(_CHECKED) >= _CHECKED_SIZE:
                del _CHECKED[next(iter(_CHECKED))]  # the oldest
            _CHECKED[key] = checked
    return checked


def _memo_key(states: Sequence[LarsState], dtype: Any) -> tuple | None:
    try:
        key = (len(states), id(states[0]) if len(states) else None, dtype)
        hash(key)
    except TypeError:  # an unhashable dtype argument: nothing is remembered
        return None
    return key


def _lars_update_many_at(
    params: Sequence[Any],
    grad_addresses: Sequence[int],
    states: Sequence[LarsState],
    cfg: LarsConfig,
    dtype: str | None,
) -> bool:
    """:func:`lars_update_many` with each gradient given by its address, for a caller
    that checked the gradients against the params itself (the torch adapter checks
    dtype, shape, device and contiguity), so no array of them need be made.

    Runs only on the backends that take addresses (cpu, cuda, emulated-cuda) and
    only for params and states that a call of :func:`lars_update_many` validated
    and that are unchanged since; otherwise it does nothing and returns False:
    call :func:`lars_update_many` then.
    """
    key = _memo_key(states, dtype)
    known = None if key is None else _CHECKED.get(key)
    if known is None or not known.holds_for(params, states):
        return False
    chosen = backends.select(known.module)
    if not getattr(chosen, "takes_addresses", False):
        return False
    chosen.update_many(params, None, states, cfg, known, grad_addresses=grad_addresses)
    return True


# -- backends ------------------------------------------------------------------------


def _module_of(params: Sequence[Any]) -> str:
    modules = {array_module(p).__name__ for p in params}
    if len(modules) > 1:
        raise TypeError(f"params mix array modules {sorted(modules)}; update each module separately")
    return "cupy" if modules == {"cupy"} else "numpy"


def backend_for(params: Sequence[Any], backend: str | None = None) -> Backend:
    """The backend an update of ``params`` takes; its ``.reason`` says why."""
    arrays = [_as_array(p, f"params[{i}]")[0] for i, p in enumerate(params)]
    return backends.select(_module_of(arrays), backend)


# -- arrays from other frameworks -------------------------------------------------------
_KDL_CPU, _KDL_CUDA = 1, 2
_PLAIN = (np.ndarray,)


def _plain_arrays(arrays: Sequence[Any]) -> bool:
    return all(isinstance(a, _PLAIN) or type(a).__module__.startswith("cupy") for a in arrays)


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
