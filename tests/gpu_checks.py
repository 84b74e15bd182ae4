"""The GPU checks, without pytest or hypothesis: the kernels on a GPU (CuPy arrays)
against the NumPy reference, determinism, CUDA-graph capture, and the device
against the CPU emulator bit for bit.

tests/test_kernels_gpu.py runs them under pytest; scripts/gpu_check.py runs them on
an image that has only NumPy, CuPy (and torch for the benchmark). Each check is a
plain function of the ``cupy`` module that raises AssertionError on a mismatch and
:class:`Skip` when it cannot run here.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from kernel_checks import (
    CONFIGS,
    FULL,
    _assert_param_close,
    _assert_state_close,
    dtype_arg,
    random_grad,
    reference_step,
)
from kernel_checks import random_problem as _random_problem

from cupylars import backends, cuda, plan
from cupylars import functional as F
from cupylars.state import LarsState

SHAPES = [(1,), (255,), (257,), (4097,), (33, 65), (70000,)]
FORMATS = ["float32", "float16", "bfloat16"]


class Skip(Exception):  # noqa: N818 (a signal that a check cannot run, not an error)
    """The check cannot run here (the message says why)."""


def load_cupy() -> tuple[Any, str | None]:
    """``(cupy, None)`` when CuPy and a CUDA device are usable, else ``(None, why not)``."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising on import
        return None, f"CuPy not available ({type(e).__name__}: {e})"
    try:
        available = bool(cupy.cuda.is_available())
    except Exception as e:  # a broken driver install raises instead of answering False
        return None, f"no CUDA device available to CuPy ({type(e).__name__}: {e})"
    if not available:
        return None, "no CUDA device available to CuPy"
    return cupy, None


@contextlib.contextmanager
def chunk_size(chunk: int) -> Iterator[None]:
    """Launch with ``chunk`` elements per block (several chunks from small tensors)."""
    before = plan.CHUNK_SIZE
    plan.CHUNK_SIZE = chunk
    try:
        yield
    finally:
        plan.CHUNK_SIZE = before


def _on(state: LarsState, move: Callable[[Any], Any]) -> LarsState:
    """A copy of ``state`` with its arrays passed through ``move`` (shape etc. kept)."""
    meta = ("shape", "param_format", "is_8bit")
    return LarsState.from_dict({k: v if k in meta else move(v) for k, v in state.to_dict().items()})


def _fmt_of(p: np.ndarray, dtype: str | None) -> str:
    return "bfloat16" if dtype == "bfloat16" else str(p.dtype)


def gpu_step_and_compare(cp, d_params, grads, d_states, hp, dtype, what=""):
    """One GPU step (host grads copied over) against the reference from the same state."""
    h_params = [cp.asnumpy(p) for p in d_params]
    prev = [_on(s, cp.asnumpy) for s in d_states]
    ref_params, ref_states, raw_by_state = reference_step(h_params, grads, prev, hp, dtype)
    raw_m = [raw_by_state.get(id(s)) for s in ref_states]
    F.lars_update_many(d_params, [cp.asarray(g) for g in grads], d_states, dtype=dtype, **hp)
    for i, p in enumerate(d_params):
        fmt = _fmt_of(h_params[i], dtype)
        where = f"{what} tensor {i} {fmt}"
        _assert_param_close(cp.asnumpy(p), ref_params[i], h_params[i], fmt, where)
        _assert_state_close(_on(d_states[i], cp.asnumpy), ref_states[i], prev[i], hp, where, raw_m[i])


def _problem(cp, seed, shapes, fmt, bits, min_8bit_size=0):
    rng = np.random.default_rng(seed)
    params = [_random_problem(rng, s, fmt) for s in shapes]
    states = [
        F.init_state(p, optim_bits=bits, min_8bit_size=min_8bit_size, dtype=dtype_arg(fmt)) for p in params
    ]
    return rng, [cp.asarray(p) for p in params], [_on(s, cp.asarray) for s in states]


