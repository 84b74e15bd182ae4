"""CUDA graph capture, proven on the CPU with the emulated runtime.

``cupylars.testing.emulated_capture()`` records the emulated launches as a CUDA graph
would (addresses and scalars, not arrays) and refuses every allocation, host copy,
synchronisation and free inside the capture. Each scenario captures a step, replays it
with new gradient values written into the same gradient tensors and new learning rates
written into the lr tensor, and compares with the same steps run eagerly, bit for bit
(the same kernels run both ways). The forbidden operations are planted one by one.

Fresh gradients (torch's whole-network capture: ``zero_grad(set_to_none=True)``, then a
backward inside the capture) are captured too: their addresses are recorded by value
(``lars_set_grads``) into the graph's copy of the tensor rows; the scenarios check the
replays and the eager steps after them, and plant a short patch, launches that read the
eager rows, a patch written over the eager rows and wrong quad-access flags.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from cupylars import backends, cuda
from cupylars import functional as F
from cupylars.cuda_runtime import GRAD_PATCH_ROWS, EmulatedRuntime
from cupylars.optim import LARS, LARS8bit, LARS32bit
from cupylars.optim import capture as capture_module
from cupylars.optim import lars as lars_module
from cupylars.testing import GraphCaptureError, emulated_capture, emulated_stream

CHUNK = 512  # several chunks (blocks) per tensor with small tensors
SHAPES = [(1300,), (40, 33), (7,)]
HP = {"momentum": 0.9, "weight_decay": 1e-3, "max_unorm": 0.05, "trust_coefficient": 0.02}


@pytest.fixture
def emulated():
    with backends.use(cuda.emulated_backend(CHUNK)) as backend:
        yield backend


def _params(seed: int, shapes=SHAPES, dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(seed: int, steps: int, shapes=SHAPES, dtype=torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]


def _two_groups(params, lrs, capturable):
    half = len(params) // 2 + 1
    return [
        {"params": params[:half], "lr": lrs[0], "capturable": capturable},
        {"params": params[half:], "lr": lrs[1], "momentum": 0.5, "percentile_clipping": 90,
         "capturable": capturable},
    ]


def _state_bytes(opt) -> list[bytes]:
    return [v.numpy().tobytes() for st in opt.state.values() for v in st.values()]


def _assert_same(a_params, b_params, a_opt, b_opt) -> None:
    for pa, pb in zip(a_params, b_params):
        assert pa.detach().numpy().tobytes() == pb.detach().numpy().tobytes()
    assert _state_bytes(a_opt) == _state_bytes(b_opt)


LR_SCHEDULE = [0.2, 0.2, 0.1, 0.05, 0.3, 0.07, 0.11]


@pytest.mark.parametrize("cls", [LARS8bit, LARS32bit])
@pytest.mark.parametrize("foreach", [True, False])
def test_replays_equal_eager_steps(emulated, cls, foreach):
    """Warm up on one stream, capture on another, replay with new gradients and lrs."""
    steps, warmup = len(LR_SCHEDULE), 2
    grads = _grads(1, steps)
    kwargs = dict(HP, min_8bit_size=256, foreach=foreach)

    # Captured: static gradient tensors, the lr in tensors the kernels read at each replay.
    a_params = _params(0)
    a_lrs = [torch.tensor(LR_SCHEDULE[0]), torch.tensor(LR_SCHEDULE[0] / 2, dtype=torch.float64)]
    a_opt = cls(_two_groups(a_params, a_lrs, True), lr=0.0, capturable=True, **kwargs)
    for p in a_params:
        p.grad = torch.zeros_like(p)
    # Eager: the same steps, lr by value (capturable=False reads a tensor lr on the host).
    b_params = _params(0)
    b_lrs = [torch.tensor(LR_SCHEDULE[0]), torch.tensor(LR_SCHEDULE[0] / 2, dtype=torch.float64)]
    b_opt = cls(_two_groups(b_params, b_lrs, False), lr=0.0, **kwargs)

    def set_step(params, lrs, i):
        for p, g in zip(params, grads[i]):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)  # new values, same memory
        lrs[0].fill_(LR_SCHEDULE[i])
        lrs[1].fill_(LR_SCHEDULE[i] / 2)

    with emulated_stream(1):
        for i in range(warmup):
            set_step(a_params, a_lrs, i)
            a_opt.step()
    before = [p.detach().clone() for p in a_params]
    with emulated_capture() as graph:
        a_opt.step()
    assert len(graph) >= 3
    for p, q in zip(a_params, before):  # recorded, not run
        assert torch.equal(p.detach(), q)
    for i in range(warmup, steps):
        set_step(a_params, a_lrs, i)
        graph.replay()

    for i in range(steps):
        set_step(b_params, b_lrs, i)
        b_opt.step()
    _assert_same(a_params, b_params, a_opt, b_opt)
    assert int(a_opt.state[a_params[0]]["step"]) == steps


def test_a_scheduler_reaches_the_graph(emulated):
    """A tensor lr updated in place by a torch scheduler is what each replay uses."""
    grads = _grads(2, 6)
    runs = []
    for capture in (True, False):
        params = _params(3)
        lr = torch.tensor(0.3)
        opt = LARS(params, lr=lr, capturable=capture, **HP)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for p in params:
            p.grad = torch.zeros_like(p)
        graph = None
        for i, g in enumerate(grads):
            for p, gi in zip(params, g):
                p.grad.copy_(gi)
            if not capture or i < 2:  # two eager steps: state, then the prepared batches
                opt.step()
            elif graph is None:
                with emulated_capture() as graph:
                    opt.step()
                graph.replay()
            else:
                graph.replay()
            sched.step()
            assert opt.param_groups[0]["lr"] is lr  # filled in place, not replaced
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert a.numpy().tobytes() == b.numpy().tobytes()


def test_a_float_lr_is_frozen_at_capture(emulated):
    grads = _grads(4, 4)
    params, twin = _params(5), _params(5)
    opt = LARS32bit(params, lr=0.2, capturable=True, **HP)
    eager = LARS32bit(twin, lr=0.2, **HP)
    for p in params:
        p.grad = torch.zeros_like(p)
    for i, g in enumerate(grads):
        for p, q, gi in zip(params, twin, g):
            p.grad.copy_(gi)
            q.grad = gi.clone()
        if i < 2:
            opt.step()
        elif i == 2:
            with emulated_capture() as graph:
                opt.step()
            graph.replay()
        else:
            opt.param_groups[0]["lr"] = 5.0  # not seen by the graph
            graph.replay()
        eager.step()  # always 0.2
    for a, b in zip(params, twin):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()


def test_graph_memory_lives_as_long_as_the_optimizer(emulated):
    """Later eager steps that rebuild the tables do not free what the graph addresses."""
    params, twin = _params(6), _params(6)
    lr = torch.tensor(0.1)
    opt = LARS8bit(params, lr=lr, capturable=True, min_8bit_size=256, **HP)
    eager = LARS8bit(twin, lr=0.1, min_8bit_size=256, **HP)
    grads = _grads(7, 5)
    for p in params:
        p.grad = torch.zeros_like(p)
    for p, g in zip(params, grads[0]):
        p.grad.copy_(g)
    opt.step()
    opt.step()
    for q, g in zip(twin, grads[0]):
        q.grad = g.clone()
    eager.step()
    eager.step()
    with emulated_capture() as graph:
        opt.step()
    static = [p.grad for p in params]  # the gradients the graph reads
    for i in range(1, 5):
        for p, g in zip(params, grads[i]):
            p.grad.copy_(g)
        if i == 2:
            # An eager step with fresh gradients (new tables) and a full re-plan in between;
            # the twin takes the same step.
            opt._plan = None
            for p in params:
                p.grad = p.grad.clone()
            opt.step()
            for q, g in zip(twin, grads[i]):
                q.grad = g.clone()
            eager.step()
            for p, g in zip(params, static):
                p.grad = g  # back to the captured gradients
            continue
        graph.replay()
        for q, g in zip(twin, grads[i]):
            q.grad = g.clone()
        eager.step()
    # Whatever the backend retired is gone now: only the optimizer keeps the graph's memory.
    emulated._retired.clear()
    gc.collect()
    graph.replay()
    for q, g in zip(twin, grads[4]):
        q.grad = g.clone()
    eager.step()
    for a, b in zip(params, twin):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()

    # Planted: the optimizer lets go of the graph's memory, as it did before capture support.
    opt._graph_keepalive.clear()
    opt._plan = None
    for p in params:
        p.grad = p.grad.clone()
    opt.step()  # replaces the batches
    emulated._retired.clear()
    gc.collect()
    with pytest.raises(GraphCaptureError, match="freed"):
        graph.replay()


# ---- fresh gradients: zero_grad(set_to_none=True), then a backward inside the capture -------
def _batches(opt) -> list:
    return [b for bucket, _, _ in opt._plan.buckets for b in (bucket.batches or [])]


def _plans(opt) -> list:
    return [plan for batch in _batches(opt) for plan in batch.cuda_plans.values()]


def _fresh_grads_scenario(cls, foreach: bool, allocate: str) -> None:
    """Warm up with two eager steps, capture one over gradients at new addresses (allocated
    before the capture, or inside it as a backward would), replay with new values written
    into the captured gradients, then step eagerly with the warm-up gradients again: every
    result equals an eager twin's, bit for bit."""
    steps, warmup = len(LR_SCHEDULE), 2
    grads = _grads(13, steps + 1)
    kwargs = dict(HP, min_8bit_size=256, foreach=foreach)
    a_params = _params(14)
    a_lrs = [torch.tensor(LR_SCHEDULE[0]), torch.tensor(LR_SCHEDULE[0] / 2, dtype=torch.float64)]
    a_opt = cls(_two_groups(a_params, a_lrs, True), lr=0.0, capturable=True, **kwargs)
    b_params = _params(14)
    b_lrs = [torch.tensor(LR_SCHEDULE[0]), torch.tensor(LR_SCHEDULE[0] / 2, dtype=torch.float64)]
    b_opt = cls(_two_groups(b_params, b_lrs, False), lr=0.0, **kwargs)

    def set_lr(lrs, i):
        lrs[0].fill_(LR_SCHEDULE[i])
        lrs[1].fill_(LR_SCHEDULE[i] / 2)

    warm = [torch.empty_like(p) for p in a_params]  # the warm-up's gradients, kept
    for p, g in zip(a_params, warm):
        p.grad = g
    with emulated_stream(1):
        for i in range(warmup):
            for g, gi in zip(warm, grads[i]):
                g.copy_(gi)
            set_lr(a_lrs, i)
            a_opt.step()

    for p in a_params:
        p.grad = None  # zero_grad(set_to_none=True)
    if allocate == "before":
        for p in a_params:
            p.grad = torch.empty_like(p)
    with emulated_capture() as graph:
        if allocate == "inside":  # the user's allocations are not ours to forbid
            for p in a_params:
                p.grad = torch.empty_like(p)
        a_opt.step()
    captured = [p.grad for p in a_params]
    assert all(c.data_ptr() != w.data_ptr() for c, w in zip(captured, warm))
    assert sum(name == "lars_set_grads" for name, *_ in graph.launches) >= 2  # one per batch
    for p in a_params:
        p.grad = None  # the graph's gradients outlive this: the optimizer keeps them
    for i in range(warmup, steps):
        for c, gi in zip(captured, grads[i]):
            c.copy_(gi)
        set_lr(a_lrs, i)
        graph.replay()
    # An eager step with the warm-up's gradients again: the eager rows still hold them.
    for p, g, gi in zip(a_params, warm, grads[steps]):
        g.copy_(gi)
        p.grad = g
    a_opt.step()

    for i in range(steps + 1):
        for q, gi in zip(b_params, grads[i]):
            q.grad = gi.clone()
        set_lr(b_lrs, min(i, steps - 1))
        b_opt.step()
    _assert_same(a_params, b_params, a_opt, b_opt)
    assert int(a_opt.state[a_params[0]]["step"]) == steps + 1


