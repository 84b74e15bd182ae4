"""What cupylars runs on here, and whether it works: ``python -m cupylars``.

:func:`show_config` prints, and :func:`main` prints and returns an exit status:

* the versions of cupylars, Python, NumPy, torch and CuPy (with its CUDA
  runtime and driver), and each GPU with its compute capability;
* each backend (:mod:`cupylars.backends`): whether it can run here, and if
  not, why and what to install;
* the backend NumPy arrays, CuPy arrays and torch tensors take by default;
* a self-test: one step of each backend that runs here against the NumPy
  reference, on a few tensors with 32- and 8-bit state, held to the
  tolerances the test suite holds the kernels to.

The exit status is 1 when the default backend of host arrays, or of a CUDA
device that is present, fails its self-test (or cannot be chosen), else 0.
Nothing here needs torch or CuPy: what is missing is reported, not raised.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from . import __version__, quantization
from .formats import to_float32
from .state import LarsState

__all__ = [
    "SELF_TEST_HYPERPARAMETERS",
    "Outcome",
    "StepRecord",
    "compare_steps",
    "exit_status",
    "main",
    "self_test",
    "show_config",
]

# Every switch on: percentile clipping, the trust ratio, weight decay, momentum and the
# update-norm cap, so that a step goes through all of the kernels' passes.
SELF_TEST_HYPERPARAMETERS: dict[str, Any] = {
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-2,
    "trust_coefficient": 0.02,
    "max_unorm": 0.05,
    "percentile_clipping": 50,
}
# (shape, storage format): with optim_bits=8 and min_8bit_size=1000 the two large tensors
# keep 8-bit momentum and the two small ones float32 momentum; one tensor spans several
# 256-element quantization blocks and a partial last one.
_SELF_TEST_TENSORS = (((5000,), "float32"), ((300,), "float32"), ((40, 130), "float16"), ((7,), "float16"))
_MIN_8BIT_SIZE = 1000
_INSTALL_CUPY = 'pip install "cupylars[cuda12]" (CUDA 12) or "cupylars[cuda13]" (CUDA 13)'


# ---- the self-test -----------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """Host copies of the tensors and states of one moment of the self-test."""

    params: list[np.ndarray]  # in their storage format
    states: list[LarsState]  # NumPy arrays


@dataclass
class Outcome:
    """A self-test verdict: ``ok`` None when the test did not run (``detail`` says why)."""

    ok: bool | None
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {True: "PASS", False: "FAIL", None: "not run"}[self.ok]


def _to_host(a: Any) -> np.ndarray:
    return np.array(a.get() if type(a).__module__.split(".")[0] == "cupy" else a)  # a copy


def _copy_state(state: LarsState, xp: Any = np) -> LarsState:
    """``state`` with its arrays copied into ``xp`` (NumPy or CuPy)."""
    data = state.to_dict()
    arrays = state.arrays()
    return LarsState.from_dict({k: xp.array(_to_host(v)) if k in arrays else v for k, v in data.items()})


def _host_record(params: Sequence[Any], states: Sequence[LarsState]) -> StepRecord:
    return StepRecord([_to_host(p) for p in params], [_copy_state(s) for s in states])


def _ulp(values: np.ndarray, fmt: str) -> np.ndarray:
    """One unit in the last place of the storage format, at each value."""
    mantissa = {"float32": 23, "float16": 10, "bfloat16": 7}[fmt]
    tiny = {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}[fmt]
    exponent = np.floor(np.log2(np.maximum(np.abs(values), 1e-300)))
    return np.maximum(2.0 ** (exponent - mantissa), tiny)


def _values(array: np.ndarray, fmt: str) -> np.ndarray:
    return to_float32(np, array, fmt).astype(np.float64).ravel()


def _param_problem(got: np.ndarray, want: np.ndarray, before: np.ndarray, fmt: str) -> str | None:
    """The parameters agree to one unit of the storage format plus float32 rounding of the update."""
    g, w, b = _values(got, fmt), _values(want, fmt), _values(before, fmt)
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if not np.array_equal(np.isfinite(g), np.isfinite(w)):
        return "non-finite values where the reference has finite ones (or the reverse)"
    finite = np.isfinite(w)
    g, w, b = g[finite], w[finite], b[finite]
    largest_update = np.max(np.abs(w - b), initial=0.0)
    bad = np.abs(g - w) > _ulp(w, fmt) + 1e-5 * largest_update + 1e-30
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return f"{int(bad.sum())} of {bad.size} values differ, e.g. {g[i]!r} where the reference has {w[i]!r}"
    return None


def _codes_problem(got: LarsState, want: LarsState, m_raw: np.ndarray, m_scale: float) -> str | None:
    """8-bit codes agree, except by one code where the unquantized m lies within float32
    rounding of the boundary between the two codes."""
    got_codes = got.codes.astype(np.int64).ravel()
    want_codes = want.codes.astype(np.int64).ravel()
    gap = np.abs(got_codes - want_codes)
    if gap.max(initial=0) > 1:
        return f"8-bit codes differ by up to {int(gap.max())} codes"
    where = np.flatnonzero(gap)
    if where.size:
        book = quantization.dynamic_map().astype(np.float64)
        lower = np.minimum(got_codes, want_codes)[where]
        boundary = (book[lower] + book[lower + 1]) / 2
        scale = np.repeat(want.absmax.astype(np.float64), quantization.BLOCK_SIZE)[: got_codes.size][where]
        slack = 4e-6 * m_scale / scale + 1e-6
        far = np.abs(m_raw[where] / scale - boundary) > slack
        if far.any():
            return f"{int(far.sum())} 8-bit codes differ away from a rounding boundary"
    if not np.allclose(got.absmax, want.absmax, rtol=1e-6, atol=1e-6 * m_scale):
        return "8-bit block scales (absmax) differ"
    return None


def _state_problem(
    got: LarsState, want: LarsState, before: LarsState, m_raw: np.ndarray | None, momentum: float
) -> str | None:
    if (got.step, got.skipped) != (want.step, want.skipped):
        return f"step/skipped {got.step}/{got.skipped}, expected {want.step}/{want.skipped}"
    if not np.allclose(got.history, want.history, rtol=2e-6, atol=0):
        return "gradient-norm history differs"
    if got.is_8bit != want.is_8bit or got.has_momentum != want.has_momentum:
        return "momentum storage differs"
    if not want.has_momentum:
        return None
    # m = mu m_old + (1 - dampening) d rounds at the size of its terms, which can be far
    # larger than m itself where they cancel.
    old = before.momentum_buffer()
    carried = 0.0 if old is None else np.abs(momentum * old.astype(np.float64).ravel())
    if want.is_8bit:
        if m_raw is None:
            return "no unquantized momentum to judge 8-bit codes against"
        terms = np.abs(m_raw) + 2 * carried
        return _codes_problem(got, want, m_raw, float(np.max(terms, initial=0.0)) + 1e-30)
    m_got = got.momentum.astype(np.float64).ravel()
    m_want = want.momentum.astype(np.float64).ravel()
    scale = float(np.max(np.abs(m_want) + 2 * carried, initial=0.0)) + 1e-30
    if not np.allclose(m_got, m_want, rtol=0, atol=1e-6 * scale):
        return "momentum differs"
    return None


def compare_steps(
    before: StepRecord,
    want: StepRecord,
    got: StepRecord,
    m_raw: Sequence[np.ndarray | None],
    momentum: float,
) -> list[str]:
    """What differs between a backend's step (``got``) and the reference's (``want``) from
    ``before``, beyond float32 rounding; empty when they agree.

    ``m_raw``: per tensor, the reference's float32 momentum before 8-bit quantization (None
    for 32-bit state). The tolerances are those of the test suite (tests/kernel_checks.py).
    """
    problems = []
    for i, (g, w, b, s_got, s_want, s_before, raw) in enumerate(
        zip(got.params, want.params, before.params, got.states, want.states, before.states, m_raw)
    ):
        fmt = s_want.param_format
        for what, problem in (
            ("param", _param_problem(g, w, b, fmt)),
            ("state", _state_problem(s_got, s_want, s_before, raw, momentum)),
        ):
            if problem is not None:
                bits = 8 if s_want.is_8bit else 32
                problems.append(f"tensor {i} ({fmt}, {bits}-bit state) {what}: {problem}")
    return problems


def _self_test_problem(seed: int = 0) -> tuple[StepRecord, list[np.ndarray]]:
    """The starting point (after one reference step, so momentum and history are filled)
    and the gradients of the tested step."""
    from . import functional as F

    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape).astype(fmt) for shape, fmt in _SELF_TEST_TENSORS]
    states = [F.init_state(p, optim_bits=8, min_8bit_size=_MIN_8BIT_SIZE) for p in params]
    grads = [[(0.1 * rng.standard_normal(p.shape)).astype(p.dtype) for p in params] for _ in range(2)]
    F.lars_update_many(params, grads[0], states, backend="reference", **SELF_TEST_HYPERPARAMETERS)
    return StepRecord(params, states), grads[1]


def _reference_step(before: StepRecord, grads: Sequence[np.ndarray]) -> tuple[StepRecord, list[Any]]:
    """The reference's step from ``before``, and its momentum before quantization: a twin
    with 32-bit state holding the dequantized 8-bit momentum takes the same step (the
    reference dequantizes before it computes) and keeps m unquantized."""
    from . import functional as F

    def run(states: list[LarsState]) -> StepRecord:
        params = [p.copy() for p in before.params]
        F.lars_update_many(params, grads, states, backend="reference", **SELF_TEST_HYPERPARAMETERS)
        return StepRecord(params, states)

    want = run([_copy_state(s) for s in before.states])
    twins = []
    for s in before.states:
        data = {k: np.array(v) for k, v in s.to_dict().items()}
        if s.is_8bit:
            data["momentum"] = s.momentum_buffer().astype(np.float32)
            data["is_8bit"] = np.asarray(False)
            del data["codes"], data["absmax"]
        twins.append(LarsState.from_dict(data))
    unquantized = run(twins)
    m_raw = [
        t.momentum.astype(np.float64).ravel() if s.is_8bit else None
        for t, s in zip(unquantized.states, before.states)
    ]
    return want, m_raw


#: A backend's step for the self-test: host params, gradients and states in, host copies out.
Stepper = Callable[[list[np.ndarray], list[np.ndarray], list[LarsState]], StepRecord]


def self_test(step: Stepper, seed: int = 0) -> Outcome:
    """Run ``step`` from the self-test's starting point and judge it against the reference."""
    before, grads = _self_test_problem(seed)
    want, m_raw = _reference_step(before, grads)
    try:
        states = [_copy_state(s) for s in before.states]
        got = step([p.copy() for p in before.params], [g.copy() for g in grads], states)
    except Exception as exc:  # a backend that fails to run fails its test, with the reason
        return Outcome(False, f"{type(exc).__name__}: {_first_line(exc)}")
    problems = compare_steps(before, want, got, m_raw, SELF_TEST_HYPERPARAMETERS["momentum"])
    if problems:
        return Outcome(False, problems[0], problems)
    shapes = ", ".join(f"{fmt}{list(shape)}" for shape, fmt in _SELF_TEST_TENSORS)
    return Outcome(True, f"one step of {shapes}, 32- and 8-bit state, matches the reference")