# ---- the checks ---------------------------------------------------------------------------------
def check_every_shape(cp, fmt: str, bits: int) -> None:
    rng, params, states = _problem(cp, zlib.crc32(f"{fmt}{bits}".encode()), SHAPES, fmt, bits)
    for t in range(5):
        grads = [random_grad(rng, p.shape, fmt) for p in params]
        gpu_step_and_compare(cp, params, grads, states, FULL, dtype_arg(fmt), f"step {t}")
    assert all(s.step == 5 for s in states)


def check_switch(cp, name: str) -> None:
    with chunk_size(1024):
        rng, params, states = _problem(cp, len(name), [(1,), (300,), (5000,), (33, 65)], "float32", 8, 1000)
        for t in range(4):
            grads = [random_grad(rng, p.shape, "float32") for p in params]
            gpu_step_and_compare(cp, params, grads, states, CONFIGS[name], None, f"{name} step {t}")


def check_skip_and_raise(cp) -> None:
    rng, params, states = _problem(cp, 3, [(600,), (3000,)], "float32", 32)
    grads = [random_grad(rng, p.shape, "float32") for p in params]
    gpu_step_and_compare(cp, params, grads, states, FULL, None, "warm-up")
    grads[1] = grads[1].copy()
    grads[1][7] = np.nan
    before = cp.asnumpy(params[1])
    try:
        F.lars_update_many(params, [cp.asarray(g) for g in grads], states, **{**FULL, "nonfinite": "raise"})
    except FloatingPointError as e:
        assert "[1]" in str(e), f"the error does not name tensor [1]: {e}"
    else:
        raise AssertionError("nonfinite='raise' did not raise on a NaN gradient")
    assert states[0].step == 1 and states[1].step == 1
    gpu_step_and_compare(cp, params, grads, states, FULL, None, "skip")
    np.testing.assert_array_equal(cp.asnumpy(params[1]), before)
    assert (states[0].step, states[1].step, states[1].skipped) == (2, 1, 1)


def _run_steps(cp, seed, fmt, bits, steps=4):
    rng, params, states = _problem(cp, seed, [(1,), (1000,), (70000,), (33, 65)], fmt, bits, 500)
    grads = [[cp.asarray(random_grad(rng, p.shape, fmt)) for p in params] for _ in range(steps)]
    for g in grads:
        F.lars_update_many(params, g, states, dtype=dtype_arg(fmt), **FULL)
    return params, states


def check_two_runs_are_bitwise_identical(cp, bits: int) -> None:
    (p1, s1), (p2, s2) = _run_steps(cp, 11, "bfloat16", bits), _run_steps(cp, 11, "bfloat16", bits)
    for a, b in zip(p1, p2):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes()
    for a, b in zip(s1, s2):
        for k, arr in a.arrays().items():
            assert cp.asnumpy(arr).tobytes() == cp.asnumpy(getattr(b, k)).tobytes(), k


def _capture_problem(cp, seed: int):
    """A side stream, three 8-bit tensors on the device with gradients, and twins of them."""
    stream = cp.cuda.Stream(non_blocking=True)
    if not hasattr(stream, "begin_capture"):
        raise Skip("this CuPy has no stream capture")
    rng, params, states = _problem(cp, seed, [(3,), (5000,), (70000,)], "float32", 8, 1000)
    grads = [cp.asarray(random_grad(rng, p.shape, "float32")) for p in params]
    return stream, params, states, grads, [p.copy() for p in params], [_on(s, cp.copy) for s in states]


def check_graph_capture(cp) -> None:
    """A step after the first (tables cached) captures into a CUDA graph: any host
    synchronisation or upload inside it would break the capture."""
    stream, params, states, grads, twin_p, twin_s = _capture_problem(cp, 5)
    with stream:
        F.lars_update_many(params, grads, states, **FULL)  # first step: builds and uploads the tables
        stream.synchronize()
        stream.begin_capture()
        F.lars_update_many(params, grads, states, **FULL)
        graph = stream.end_capture()
        graph.launch()
        graph.launch()
    stream.synchronize()
    assert all(s.step == 3 for s in states)
    for _ in range(3):  # the same three steps without a graph, on the default stream
        F.lars_update_many(twin_p, grads, twin_s, **FULL)
    for a, b in zip(params, twin_p):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes()