@pytest.mark.parametrize("cls", [LARS8bit, LARS32bit])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("allocate", ["before", "inside"])
def test_fresh_gradients_replay_equal_eager_steps(emulated, cls, foreach, allocate):
    _fresh_grads_scenario(cls, foreach, allocate)


def test_the_optimizer_keeps_the_captured_gradients(emulated):
    params = _params(9)
    opt = LARS(params, lr=torch.tensor(0.1), capturable=True, **HP)
    _warm(opt, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    with emulated_capture():
        opt.step()
    held = {id(t) for t in opt._graph_keepalive}
    assert all(id(p.grad) in held for p in params)


def _short_patches(grad_addresses, vector):
    """Planted: the last row of every batch keeps the address it had."""
    patches = _real_grad_patches(grad_addresses, vector)
    patches[-1]["count"] -= 1
    return patches


_real_grad_patches = cuda.grad_patches


def test_planted_short_patch_fails(emulated, monkeypatch):
    monkeypatch.setattr(cuda, "grad_patches", _short_patches)
    with pytest.raises(AssertionError):
        _fresh_grads_scenario(LARS32bit, True, "before")


def test_planted_launches_reading_the_eager_rows_fail(emulated, monkeypatch):
    """The captured stats and update launches read the eager rows (the warm-up's gradient
    addresses) instead of the graph rows the patch wrote."""
    real = cuda.CudaBackend._launch_chunks

    def planted(self, runs, tensors, plan, chunk, *tail):
        real(self, runs, plan.tensors, plan, chunk, *tail)

    monkeypatch.setattr(cuda.CudaBackend, "_launch_chunks", planted)
    with pytest.raises(AssertionError):
        _fresh_grads_scenario(LARS8bit, True, "inside")


def test_planted_patch_over_the_eager_rows_fails(emulated, monkeypatch):
    """The graph rows are the eager rows: the replays are right, but the eager step after
    them reads the captured gradients' addresses instead of the warm-up's."""
    real = cuda.CudaBackend._build_plan

    def planted(self, *args, **kwargs):
        plan = real(self, *args, **kwargs)
        plan.graph_rows = plan.tensors
        return plan

    monkeypatch.setattr(cuda.CudaBackend, "_build_plan", planted)
    with pytest.raises(AssertionError):
        _fresh_grads_scenario(LARS32bit, False, "before")


def _many(seed: int, n: int, offset: int):
    """n small float32 params (more than one patch launch) and gradients; ``offset`` > 0
    puts every other gradient that many elements into a buffer (not 16-byte aligned)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(5 + k % 7).astype(np.float32) for k in range(n)]

    def grad(k, p):
        if offset and k % 2:
            buf = np.empty(p.size + offset, np.float32)
            g = buf[offset:]
        else:
            g = np.empty_like(p)
        g[...] = rng.standard_normal(p.size)
        return g

    return params, [grad(k, p) for k, p in enumerate(params)]


@pytest.mark.parametrize("aligned_first", [True, False])
def test_backend_captures_fresh_gradients_over_several_patches(emulated, aligned_first):
    """More rows than one lars_set_grads launch holds, and gradients whose quad access
    changes between the eager step and the capture (the flag is the host's, per address)."""
    n = GRAD_PATCH_ROWS + 9
    params, warm = _many(15, n, 0 if aligned_first else 1)
    _, fresh = _many(16, n, 1 if aligned_first else 0)
    states = [F.init_state(p, optim_bits=8, min_8bit_size=0) for p in params]
    twin = [p.copy() for p in params]
    twin_states = [F.init_state(p, optim_bits=8, min_8bit_size=0) for p in twin]
    cfg = F.LarsConfig(lr=0.1, **HP)
    batch = F.prepare(params, states)
    batch.update(params, warm, states, cfg)
    batch.update(params, warm, states, cfg)
    with emulated_capture() as graph:
        batch.update(params, fresh, states, cfg)
    assert [name for name, *_ in graph.launches].count("lars_set_grads") == 2
    rng = np.random.default_rng(17)
    values = [[rng.standard_normal(p.size).astype(np.float32) for p in params] for _ in range(3)]
    for v in values:
        for g, x in zip(fresh, v):
            g[...] = x
        graph.replay()
    batch.update(params, warm, states, cfg)  # the eager rows: the warm-up's gradients
    for g in (warm, warm, *values, warm):
        F.lars_update_many(twin, [x.copy() for x in g], twin_states, config=cfg)
    for a, b in zip(params, twin):
        assert a.tobytes() == b.tobytes()


def test_planted_wrong_quad_flags_fault(emulated, monkeypatch):
    """Every captured gradient flagged for quad access: the misaligned ones fault (on the
    GPU a misaligned-address error; the emulator checks every quad access)."""

    def planted(grad_addresses, vector):
        return _real_grad_patches(grad_addresses, np.ones_like(vector))

    monkeypatch.setattr(cuda, "grad_patches", planted)
    with pytest.raises(Exception, match="not aligned"):
        test_backend_captures_fresh_gradients_over_several_patches(emulated, True)


# ---- what cannot be captured raises, and nothing is recorded or modified ----------------------
def _warm(opt, params, seed=8):
    for p, g in zip(params, _grads(seed, 1)[0]):
        p.grad = g
    opt.step()
    opt.step()


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], _state_bytes(opt)


def _raises_in_capture(opt, params, match):
    before = _snapshot(opt, params)
    with emulated_capture() as graph, pytest.raises(GraphCaptureError, match=match):
        opt.step()
    assert len(graph) == 0
    after = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]