def _host_stepper(**where: Any) -> Stepper:
    from . import functional as F

    def step(params: list[np.ndarray], grads: list[np.ndarray], states: list[LarsState]) -> StepRecord:
        F.lars_update_many(params, grads, states, **where, **SELF_TEST_HYPERPARAMETERS)
        return _host_record(params, states)

    return step


def _emulated_stepper(
    params: list[np.ndarray], grads: list[np.ndarray], states: list[LarsState]
) -> StepRecord:
    from . import functional as F
    from .testing import emulated_cuda

    with emulated_cuda():
        F.lars_update_many(params, grads, states, **SELF_TEST_HYPERPARAMETERS)
    return _host_record(params, states)


def _cuda_stepper(device: int) -> Stepper:
    def step(params: list[np.ndarray], grads: list[np.ndarray], states: list[LarsState]) -> StepRecord:
        import cupy

        from . import functional as F

        with cupy.cuda.Device(device):
            on_device = [cupy.asarray(p) for p in params]
            device_states = [_copy_state(s, cupy) for s in states]
            device_grads = [cupy.asarray(g) for g in grads]
            F.lars_update_many(on_device, device_grads, device_states, **SELF_TEST_HYPERPARAMETERS)
            cupy.cuda.get_current_stream().synchronize()
            return _host_record(on_device, device_states)

    return step