def check_graph_capture_other_stream(cp) -> None:
    """Tables and scratch built on the default stream serve a capture on another stream
    (they are kept per device), and the graph reads a device lr at each replay."""
    stream, params, states, grads, twin_p, twin_s = _capture_problem(cp, 7)
    cfg = F.LarsConfig(lr=0.1, **FULL)
    lr = cp.asarray([0.1])
    batch = F.prepare(params, states)
    batch.update(params, grads, states, cfg, lr_device=lr)  # default stream: tables, scratch
    cp.cuda.Device().synchronize()
    with stream:
        stream.begin_capture()
        batch.update(params, grads, states, cfg, lr_device=lr)
        graph = stream.end_capture()
        for scale in (0.5, 0.25):
            lr.fill(0.1 * scale)
            graph.launch()
    stream.synchronize()
    for scale in (1.0, 0.5, 0.25):
        F.lars_update_many(twin_p, grads, twin_s, **dict(FULL, lr=0.1 * scale))
    for a, b in zip(params, twin_p):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes()


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError as e:
        raise Skip(f"torch is not importable ({e})") from None
    if not torch.cuda.is_available():
        raise Skip("torch has no CUDA device")
    return torch


def check_torch_graph_capture(cp, bits: int, foreach: bool) -> None:
    """The adapter under torch.cuda.graph: warm-up on a side stream, one captured step,
    replays with new gradient values and a scheduler-style lr, against eager steps."""
    torch = _torch_cuda()
    from cupylars.optim import LARS

    shapes = [(70000,), (33, 65), (5,)]
    lrs = [0.1, 0.1, 0.1, 0.05, 0.2, 0.03]
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in lrs]

    def make(capturable: bool):
        g0 = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g0).cuda()) for s in shapes]
        lr = torch.tensor(lrs[0], device="cuda")
        groups = [{"params": params[:2]}, {"params": params[2:], "momentum": 0.5, "percentile_clipping": 90}]
        opt = LARS(groups, lr=lr, momentum=0.9, optim_bits=bits, min_8bit_size=1000, max_unorm=0.05,
                   trust_coefficient=0.02, foreach=foreach, capturable=capturable)
        return params, lr, opt

    a_params, a_lr, a_opt = make(True)
    for p in a_params:
        p.grad = torch.zeros_like(p)

    def load(params, lr, i):
        for p, g in zip(params, grads[i]):
            p.grad.copy_(g)
        lr.fill_(lrs[i])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            load(a_params, a_lr, i)
            a_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a_opt.step()
    for i in range(3, len(lrs)):
        load(a_params, a_lr, i)
        graph.replay()
    b_params, b_lr, b_opt = make(False)
    for p in b_params:
        p.grad = torch.zeros_like(p)
    for i in range(len(lrs)):
        load(b_params, b_lr, i)
        b_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(a_params, b_params):
        assert torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32))
    for p, q in zip(a_params, b_params):
        for k, v in a_opt.state[p].items():
            assert torch.equal(v, b_opt.state[q][k]), k