def test_not_capturable(emulated):
    params = _params(9)
    opt = LARS(params, lr=0.1, **HP)
    _warm(opt, params)
    _raises_in_capture(opt, params, "capturable=False")


def test_a_single_warm_up_step_is_not_enough(emulated):
    params = _params(9)
    opt = LARS(params, lr=0.1, capturable=True, **HP)
    for p, g in zip(params, _grads(8, 1)[0]):
        p.grad = g
    opt.step()
    _raises_in_capture(opt, params, "at least two eager steps")


def test_first_step_cannot_be_captured(emulated):
    params = _params(9)
    opt = LARS(params, lr=0.1, capturable=True, **HP)
    for p, g in zip(params, _grads(8, 1)[0]):
        p.grad = g
    _raises_in_capture(opt, params, "not a repeat of the last step")
    assert not opt.state  # no state was created


def test_nonfinite_raise_cannot_be_captured(emulated):
    params = _params(9)
    opt = LARS(params, lr=0.1, capturable=True, nonfinite="raise", **HP)
    _warm(opt, params)
    _raises_in_capture(opt, params, "nonfinite='raise'")


def test_a_moved_parameter_cannot_be_captured(emulated):
    params = _params(9)
    opt = LARS(params, lr=0.1, capturable=True, **HP)
    _warm(opt, params)
    params[1].data = params[1].data.clone()
    _raises_in_capture(opt, params, "not a repeat")


