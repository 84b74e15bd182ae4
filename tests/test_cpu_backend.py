"""The native CPU backend beyond the shared kernel matrix (tests/test_kernels_emulated.py):
thread counts, concurrent callers, strided arrays, the on-disk cache and its guards,
the fallback when no compiler works, and torch tensors through DLPack."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from lars_cases import random_grad, random_problem

from cupylars import _cache, cpu, native, plan
from cupylars import functional as F
from cupylars.testing import emulated_cuda, native_cpu, reference

FULL = dict(
    lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, max_unorm=0.05, percentile_clipping=50
)


def _problem(seed: int, shapes, fmt="float32", bits=8):
    rng = np.random.default_rng(seed)
    params, states = [], []
    for shape in shapes:
        p = random_problem(rng, shape, fmt)
        params.append(p)
        states.append(F.init_state(p, optim_bits=bits, min_8bit_size=1000, dtype=_dtype(fmt)))
    grads = [[random_grad(rng, p.shape, fmt) for p in params] for _ in range(4)]
    return params, states, grads


def _dtype(fmt):
    return "bfloat16" if fmt == "bfloat16" else None


def _train(params, states, grads, fmt="float32", **hp):
    for step_grads in grads:
        F.lars_update_many(params, step_grads, states, dtype=_dtype(fmt), **{**FULL, **hp})


def _same(a_params, a_states, b_params, b_states):
    for p, q in zip(a_params, b_params):
        assert p.tobytes() == q.tobytes()
    for s, t in zip(a_states, b_states):
        for name, array in s.arrays().items():
            assert np.asarray(array).tobytes() == np.asarray(getattr(t, name)).tobytes(), name


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
def test_results_do_not_depend_on_the_thread_count(fmt, monkeypatch):
    monkeypatch.setattr(plan, "CHUNK_SIZE", 1024)  # many chunks per tensor
    monkeypatch.setattr(cpu, "WORK_PER_THREAD", 1)  # threads even for this small work
    runs = []
    for threads in (1, 2, 4):
        monkeypatch.setattr(cpu, "num_threads", lambda threads=threads: threads)
        params, states, grads = _problem(1, [(9000,), (300,), (70, 41)], fmt)
        with native_cpu():
            _train(params, states, grads, fmt)
        runs.append((params, states))
    for params, states in runs[1:]:
        _same(*runs[0], params, states)


@pytest.mark.parametrize("bits", [32, 8])
def test_torchs_openmp_threads_give_the_bits_of_the_own_pool(bits, monkeypatch):
    """Where torch runs on OpenMP, multi-threaded steps run on its threads
    (rawkernels/cpu/lars_cpu.cpp, "torch's OpenMP threads"), with the bits of the pool."""
    pytest.importorskip("torch")
    if not cpu.torch_runs_on_openmp():
        pytest.skip("this torch does not run on OpenMP")
    monkeypatch.setattr(plan, "CHUNK_SIZE", 1024)  # many chunks per tensor
    monkeypatch.setattr(cpu, "WORK_PER_THREAD", 1)  # threads even for this small work
    monkeypatch.setattr(cpu, "num_threads", lambda: 4)
    runs = []
    for allowed in (True, False):
        monkeypatch.setattr(cpu, "openmp_allowed", lambda allowed=allowed: allowed)
        params, states, grads = _problem(1, [(9000,), (300,), (70, 41)], bits=bits)
        with native_cpu():
            assert cpu.cpu_backend().thread_pool().startswith("torch's OpenMP") == allowed
            _train(params, states, grads)
        runs.append((params, states))
    _same(*runs[0], *runs[1])


def test_small_steps_run_on_one_thread_and_large_ones_on_all(monkeypatch):
    monkeypatch.setattr(cpu, "num_threads", lambda: 4)
    unit = cpu.WORK_PER_THREAD
    assert cpu.threads_for(cpu.step_work([10_000] * 10, [False] * 10)) == 1
    assert cpu.threads_for(cpu.step_work([unit - 1], [False])) == 1
    assert cpu.threads_for(cpu.step_work([2 * unit], [False])) == 2
    assert cpu.threads_for(cpu.step_work([unit], [True])) == 3  # 8-bit elements weigh more
    assert cpu.threads_for(cpu.step_work([25_600_000], [False])) == 4  # never above num_threads


def test_the_step_passes_the_threads_its_work_pays_for(monkeypatch):
    """What the native call receives: one thread for a small model, all for a large one."""
    monkeypatch.setattr(cpu, "num_threads", lambda: 2)
    seen = []
    real = cpu.threads_for
    monkeypatch.setattr(cpu, "threads_for", lambda work: seen.append(real(work)) or seen[-1])
    for n in (1000, 2 * cpu.WORK_PER_THREAD):
        params, states, grads = _problem(2, [(n,)], "float32")
        with native_cpu():
            _train(params, states, grads[:1])
    assert seen == [1, 2]


def test_thread_count_follows_torch_then_omp_num_threads(monkeypatch):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert cpu.num_threads() == 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu.num_threads() == 5


def test_strided_params_and_grads_equal_contiguous_ones():
    params, states, grads = _problem(2, [(3000,), (64, 50)])
    wide = [np.zeros((p.shape[0], 2, *p.shape[1:]), p.dtype) for p in params]
    views = [w[:, 1] for w in wide]  # every other row: not contiguous
    for v, p in zip(views, params):
        v[...] = p
    strided_grads = [[np.repeat(g, 2, axis=0)[::2] for g in step] for step in grads]
    twin_states = copy.deepcopy(states)
    with native_cpu():
        _train(params, states, grads)
        _train(views, twin_states, strided_grads)
    for p, v in zip(params, views):
        assert p.tobytes() == np.ascontiguousarray(v).tobytes()
    assert all(w[:, 0].max() == 0 for w in wide)  # the neighbours stay untouched


@pytest.mark.parametrize("backend", ["reference", "cpu", "emulated-cuda"])
def test_concurrent_callers_get_what_they_would_get_alone(backend):
    contexts = {"reference": reference, "cpu": native_cpu, "emulated-cuda": emulated_cuda}
    problems = [_problem(10 + k, [(5000,), (700,), (33, 65)]) for k in range(3)]
    alone = copy.deepcopy(problems)
    for params, states, grads in alone:
        with contexts[backend]():
            for _ in range(10):
                _train(params, states, grads)
    errors = []

    def work(params, states, grads):
        try:
            with contexts[backend]():
                for _ in range(10):
                    _train(params, states, grads)
        except Exception as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=problem) for problem in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (p, s, _), (q, t, _) in zip(problems, alone):
        _same(p, s, q, t)


@pytest.mark.parametrize("backend", ["reference", "cpu", "emulated-cuda"])
def test_overlapping_params_are_refused_and_nothing_changes(backend):
    contexts = {"reference": reference, "cpu": native_cpu, "emulated-cuda": emulated_cuda}
    rng = np.random.default_rng(3)
    buf = rng.standard_normal(10000).astype(np.float32)
    params = [buf[:6000], buf[4000:]]
    states = [F.init_state(p) for p in params]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    before = buf.copy()
    with contexts[backend](), pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap"):
        F.lars_update_many(params, grads, states, **FULL)
    assert buf.tobytes() == before.tobytes()
    assert all(s.step == 0 and not s.has_momentum for s in states)
    # Interleaved views share no element: they are two tensors.
    halves = [buf[0::2], buf[1::2]]
    half_grads = [g[:5000] for g in grads]
    with contexts[backend]():
        if backend == "emulated-cuda":  # the CUDA kernels take contiguous tensors only
            with pytest.raises(ValueError, match="C-contiguous"):
                F.lars_update_many(halves, half_grads, [F.init_state(h) for h in halves], **FULL)
        else:
            F.lars_update_many(halves, half_grads, [F.init_state(h) for h in halves], **FULL)
            assert buf.tobytes() != before.tobytes()


def test_raise_with_fresh_momentum_leaves_no_trace():
    params, states, grads = _problem(4, [(3000,), (500,)], bits=8)
    bad = [grads[0][0], grads[0][1].copy()]
    bad[1][7] = np.inf
    before = [p.copy() for p in params]
    with native_cpu(), pytest.raises(FloatingPointError, match=r"tensor\(s\) \[1\]"):
        F.lars_update_many(params, bad, states, **{**FULL, "nonfinite": "raise"})
    assert all(p.tobytes() == b.tobytes() for p, b in zip(params, before))
    assert all(s.step == 0 and not s.has_momentum and s.history[0] < 0 for s in states)


# ---- the on-disk cache ---------------------------------------------------------------------------
# Child processes import the cupylars this process imported (and build from its sources).
_PACKAGE_ROOT = str(Path(F.__file__).resolve().parents[1])


def _child_env(env: dict) -> dict:
    path = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **env}


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=_child_env(env),
        cwd=str(Path(__file__).resolve().parent),
        timeout=600,
    )


def test_a_second_process_loads_the_cached_library_without_compiling():
    with native_cpu():
        pass  # built (or found) in this process's cache
    code = """
        from cupylars import _cache, native
        def refuse(*args, **kwargs):
            raise AssertionError("compiled again")
        _cache.compile_library = refuse
        native.library()
        print(native.library_path())
    """
    done = _run_python(code, {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(native.library_path())


def test_two_processes_building_at_once_share_one_good_library(tmp_path):
    code = """
        import numpy as np
        from cupylars import functional as F, native
        p = np.linspace(-1, 1, 5000, dtype=np.float32); s = F.init_state(p, optim_bits=8)
        F.lars_update(p, np.cos(p), s, lr=0.1, momentum=0.9, backend="cpu")
        print(native.library_path(), p.sum(dtype=np.float64), s.codes.sum())
    """
    env = {"CUPYLARS_CACHE_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(env),
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert outs[0][0] == outs[1][0]  # same library, same results
    libraries = list((tmp_path / "cpu").glob("*.so"))
    assert len(libraries) == 1 and _cache.trusted(libraries[0])
    assert not list((tmp_path / "cpu").glob("*.tmp")) and not list((tmp_path / "cpu").glob("*.cpp"))
    # A third process finds it.
    again = _run_python(code, env)
    assert again.returncode == 0 and again.stdout == outs[0][0]


def test_cache_folders_are_private_and_foreign_ones_are_not_used(tmp_path):
    mine = _cache.private_folder(tmp_path / "new" / "cpu")
    assert mine == tmp_path / "new" / "cpu" and (mine.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    with pytest.warns(RuntimeWarning, match="can be written by others"):
        fallback = _cache.private_folder(shared)
    assert fallback != shared and (fallback.stat().st_mode & 0o777) == 0o700
    lib = mine / "x.so"
    lib.write_bytes(b"")
    lib.chmod(0o700)
    assert _cache.trusted(lib)
    lib.chmod(0o720)
    assert not _cache.trusted(lib)
    link = mine / "y.so"
    link.symlink_to(lib)
    assert not _cache.trusted(link)


def test_without_a_compiler_the_reference_runs_with_one_warning(tmp_path):
    code = """
        import warnings
        import numpy as np
        from cupylars import functional as F, native
        warnings.simplefilter("always")
        p = np.ones(10, np.float32); s = F.init_state(p)
        with warnings.catch_warnings(record=True) as seen:
            F.lars_update(p, np.ones(10, np.float32), s, lr=0.1)
            F.lars_update(p, np.ones(10, np.float32), s, lr=0.1)
        print(len([w for w in seen if "native CPU backend is unavailable" in str(w.message)]))
        b = F.backend_for([p])
        print(b.name, "|", b.reason)
        try:
            F.lars_update(p, np.ones(10, np.float32), s, lr=0.1, backend="cpu")
        except native.NativeUnavailableError as exc:
            print("refused:", str(exc).splitlines()[0])
    """
    env = {"CUPYLARS_CXX": str(tmp_path / "no-such-c++"), "CUPYLARS_CACHE_DIR": str(tmp_path)}
    done = _run_python(code, env)
    assert done.returncode == 0, done.stderr
    count, which, refused = done.stdout.strip().splitlines()
    assert count == "1"
    assert which.startswith("reference |") and "no-such-c++" in which
    assert refused.startswith("refused: cannot run the C++ compiler")


# ---- torch tensors through DLPack ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
def test_cpu_torch_tensors_equal_the_numpy_path_bit_for_bit(fmt):
    torch = pytest.importorskip("torch")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[fmt]
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(5000, generator=gen).to(dtype)), torch.randn(7, 9).to(dtype)]
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in params] for _ in range(3)]

    def as_numpy(t):
        t = t.detach()
        return t.view(torch.int16).numpy().view(np.uint16).copy() if fmt == "bfloat16" else t.numpy().copy()

    arrays = [as_numpy(p) for p in params]
    array_states = [F.init_state(a, optim_bits=8, min_8bit_size=1000, dtype=_dtype(fmt)) for a in arrays]
    tensor_states = [F.init_state(p, optim_bits=8, min_8bit_size=1000) for p in params]
    versions = [p._version for p in params]
    for step in grads:
        F.lars_update_many(params, step, tensor_states, **FULL)
        F.lars_update_many(arrays, [as_numpy(g) for g in step], array_states, dtype=_dtype(fmt), **FULL)
    for p, a in zip(params, arrays):
        assert as_numpy(p).tobytes() == a.tobytes()
    _same([], tensor_states, [], array_states)
    assert tensor_states[0].is_8bit and isinstance(tensor_states[0].codes, np.ndarray)
    assert all(p._version > v for p, v in zip(params, versions))  # autograd was told


def test_read_only_dlpack_arrays_are_refused_before_anything_changes():
    class ReadOnlyProducer:  # any DLPack producer whose memory may not be written
        def __init__(self, array):
            self.array = array

        def __dlpack__(self, **kwargs):
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.array.__dlpack_device__()

    frozen = np.ones(100, np.float32)
    frozen.flags.writeable = False
    state = F.init_state(frozen)
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        F.lars_update(ReadOnlyProducer(frozen), np.ones(100, np.float32), state, lr=0.1)
    assert state.step == 0 and frozen.min() == 1.0
    with pytest.raises(TypeError, match="expected an array that speaks DLPack"):
        F.lars_update([1.0, 2.0], [1.0, 2.0], state, lr=0.1)


# ---- prepared batches ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_prepared_batch_steps_as_lars_update_many_does(backend):
    params, states, grads = _problem(6, [(3000,), (40, 9)])
    twin_params, twin_states = copy.deepcopy(params), copy.deepcopy(states)
    batch = F.prepare(params, states, backend=backend)
    assert batch.backend.name == backend
    config = F.LarsConfig(**FULL)
    for step_grads in grads:
        batch.update(params, step_grads, states, config)
        F.lars_update_many(twin_params, step_grads, twin_states, backend=backend, **FULL)
    _same(params, states, twin_params, twin_states)


def test_a_prepared_batch_refuses_what_it_was_not_prepared_for():
    params, states, grads = _problem(7, [(3000,), (500,)])
    batch = F.prepare(params, states)
    config = F.LarsConfig(**FULL)
    batch.update(params, grads[0], states, config)
    with pytest.raises(ValueError, match="not those the batch was prepared for"):
        batch.update(params[::-1], grads[0][::-1], states[::-1], config)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        batch.update(params, [grads[0][0], grads[0][1][:-1]], states, config)
    states[1].momentum = states[1].momentum.copy()  # an assigned state: prepare again
    with pytest.raises(ValueError, match="not those the batch was prepared for"):
        batch.update(params, grads[0], states, config)
    reference_batch = F.prepare(params, states, backend="reference")
    with pytest.raises(TypeError, match="needs gradient arrays"):
        reference_batch.update(params, None, states, config, grad_addresses=[0, 0])
    with pytest.raises(TypeError, match="NumPy or CuPy arrays"):
        F.prepare([list(p) for p in params], states)


def test_config_or_hyperparameters_not_both():
    params, states, grads = _problem(8, [(100,)])
    with pytest.raises(TypeError, match="either config or hyperparameters"):
        F.lars_update_many(params, grads[0], states, config=F.LarsConfig(lr=0.1), lr=0.1)
    with pytest.raises(TypeError, match="config must be a LarsConfig"):
        F.lars_update_many(params, grads[0], states, config={"lr": 0.1})


@pytest.mark.parametrize("chosen", [native_cpu, reference])
def test_a_device_lr_is_refused_by_the_host_backends(chosen):
    """lr_device is for the CUDA backends (Backend.reads_device_lr): a host backend says so,
    naming itself, and nothing is modified."""
    p = np.ones(8, np.float32)
    state = F.init_state(p)
    with chosen():
        batch = F.prepare([p], [state])
        with pytest.raises(TypeError, match=f"the {batch.backend.name} backend reads lr from the config"):
            batch.update([p], [np.ones_like(p)], [state], F.LarsConfig(lr=0.1), lr_device=np.ones(1))
    assert state.step == 0 and np.all(p == 1)