def check_torch_capture_fresh_grads(cp, bits: int) -> None:
    """torch's whole-network capture: zero_grad(set_to_none=True) before the capture, then
    forward, backward (which allocates .grad from the graph's pool) and step inside
    torch.cuda.graph; replays on new inputs equal eager steps bit for bit, and so does an
    eager step after them with gradients outside the graph."""
    torch = _torch_cuda()
    from cupylars.optim import LARS

    steps, warmup = 6, 3
    shapes = [(70000,), (33, 65), (5,)]
    gen = torch.Generator().manual_seed(3)
    # Elementwise forward passes (gradients x + 2 p y), so that the captured and the eager
    # backward compute the same bits whatever kernels a matmul would pick under capture.
    xs = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in range(steps + 1)]
    ys = [[torch.rand(s, generator=gen).cuda() for s in shapes] for _ in range(steps + 1)]
    lrs = [0.1, 0.1, 0.1, 0.05, 0.2, 0.03, 0.07]

    def make(capturable: bool):
        g0 = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g0).cuda()) for s in shapes]
        lr = torch.tensor(lrs[0], device="cuda")
        groups = [{"params": params[:2]}, {"params": params[2:], "momentum": 0.5, "percentile_clipping": 90}]
        opt = LARS(groups, lr=lr, momentum=0.9, optim_bits=bits, min_8bit_size=1000, max_unorm=0.05,
                   trust_coefficient=0.02, capturable=capturable)
        return params, lr, opt

    def loss_of(params, x, y):
        return sum(((p * xi) + (p * p * yi)).sum() for p, xi, yi in zip(params, x, y))

    a_params, a_lr, a_opt = make(True)
    static_x = [x.clone() for x in xs[0]]
    static_y = [y.clone() for y in ys[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            a_opt.zero_grad(set_to_none=True)
            a_lr.fill_(lrs[i])
            loss_of(a_params, xs[i], ys[i]).backward()
            a_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    a_opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_of(a_params, static_x, static_y).backward()
        a_opt.step()
    for i in range(warmup, steps):
        for s_, v in zip(static_x + static_y, xs[i] + ys[i]):
            s_.copy_(v)
        a_lr.fill_(lrs[i])
        graph.replay()
    # An eager step after the replays, with gradients a backward outside the graph allocates.
    a_opt.zero_grad(set_to_none=True)
    a_lr.fill_(lrs[steps])
    loss_of(a_params, xs[steps], ys[steps]).backward()
    a_opt.step()

    b_params, b_lr, b_opt = make(False)
    for i in range(steps + 1):
        b_opt.zero_grad(set_to_none=True)
        b_lr.fill_(lrs[i])
        loss_of(b_params, xs[i], ys[i]).backward()
        b_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(a_params, b_params):
        assert torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32))
    for p, q in zip(a_params, b_params):
        for k, v in a_opt.state[p].items():
            assert torch.equal(v, b_opt.state[q][k]), k


def check_launch_count(cp) -> None:
    sizes = np.random.default_rng(0).integers(1, 3000, 200)
    rng, params, states = _problem(cp, 6, [(int(n),) for n in sizes], "float16", 32)
    grads = [cp.asarray(random_grad(rng, p.shape, "float16")) for p in params]
    with cuda.record_launches() as launches:
        F.lars_update_many(params, grads, states, **FULL)
    assert len(launches) == 5, f"{len(launches)} launches"  # stats, finalize, exact norm (2), update


def check_other_device_rejected(cp) -> None:
    if cp.cuda.runtime.getDeviceCount() < 2:
        raise Skip("needs two GPUs")
    with cp.cuda.Device(1):
        p = cp.ones(10, cp.float32)
        g = cp.ones(10, cp.float32)
        state = F.init_state(p)
    with cp.cuda.Device(0):
        try:
            F.lars_update(p, g, state, lr=0.1)
        except ValueError as e:
            assert "device" in str(e), str(e)
        else:
            raise AssertionError("arrays on another device were accepted")


def check_backend_reason(cp) -> None:
    backend = F.backend_for([cp.zeros(3, cp.float32)])
    assert backend.name == "cuda" and "CuPy" in backend.reason, backend.describe()


def set_grads_table(runtime: Any, xp: Any) -> np.ndarray:
    """``lars_set_grads`` launched by ``runtime`` (GPU or emulator) over a table of -1s:
    more rows than one struct carries, addresses and quad flags of every kind. Returns
    the table on the host; :func:`expected_set_grads_table` is what it must be."""
    n = cuda.GRAD_PATCH_ROWS + 9
    table = xp.full((n, plan.TENSOR_FIELDS), -1, dtype=xp.int64)
    addresses, vector = _set_grads_inputs(n)
    kernel = runtime.function("lars_set_grads")
    for patch in cuda.grad_patches(addresses, vector):
        kernel((1,), (cuda.GRAD_PATCH_ROWS,), (table, patch))
    return np.asarray(runtime.download(table))