def test_overrides_cannot_be_captured(emulated, monkeypatch):
    params = _params(9)
    opt = LARS(params, lr=0.1, capturable=True, **HP)
    _warm(opt, params)
    manager = lars_module.GlobalOptimManager.get_instance()
    monkeypatch.setattr(manager, "uses_config_override", True)
    _raises_in_capture(opt, params, "GlobalOptimManager")


def test_cpu_tensors_under_a_torch_capture(emulated, monkeypatch):
    """Under torch.cuda.graph a CPU tensor's step would run now, not at replay."""
    params = _params(9)
    opt = LARS(params, lr=0.1, capturable=True, **HP)
    _warm(opt, params)
    monkeypatch.setattr(capture_module, "capturing", lambda: True)
    with pytest.raises(GraphCaptureError, match="records only work on CUDA tensors"):
        opt.step()


def test_emulated_capture_needs_the_emulated_kernels():
    params = _params(9)
    opt = LARS(params, lr=0.1, capturable=True, **HP)
    _warm(opt, params)  # the native (or reference) backend: runs at once, cannot be recorded
    _raises_in_capture(opt, params, "emulated_cuda")


def test_a_bad_lr_tensor_is_refused():
    params = _params(9)
    with pytest.raises(ValueError, match="one float32 or float64 element"):
        LARS(params, lr=torch.tensor([0.1, 0.2]), capturable=True)
    with pytest.raises(ValueError, match="one float32 or float64 element"):
        LARS(params, lr=torch.tensor(0.1, dtype=torch.bfloat16), capturable=True)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        LARS(params, lr=0.1, capturable=1)