def exit_status(default_outcomes: Sequence[Outcome]) -> int:
    """1 when a default backend (of host arrays, of each CUDA device present) failed, else 0."""
    return 1 if any(o.ok is False for o in default_outcomes) else 0


# ---- what is installed -------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


@dataclass
class Environment:
    """What the report found out about the machine (filled by :func:`_inspect`)."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    cupy_error: str | None = None  # why CuPy cannot run kernels here (None: it can)
    gpus: list[str] = field(default_factory=list)  # CuPy's devices, "name, compute capability X.Y"
    torch: Any = None  # the torch module, when it imports
    torch_cuda: bool = False


def _torch_line(env: Environment) -> str:
    try:
        import torch
    except ImportError as exc:
        return "not installed" if exc.name == "torch" else f"broken: {_first_line(exc)}"
    except Exception as exc:  # a broken install says what broke
        return f"broken: {type(exc).__name__}: {_first_line(exc)}"
    env.torch = torch
    try:
        env.torch_cuda = bool(torch.cuda.is_available())
    except Exception:  # a torch whose CUDA probe fails has no usable CUDA
        env.torch_cuda = False
    cuda = torch.version.cuda
    if cuda is None:
        return f"{torch.__version__} (built without CUDA)"
    devices = f"{torch.cuda.device_count()} device(s)" if env.torch_cuda else "no CUDA device usable"
    return f"{torch.__version__} (built for CUDA {cuda}; {devices})"


def _cupy_line(env: Environment) -> str:
    try:
        import cupy
    except ImportError as exc:
        env.cupy_error = f"CuPy is not installed: {_INSTALL_CUPY}"
        return "not installed" if exc.name == "cupy" else f"broken: {_first_line(exc)}"
    except Exception as exc:
        env.cupy_error = f"CuPy does not import ({type(exc).__name__}: {_first_line(exc)})"
        return f"broken: {type(exc).__name__}: {_first_line(exc)}"
    parts = [cupy.__version__]
    runtime = cupy.cuda.runtime
    try:
        parts.append(f"CUDA runtime {_cuda_version(runtime.runtimeGetVersion())}")
    except Exception as exc:
        parts.append(f"CUDA runtime: {_first_line(exc)}")
    try:
        driver = int(runtime.driverGetVersion())
        parts.append(f"driver {_cuda_version(driver)}" if driver else "no CUDA driver")
    except Exception as exc:
        parts.append(f"driver: {_first_line(exc)}")
    try:
        count = int(runtime.getDeviceCount())
    except Exception as exc:
        env.cupy_error = f"CuPy finds no CUDA device ({type(exc).__name__}: {_first_line(exc)})"
        count = 0
    for i in range(count):
        try:
            props = runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            env.gpus.append(f"{name}, compute capability {props['major']}.{props['minor']}")
        except Exception as exc:
            env.gpus.append(f"unreadable ({_first_line(exc)})")
    if count == 0 and env.cupy_error is None:
        env.cupy_error = "CuPy finds no CUDA device"
    return ", ".join(parts)


def _inspect() -> Environment:
    env = Environment()
    env.lines.append(("cupylars", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"))
    env.lines.append(("Python", f"{platform.python_version()} ({sys.executable})"))
    env.lines.append(("NumPy", np.__version__))
    env.lines.append(("torch", _torch_line(env)))
    env.lines.append(("CuPy", _cupy_line(env)))
    if env.gpus:
        env.lines += [(f"GPU {i}", gpu) for i, gpu in enumerate(env.gpus)]
    elif env.torch_cuda and env.torch is not None:
        for i in range(env.torch.cuda.device_count()):
            major, minor = env.torch.cuda.get_device_capability(i)
            gpu = f"{env.torch.cuda.get_device_name(i)}, compute capability {major}.{minor} (seen by torch)"
            env.lines.append((f"GPU {i}", gpu))
    else:
        env.lines.append(("GPUs", "none found"))
    return env


# ---- the backends ------------------------------------------------------------------------------------
@dataclass
class BackendReport:
    name: str
    available: bool
    lines: list[str]  # what it is, or why it cannot run and what to install
    stepper: Stepper | None = None


def _native_cpu() -> BackendReport:
    from . import _cache, native

    lines = []
    flags = [*native.FLAGS, *shlex.split(os.environ.get("CUPYLARS_CXXFLAGS", ""))]
    folder = _cache.cache_root("cpu")
    try:
        compiler = native._compiler()
    except native.NativeUnavailableError as exc:
        compiler = None
        lines.append(f"compiler: {exc}")
    if compiler is not None:
        lines.append(f"compiler: {compiler} (CUPYLARS_CXX chooses another), flags: {' '.join(flags)}")
    lines.append(f"cache folder: {folder} (CUPYLARS_CACHE_DIR moves it)")
    cached = set(folder.glob("*.so")) if folder.is_dir() else set()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            native.library()
        except native.NativeUnavailableError as exc:
            lines.append(f"cannot run here: {_first_line(exc)}")
            lines.append(
                "to get it: install a C++ compiler with _Float16 support (g++ >= 12) or point "
                "CUPYLARS_CXX at one; meanwhile host arrays take the NumPy reference"
            )
            return BackendReport("cpu", False, lines)
    seconds = time.perf_counter() - start
    path = native.library_path()
    for warning in seen:
        lines.append(f"warning: {warning.message}")
    if path is not None:
        in_cache = path.parent == folder
        trust = "trusted" if _cache.trusted(path) else "NOT trusted"
        where = "in the cache folder" if in_cache else "outside the cache folder, which failed its checks"
        lines.append(f"library: {path} ({where}; {trust}: owned by this user, writable by nobody else)")
    compiled = path is not None and path not in cached
    lines.append(
        f"compiled now in {seconds:.1f} s (later runs load it)" if compiled else "loaded from the cache"
    )
    return BackendReport("cpu", True, lines, _host_stepper(backend="cpu"))


def _cuda(env: Environment) -> list[BackendReport]:
    if env.cupy_error is not None:
        why = env.cupy_error
        if "not installed" not in why:
            why += "; it needs an NVIDIA GPU, its driver and a CuPy for that driver's CUDA: " + _INSTALL_CUPY
        return [BackendReport("cuda", False, [f"cannot run here: {why}"])]
    return [
        BackendReport(
            f"cuda (GPU {i})",
            True,
            [f"{gpu}: kernels compiled by cupy.RawModule at first use"],
            _cuda_stepper(i),
        )
        for i, gpu in enumerate(env.gpus)
    ]


def _emulated() -> BackendReport:
    from . import _emulator

    cxx = os.environ.get("CUPYLARS_EMULATOR_CXX", "g++")
    try:
        banner = _emulator._compiler_id(cxx).split("|")[0]
    except _emulator.EmulatorCompileError as exc:
        return BackendReport(
            "emulated-cuda", False, [f"cannot run here: {_first_line(exc)}", "to get it: install g++ (>= 12)"]
        )
    what = f"compiler: {cxx} ({banner}); the CUDA kernels run on the CPU, for tests (testing.emulated_cuda())"
    return BackendReport("emulated-cuda", True, [what], _emulated_stepper)


def _reference() -> BackendReport:
    return BackendReport(
        "reference", True, [f"NumPy {np.__version__}: the specification the others are tested against"]
    )


# ---- default backends --------------------------------------------------------------------------------
@dataclass
class Default:
    what: str  # "NumPy arrays", ...
    backend: str | None  # the backend's name; None when none can be chosen
    detail: str
    decides_exit: bool  # host arrays, and CUDA arrays where a device is present


def _defaults(env: Environment) -> list[Default]:
    from . import backends

    out = []
    try:
        host = backends.select("numpy")
        out.append(Default("NumPy arrays", host.name, host.reason, True))
    except Exception as exc:
        why = f"no backend: {type(exc).__name__}: {_first_line(exc)}"
        out.append(Default("NumPy arrays", None, why, True))
    try:
        gpu = backends.select("cupy")
        where = "" if env.cupy_error is None else " (it cannot run here: see Backends)"
        out.append(Default("CuPy arrays", gpu.name, gpu.reason + where, env.cupy_error is None))
    except ImportError:
        out.append(Default("CuPy arrays", None, f"CuPy is not installed: {_INSTALL_CUPY}", False))
    except Exception as exc:
        out.append(Default("CuPy arrays", None, f"{type(exc).__name__}: {_first_line(exc)}", False))
    if env.torch is None:
        why = 'torch is not installed: pip install "cupylars[torch]"'
        out.append(Default("torch tensors", None, why, False))
        return out
    from . import functional as F

    devices = ["cpu"] + (["cuda"] if env.torch_cuda else [])
    for device in devices:
        what = f"torch {device.upper()} tensors"
        try:
            chosen = F.backend_for([env.torch.zeros(1, device=device)])
            out.append(Default(what, chosen.name, chosen.reason, device == "cuda"))
        except Exception as exc:
            out.append(Default(what, None, f"{type(exc).__name__}: {_first_line(exc)}", device == "cuda"))
    if not env.torch_cuda:
        out.append(Default("torch CUDA tensors", None, "torch sees no CUDA device here", False))
    return out


def _default_outcome(default: Default, outcomes: dict[str, Outcome]) -> Outcome:
    """The self-test verdict of the backend a default names."""
    if default.backend is None:
        return Outcome(False, default.detail)
    if default.backend == "reference":
        return Outcome(True, "the reference itself")
    if default.backend == "cuda":
        gpu_runs = [o for name, o in outcomes.items() if name.startswith("cuda")]
        if not gpu_runs:
            return Outcome(False, "no CUDA self-test ran")
        return next((o for o in gpu_runs if o.ok is not True), gpu_runs[0])
    return outcomes.get(default.backend, Outcome(False, f"backend {default.backend!r} was not self-tested"))


# ---- the report --------------------------------------------------------------------------------------
def _table(rows: Sequence[tuple[str, str]], out: TextIO, indent: str = "  ") -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        out.write(f"{indent}{key.ljust(width)}  {value}\n")


def report(out: TextIO | None = None, *, run_self_test: bool = True) -> int:
    """Write the whole report to ``out`` (default stdout); returns the exit status."""
    out = out or sys.stdout
    with warnings.catch_warnings():
        # The report says what a fallback warning would say (the backend lines below).
        warnings.filterwarnings("ignore", message="cupylars:", category=RuntimeWarning)
        return _report(out, run_self_test)


def _report(out: TextIO, run_self_test: bool) -> int:
    env = _inspect()
    out.write("Versions\n")
    _table(env.lines, out)

    out.write("\nBackends\n")
    reports = [_native_cpu(), *_cuda(env), _emulated(), _reference()]
    width = max(len(r.name) for r in reports)
    for r in reports:
        state = "available" if r.available else "unavailable"
        out.write(f"  {r.name.ljust(width)}  {state}\n")
        for line in r.lines:
            out.write(f"  {' ' * width}    {line}\n")

    out.write("\nDefault backends\n")
    defaults = _defaults(env)
    _table([(d.what, f"{d.backend or '-'}: {d.detail}") for d in defaults], out)

    outcomes: dict[str, Outcome] = {}
    if run_self_test:
        out.write("\nSelf-test against the reference (tolerances of the test suite)\n")
        for r in reports:
            if r.name == "reference":
                outcome = Outcome(None, "is the reference")
            elif r.stepper is None:
                outcome = Outcome(None, "unavailable (above)")
            else:
                outcome = self_test(r.stepper)
            outcomes[r.name] = outcome
            out.write(f"  {r.name.ljust(width)}  {outcome.label}: {outcome.detail}\n")
            for problem in outcome.problems[1:5]:
                out.write(f"  {' ' * width}    {problem}\n")

    deciding = [(d, _default_outcome(d, outcomes)) for d in defaults if d.decides_exit]
    if not run_self_test:
        deciding = [(d, Outcome(None if d.backend else False, d.detail)) for d, _ in deciding]
    status = exit_status([o for _, o in deciding])
    failed = [f"{d.what} ({d.backend or 'none'}): {o.detail}" for d, o in deciding if o.ok is False]
    out.write("\n" + ("Result: OK" if status == 0 else "Result: FAILED: " + "; ".join(failed)) + "\n")
    out.flush()
    return status


def show_config(file: TextIO | None = None, *, self_test: bool = True) -> None:
    """Print versions, backends, the default backends and (``self_test``) a one-step check
    of each backend against the reference; ``python -m cupylars`` prints the same."""
    report(file, run_self_test=self_test)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cupylars",
        description="Show what cupylars runs on here (versions, backends, defaults) and check each "
        "backend against the NumPy reference. Exits 1 when the default backend of host arrays or of "
        "a CUDA device present fails its check.",
    )
    parser.add_argument("--no-self-test", action="store_true", help="skip the one-step check of each backend")
    args = parser.parse_args(argv)
    return report(run_self_test=not args.no_self_test)