def _set_grads_inputs(n: int) -> tuple[list[int], np.ndarray]:
    addresses = [0x7F00_0000_0000 + 4096 * k + 4 * (k % 3) for k in range(n)]
    return addresses, np.array([k % 3 == 0 for k in range(n)])


def expected_set_grads_table() -> np.ndarray:
    n = cuda.GRAD_PATCH_ROWS + 9
    addresses, vector = _set_grads_inputs(n)
    table = np.full((n, plan.TENSOR_FIELDS), -1, dtype=np.int64)
    table[:, plan.FIELD_GRAD] = addresses
    table[:, plan.FIELD_VECTOR] = vector
    return table


def check_set_grads_struct(cp) -> None:
    """The GradPatch struct arrives intact: CuPy packs the size-1 structured array by value."""
    from cupylars.cuda_runtime import CupyRuntime

    got = set_grads_table(CupyRuntime(), cp)
    assert np.array_equal(got, expected_set_grads_table()), "lars_set_grads wrote other rows than asked"


def check_torch_capture_state_and_recovery(cp) -> None:
    """Inside torch.cuda.graph CuPy sees the capture on the stream cupylars launches on; an
    exception raised inside the capture leaves torch's current stream as it was, and a new
    capture of a step then works."""
    torch = _torch_cuda()
    from cupylars.cuda_runtime import CupyRuntime
    from cupylars.streams import torch_device_scope

    before = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    seen = []
    try:
        with torch.cuda.graph(graph):
            with torch_device_scope(cp, torch.cuda.current_device()):
                seen.append(bool(cp.cuda.get_current_stream().is_capturing()))
                seen.append(CupyRuntime().is_capturing())
            raise KeyError("raised inside the capture")
    except KeyError:
        pass
    assert seen == [True, True], seen
    assert torch.cuda.current_stream() == before, "the capture left another current stream"
    with torch_device_scope(cp, torch.cuda.current_device()):
        assert not cp.cuda.get_current_stream().is_capturing()
    check_torch_graph_capture(cp, bits=8, foreach=True)


def check_functional_torch_side_stream(cp) -> None:
    """F.lars_update_many on torch CUDA tensors on a side stream equals the same steps on
    the default stream, and the same steps on CuPy arrays, bit for bit."""
    torch = _torch_cuda()
    rng, params, states = _problem(cp, 11, [(3,), (5000,), (70000,)], "float32", 8, 1000)
    grads = [[random_grad(rng, p.shape, "float32") for p in params] for _ in range(3)]

    def torch_run(side: bool) -> list[Any]:
        tp = [torch.from_dlpack(p.copy()) for p in params]
        ts = [F.init_state(p, optim_bits=8, min_8bit_size=1000) for p in tp]
        stream = torch.cuda.Stream() if side else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for step in grads:
                # made on the side stream, as a backward pass would: only that stream orders them
                tg = [torch.as_tensor(g, device="cuda") for g in step]
                F.lars_update_many(tp, tg, ts, **FULL)
        torch.cuda.current_stream().wait_stream(stream)
        return [t.cpu().numpy() for t in tp]

    cupy_p = [p.copy() for p in params]
    cupy_s = [_on(s, cp.copy) for s in states]
    for step in grads:
        F.lars_update_many(cupy_p, [cp.asarray(g) for g in step], cupy_s, **FULL)
    want = [cp.asnumpy(p) for p in cupy_p]
    for got in (torch_run(side=True), torch_run(side=False)):
        for a, b in zip(got, want):
            assert a.tobytes() == b.tobytes()