# ---- the backend and the runtime on their own ------------------------------------------------
def _arrays(seed: int):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(1300,), (9,)]]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    states = [F.init_state(p, optim_bits=8, min_8bit_size=256) for p in params]
    return params, grads, states


def test_every_forbidden_runtime_operation_raises():
    rt = EmulatedRuntime()
    table, keepalive = rt.upload(np.arange(4, dtype=np.int64))
    with emulated_capture():
        for what, call in [
            ("allocating", lambda: rt.empty(4, np.float64)),
            ("uploading", lambda: rt.upload(np.arange(4, dtype=np.int64))),
            ("copying device memory to the host", lambda: rt.download(table)),
            ("synchronisation", lambda: rt.release(keepalive)),
            ("retire", rt.fence),
        ]:
            with pytest.raises(GraphCaptureError, match=what):
                call()


def test_a_batch_captures_on_another_stream(emulated):
    """Tables and scratch made on one stream serve a capture on another; the planted
    per-stream keying (as before) makes the capture raise instead."""
    params, grads, states = _arrays(10)
    twin = [p.copy() for p in params]
    twin_states = [F.init_state(p, optim_bits=8, min_8bit_size=256) for p in twin]
    cfg = F.LarsConfig(lr=0.1, **HP)
    batch = F.prepare(params, states)
    lr = np.array([0.1])
    with emulated_stream(5):
        batch.update(params, grads, states, cfg, lr_device=lr)
    with emulated_capture() as graph:
        batch.update(params, grads, states, cfg, lr_device=lr)
    assert batch.captured
    for scale in (0.5, 0.25):
        lr[0] = 0.1 * scale
        graph.replay()
    for scale in (1.0, 0.5, 0.25):
        F.lars_update_many(twin, grads, twin_states, config=F.LarsConfig(lr=0.1 * scale, **HP))
    for a, b in zip(params, twin):
        assert a.tobytes() == b.tobytes()