CHECKS: list[tuple[str, Callable[..., None], dict[str, Any]]] = [
    *[
        (f"every_shape[{fmt}-{bits}]", check_every_shape, {"fmt": fmt, "bits": bits})
        for fmt in FORMATS
        for bits in (32, 8)
    ],
    *[(f"every_switch[{name}]", check_switch, {"name": name}) for name in CONFIGS],
    ("skip_and_raise", check_skip_and_raise, {}),
    *[(f"bitwise_identical[{b}]", check_two_runs_are_bitwise_identical, {"bits": b}) for b in (32, 8)],
    ("graph_capture", check_graph_capture, {}),
    ("graph_capture_other_stream", check_graph_capture_other_stream, {}),
    *[
        (f"torch_graph_capture[{bits}-{'foreach' if fe else 'single'}]", check_torch_graph_capture,
         {"bits": bits, "foreach": fe})
        for bits in (32, 8)
        for fe in (True, False)
    ],
    *[
        (f"torch_capture_fresh_grads[{bits}]", check_torch_capture_fresh_grads, {"bits": bits})
        for bits in (32, 8)
    ],
    ("set_grads_struct", check_set_grads_struct, {}),
    ("torch_capture_state_and_recovery", check_torch_capture_state_and_recovery, {}),
    ("functional_torch_side_stream", check_functional_torch_side_stream, {}),
    ("launch_count", check_launch_count, {}),
    ("other_device_rejected", check_other_device_rejected, {}),
    ("backend_reason", check_backend_reason, {}),
]


# ---- the device against the emulator, bit for bit -------------------------------------------------
SMALL_CHUNK = 512
# Sizes around a warp tile (256), a block's chunk (SMALL_CHUNK) and its multiples.
SMALL_SIZES = [(1,), (255,), (256,), (257,), (511,), (512,), (513,), (1025,), (33, 65)]
LARGE_SIZES = [(16383,), (16385,)]  # around the default chunk (plan.CHUNK_SIZE)
MODES = {"none": (32, 0.0), "32": (32, 0.9), "8": (8, 0.9)}  # optim_bits, momentum


def bitexact_cases() -> list[dict[str, Any]]:
    """The case matrix: every format and state mode with every switch on, each switch
    on its own, non-finite gradients under each policy that steps, two chunk sizes."""
    cases = []
    for fmt in FORMATS:
        for mode, (bits, momentum) in MODES.items():
            hp = {**FULL, "momentum": momentum}
            cases.append(
                {"name": f"{fmt}/{mode}/full", "fmt": fmt, "bits": bits, "hp": hp, "chunk": SMALL_CHUNK}
            )
        cases.append(
            {"name": f"{fmt}/32/full/default-chunk", "fmt": fmt, "bits": 32, "hp": FULL, "chunk": None}
        )
    for name, hp in CONFIGS.items():
        if hp.get("nonfinite") == "raise":
            continue
        for fmt, bits in (("float32", 32), ("bfloat16", 8)):
            cases.append(
                {
                    "name": f"{fmt}/{bits}/switch-{name}",
                    "fmt": fmt,
                    "bits": bits,
                    "hp": hp,
                    "chunk": SMALL_CHUNK,
                }
            )
    for policy in ("skip", "propagate"):
        for fmt, bits in (("float16", 32), ("float32", 8)):
            cases.append(
                {
                    "name": f"{fmt}/{bits}/nonfinite-{policy}",
                    "fmt": fmt,
                    "bits": bits,
                    "hp": {**FULL, "nonfinite": policy},
                    "chunk": SMALL_CHUNK,
                    "nonfinite": True,
                }
            )
    return cases


def _poison(grad: np.ndarray, index: int, value: float, fmt: str) -> None:
    bits = {np.nan: 0x7FC0, np.inf: 0x7F80}  # bfloat16 is stored as its uint16 bits
    grad.reshape(-1)[index] = bits[value] if fmt == "bfloat16" else value


def run_case(case: dict[str, Any], to_device: Callable, to_host: Callable, context, steps: int = 3):
    """Runs ``case`` with arrays moved by ``to_device`` inside ``context()``; returns the
    bytes of every output array after each step: ``[(label, bytes, dtype), ...]``."""
    fmt, bits, hp = case["fmt"], case["bits"], case["hp"]
    shapes = SMALL_SIZES + (LARGE_SIZES if case["chunk"] is None else [])
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    host_params = [_random_problem(rng, s, fmt) for s in shapes]
    grads = [[random_grad(rng, s, fmt) for s in shapes] for _ in range(steps)]
    if case.get("nonfinite"):  # a NaN in step 1, an infinity in step 2
        _poison(grads[1][2], 3, np.nan, fmt)
        _poison(grads[2][4], 0, np.inf, fmt)
    states = [F.init_state(p, optim_bits=bits, min_8bit_size=0, dtype=dtype_arg(fmt)) for p in host_params]
    params = [to_device(p) for p in host_params]
    states = [_on(s, to_device) for s in states]
    out = []
    with chunk_size(case["chunk"] or plan.CHUNK_SIZE), context():
        for t in range(steps):
            F.lars_update_many(params, [to_device(g) for g in grads[t]], states, dtype=dtype_arg(fmt), **hp)
            for i, (p, s) in enumerate(zip(params, states)):
                arrays = {"p": p, **s.arrays()}
                for k, a in arrays.items():
                    h = np.ascontiguousarray(to_host(a))
                    out.append((f"step {t} tensor {i} {k}", h.tobytes(), h.dtype))
    return out


def compare_bits(got, want, limit: int = 3) -> list[str]:
    """Mismatches between two :func:`run_case` results, described (first ``limit`` each)."""
    problems = []
    if [g[0] for g in got] != [w[0] for w in want]:
        return ["the two runs produced different arrays"]
    for (label, a, dtype), (_, b, _) in zip(got, want):
        if a == b:
            continue
        x, y = np.frombuffer(a, dtype), np.frombuffer(b, dtype)
        if x.size != y.size:
            problems.append(f"{label}: sizes differ ({x.size} vs {y.size})")
            continue
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
        bad = np.flatnonzero(x.view(bits) != y.view(bits))
        shown = ", ".join(f"[{i}] {x[i]!r} vs {y[i]!r}" for i in bad[:limit])
        problems.append(f"{label}: {bad.size} of {x.size} differ: {shown}")
    return problems


def device_takes_f32_partials() -> bool:
    """Whether the current CuPy device builds the float32-partials stats pass (sm_86, sm_87,
    sm_89: cuda.STATS_F32_PARTIALS_ARCHS); False without CuPy or a device."""
    try:
        import cupy as cp

        return int(cp.cuda.Device().compute_capability) in cuda.STATS_F32_PARTIALS_ARCHS
    except Exception:
        return False


def emulator_runner(f32_partials: bool | None = None) -> Callable[[dict[str, Any]], list]:
    """The emulated kernels, built as the device builds them: with the float32-partials
    stats pass where the current device takes it (``f32_partials`` None), or as told."""
    if f32_partials is None:
        f32_partials = device_takes_f32_partials()
    backend = cuda.emulated_backend(defines=cuda.STATS_F32_PARTIALS if f32_partials else None)

    def run(case):
        return run_case(case, np.copy, np.asarray, lambda: backends.use(backend))

    return run


def device_runner(cp) -> Callable[[dict[str, Any]], list]:
    def run(case):
        return run_case(case, cp.asarray, cp.asnumpy, contextlib.nullcontext)

    return run


def bitexact(run_a, run_b, cases, report: Callable[[str], None]) -> tuple[int, int]:
    """Runs every case both ways and reports each; returns (cases equal, cases run)."""
    equal = 0
    for case in cases:
        problems = compare_bits(run_a(case), run_b(case))
        equal += not problems
        report(
            f"bitexact {case['name']}: " + ("identical" if not problems else f"{len(problems)} MISMATCHES")
        )
        for line in problems[:10]:
            report(f"    {line}")
    return equal, len(cases)