def test_per_stream_tables_would_not_capture(emulated, monkeypatch):
    params, grads, states = _arrays(11)
    cfg = F.LarsConfig(lr=0.1, **HP)
    batch = F.prepare(params, states)
    monkeypatch.setattr(EmulatedRuntime, "context", lambda self: (-1, self.stream()))
    with emulated_stream(5):
        batch.update(params, grads, states, cfg)
    with emulated_capture(), pytest.raises(GraphCaptureError, match="tables"):
        batch.update(params, grads, states, cfg)


@pytest.mark.parametrize("plant", ["no step", "scratch", "momentum", "scratch and fresh grads"])
def test_backend_refuses_in_capture(emulated, plant):
    params, grads, states = _arrays(12)
    # Without momentum for "no step": the first step's momentum allocation is refused first.
    cfg = F.LarsConfig(lr=0.1, **dict(HP, momentum=0.0 if plant == "no step" else 0.9))
    batch = F.prepare(params, states)
    if plant != "no step":
        batch.update(params, grads, states, cfg)
    if plant.startswith("scratch"):
        batch.cuda_scratch.clear()
    if plant == "momentum":
        batch.has_momentum = False
    if plant.endswith("fresh grads"):
        grads = [g.copy() for g in grads]  # no lars_set_grads is recorded before the refusal
    before = [p.copy() for p in params]
    match = "tables" if plant == "no step" else plant.split()[0]
    with emulated_capture() as graph, pytest.raises(GraphCaptureError, match=match):
        batch.update(params, grads, states, cfg)
    assert len(graph) == 0 and all(a.tobytes() == b.tobytes() for a, b in zip(params, before))


def test_set_grads_struct_arrives_intact_on_the_emulator():
    """The GradPatch struct, packed as CuPy packs it (a size-1 structured array, by value),
    writes exactly the gradient addresses and quad flags it carries (tests/gpu_checks.py
    checks the same on a GPU)."""
    import gpu_checks

    got = gpu_checks.set_grads_table(EmulatedRuntime(), np)
    assert np.array_equal(got, gpu_checks.expected_set_grads_table())
