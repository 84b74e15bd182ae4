"""The process around a step: fork, the trust and integrity of cached native code,
and Ctrl-C in the middle of a step.

Each scenario runs in a child process under a timeout: a hang becomes a failure
(the whole process group is killed), and a crash (SIGBUS, SIGTRAP) is an exit
status the test reads. The child's results are compared with the same step
computed here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cupylars import _cache
from cupylars import functional as F
from cupylars.testing import native_cpu

_PACKAGE_ROOT = str(Path(F.__file__).resolve().parents[1])
NOBODY = 65534
TIMEOUT = 240

# The step every child takes: 200k elements are 13 chunks, so 4 threads share them.
COMMON = """
    import hashlib, os, sys, threading, time, warnings
    import numpy as np
    from cupylars import cpu, functional as F, native

    HP = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, max_unorm=0.05)

    # enough work for 4 threads (OMP_NUM_THREADS=4 below): every step wakes the pool
    def problem(seed, n=4 * cpu.WORK_PER_THREAD):
        rng = np.random.default_rng(seed)
        p = rng.standard_normal(n).astype(np.float32)
        grads = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
        return p, grads, F.init_state(p)

    def stepped(seed, backend="cpu"):
        # Two steps (the second uses momentum); a digest of everything they wrote.
        p, grads, s = problem(seed)
        for g in grads:
            F.lars_update_many([p], [g], [s], backend=backend, **HP)
        out = hashlib.sha256(p.tobytes())
        for name, a in sorted(s.arrays().items()):
            out.update(name.encode() + np.asarray(a).tobytes())
        return out.hexdigest()
"""


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "4"}
    env.pop("CUPYLARS_BACKEND", None)
    return {**env, **extra}


def _run(*parts: str, timeout: float = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """``COMMON`` and ``parts`` (each dedented) in a child Python in its own process group,
    killed whole on a timeout."""
    script = "".join(textwrap.dedent(part) for part in (COMMON, *parts))
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
        cwd=_PACKAGE_ROOT,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # forked grandchildren too
        out, err = child.communicate()
        pytest.fail(f"the child hung (killed after {timeout} s)\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def _expected(seed: int) -> str:
    """The digest of ``stepped(seed)`` computed in this process."""
    namespace: dict = {}
    exec(textwrap.dedent(COMMON), namespace)
    with native_cpu():
        return namespace["stepped"](seed)


# ---- 1. fork ------------------------------------------------------------------------------------
# The parent steps first, so the native pool has started its threads before the fork.
FORK_HELPERS = """
    def forked(work):
        # Runs work() in a forked child; its exit code: 0 ok, 3 wrong result, 4 error.
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if work() else 3)
            except BaseException:
                import traceback; traceback.print_exc()
                os._exit(4)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    expected = stepped(1)
"""


def test_a_forked_child_steps_with_the_parents_results():
    done = _run(FORK_HELPERS, "print(forked(lambda: stepped(1) == expected), expected)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", _expected(1)]


def test_a_forked_child_of_a_torch_process_steps_on_the_backends_own_pool():
    """The parent's steps run on torch's OpenMP threads once torch is imported; those do not
    survive fork (a region there hangs: torch's own ops too), so the child steps on the
    backend's own pool, with the same bits."""
    code = """
        import torch
        torch.set_num_threads(4)
        torch.mm(torch.ones(256, 256), torch.ones(256, 256))  # libgomp's threads now exist
        print(cpu.cpu_backend().thread_pool().split(" (")[0].replace(" ", "_"))
        here = stepped(1)  # on torch's threads; `expected` was stepped on the pool
        def child():
            pool = cpu.cpu_backend().thread_pool()
            return "forked child" in pool and stepped(1) == expected and stepped(1) == here
        print(forked(child), here == expected)
    """
    done = _run(FORK_HELPERS, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch's_OpenMP_threads", "0", "True"]


def test_a_multiprocessing_fork_worker_steps():
    code = """
        import multiprocessing
        expected = stepped(1)
        with multiprocessing.get_context("fork").Pool(2) as workers:
            print(*workers.map(stepped, [1, 2, 1]), expected)
    """
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [_expected(1), _expected(2), _expected(1), _expected(1)]


def test_a_child_of_a_forked_child_steps():
    code = """
        def child():
            # The child steps (its own pool starts threads), then forks a grandchild that steps.
            return stepped(1) == expected and forked(lambda: stepped(1) == expected) == 0
        print(forked(child))
    """
    done = _run(FORK_HELPERS, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]


def test_forking_while_another_thread_steps():
    code = """
        stop = threading.Event()
        def busy():
            while not stop.is_set():
                stepped(2)
        threads = [threading.Thread(target=busy) for _ in range(2)]
        for t in threads:
            t.start()
        codes = []
        for k in range(12):
            time.sleep(0.003 * k)  # forks at many points of the other threads' steps
            codes.append(forked(lambda: stepped(1) == expected))
        stop.set()
        for t in threads:
            t.join()
        print(*codes)
    """
    done = _run(FORK_HELPERS, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"] * 12


# ---- 3. who may put code in the cache -------------------------------------------------------------
needs_root = pytest.mark.skipif(
    os.getuid() != 0,
    reason="acting as another user (nobody) needs root: run the suite as root to test the cache's trust rule",
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder under /tmp that nobody (uid 65534) can reach, as on shared scratch space."""
    folder = Path(tempfile.mkdtemp(prefix="cupylars-trust-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _nobody_makes(path: Path, mode: int) -> None:
    """``path``, a folder of nobody's with ``mode`` (as if nobody had made it)."""
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    path.chmod(mode)


LOADS = """
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as seen:
        digest = stepped(1)
    for w in seen:
        print("WARNING", str(w.message).replace("\\n", " "))
    print("LIBRARY", native.library_path())
    print("DIGEST", digest)
"""


def _report(done: subprocess.CompletedProcess) -> tuple[list[str], Path, str]:
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    warned = [line for line in lines if line.startswith("WARNING")]
    library = Path(next(line for line in lines if line.startswith("LIBRARY")).split(" ", 1)[1])
    digest = next(line for line in lines if line.startswith("DIGEST")).split(" ", 1)[1]
    return warned, library, digest


@needs_root
@pytest.mark.parametrize("how", ["owned by nobody", "writable by all", "below a folder writable by all"])
def test_a_cache_root_others_can_change_is_not_used(scratch, how):
    if how == "owned by nobody":
        root = scratch / "root"
        _nobody_makes(root, 0o755)
        offender, why = root, f"belongs to uid {NOBODY}"
    elif how == "writable by all":
        root = scratch / "root"
        root.mkdir()
        root.chmod(0o777)
        offender, why = root, "can be written by others"
    else:
        shared = scratch / "shared"
        shared.mkdir()
        shared.chmod(0o777)  # anyone can rename what it holds
        root = shared / "mine"
        root.mkdir(mode=0o755)
        offender, why = shared, "can be written by others"
    warned, library, digest = _report(_run(LOADS, CUPYLARS_CACHE_DIR=str(root)))
    assert len(warned) == 1 and f"cache folder {root / 'cpu'} ({offender} {why}" in warned[0], warned
    assert not library.is_relative_to(root)
    assert digest == _expected(1)


@needs_root
def test_a_sticky_folder_above_a_folder_of_ours_is_trusted(scratch):
    sticky = scratch / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: others may add entries but not rename ours
    warned, library, digest = _report(_run(LOADS, CUPYLARS_CACHE_DIR=str(sticky / "mine")))
    assert warned == []
    assert library.parent == sticky / "mine" / "cpu"
    assert digest == _expected(1)
    # The same below a sticky folder's entry that belongs to someone else is refused.
    _nobody_makes(sticky / "theirs", 0o777)
    warned, library, _ = _report(_run(LOADS, CUPYLARS_CACHE_DIR=str(sticky / "theirs" / "mine")))
    assert len(warned) == 1 and f"{sticky / 'theirs'} belongs to uid {NOBODY}" in warned[0]


PLANTED_SOURCE = r"""
#include <cstdio>
__attribute__((constructor)) static void planted() {
  if (FILE* f = std::fopen(MARKER, "w")) std::fclose(f);
}
extern "C" __attribute__((visibility("default"))) int lars_cpu_abi_version() { return 1; }
extern "C" __attribute__((visibility("default"))) int lars_cpu_step() { return 0; }
"""

# A compiler that builds, then lets nobody swap the output's folder for one of theirs holding
# the planted library under the output's name, as an attacker racing the build would.
SWAPPING_COMPILER = """#!{python}
import os, shutil, subprocess, sys
done = subprocess.run([{real!r}, *sys.argv[1:]])
if done.returncode == 0 and "-o" in sys.argv:
    output = sys.argv[sys.argv.index("-o") + 1]
    folder = os.path.dirname(output)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setgid({uid}); os.setuid({uid})
            os.rename(folder, folder + ".moved")
            os.mkdir(folder); os.chmod(folder, 0o777)
            shutil.copyfile({planted!r}, output)
            os.chmod(output, 0o777)
        except OSError:
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)
sys.exit(done.returncode)
"""


@needs_root
def test_a_folder_swapped_during_the_build_does_not_get_its_library_loaded(scratch):
    real = shutil.which("c++") or shutil.which("g++")
    assert real is not None
    marker = scratch / "planted-code-ran"
    source = scratch / "planted.cpp"
    source.write_text(PLANTED_SOURCE)
    planted = scratch / "planted.so"
    build = [real, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(planted)]
    subprocess.run(build, check=True)
    planted.chmod(0o644)
    compiler = scratch / "c++"
    script = SWAPPING_COMPILER.format(python=sys.executable, real=real, uid=NOBODY, planted=str(planted))
    compiler.write_text(script)
    compiler.chmod(0o755)
    root = scratch / "root"
    root.mkdir()
    root.chmod(0o777)  # nobody may rename what it holds
    warned, library, digest = _report(_run(LOADS, CUPYLARS_CACHE_DIR=str(root), CUPYLARS_CXX=str(compiler)))
    assert not marker.exists(), "the planted library was loaded"
    assert digest == _expected(1)
    assert len(warned) == 1 and f"{root} can be written by others" in warned[0]
    assert not library.is_relative_to(root)


@needs_root
def test_a_library_or_digest_of_someone_else_is_rebuilt(tmp_path):
    """The file checks go through the descriptor that is loaded: a library (or its digest)
    that is another user's, or a link, is not loaded but rebuilt."""
    cache = tmp_path / "cache"
    _report(_run(LOADS, CUPYLARS_CACHE_DIR=str(cache)))
    (library,) = (cache / "cpu").glob("*.so")
    sidecar = library.with_name(library.name + _cache.DIGEST_SUFFIX)
    for change in ("chown library", "chown digest", "link library"):
        if change == "chown library":
            os.chown(library, NOBODY, NOBODY)
        elif change == "chown digest":
            os.chown(sidecar, NOBODY, NOBODY)
        else:
            moved = library.with_suffix(".elsewhere")
            library.rename(moved)
            library.symlink_to(moved)
        warned, loaded, digest = _report(_run(LOADS, CUPYLARS_CACHE_DIR=str(cache)))
        assert warned == [] and loaded == library and digest == _expected(1), change
        assert not library.is_symlink() and library.stat().st_uid == os.getuid()
        assert sidecar.stat().st_uid == os.getuid()


# ---- 4. a damaged cached library ------------------------------------------------------------------
def _text_section(data: bytes) -> tuple[int, int]:
    """Offset and size of an ELF64 file's .text section."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size
    names_offset = header(shstrndx)[1]
    for i in range(shnum):
        name, offset, size = header(i)
        if data[names_offset + name : names_offset + name + 6] == b".text\0":
            return offset, size
    raise AssertionError("no .text section")


def _damage(library: Path, how: str) -> None:
    data = library.read_bytes()
    if how == "code overwritten":
        offset, size = _text_section(data)
        data = data[:offset] + b"\xcc" * size + data[offset + size :]  # int3 everywhere
    else:
        data = data[: {"empty": 0, "100 bytes": 100, "4096 bytes": 4096, "half": len(data) // 2}[how]]
    with open(library, "r+b") as handle:  # in place: the same file, as a crash or a full disk leaves it
        handle.write(data)
        handle.truncate(len(data))


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("built") / "cache"
    done = _run(LOADS, CUPYLARS_CACHE_DIR=str(cache))
    assert done.returncode == 0, done.stderr
    return cache


@pytest.mark.parametrize("how", ["empty", "100 bytes", "4096 bytes", "half", "code overwritten"])
def test_a_damaged_cached_library_is_rebuilt(built_cache, tmp_path, how):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    (library,) = (cache / "cpu").glob("*.so")
    good = library.read_bytes()
    _damage(library, how)
    warned, loaded, digest = _report(_run(LOADS, CUPYLARS_CACHE_DIR=str(cache)))
    assert warned == [] and loaded == library
    assert digest == _expected(1)
    rebuilt = library.read_bytes()
    assert len(rebuilt) > len(good) // 2
    recorded = library.with_name(library.name + _cache.DIGEST_SUFFIX).read_text().strip()
    assert recorded == hashlib.sha256(rebuilt).hexdigest()


BROKEN_COMPILER = """#!{python}
import subprocess, sys
done = subprocess.run([{real!r}, *sys.argv[1:]])
if done.returncode == 0 and "-o" in sys.argv:
    with open(sys.argv[sys.argv.index("-o") + 1], "r+b") as handle:
        handle.truncate(4096)  # every build comes out damaged
sys.exit(done.returncode)
"""


def test_a_library_that_stays_damaged_warns_once_and_the_reference_runs(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    (library,) = (cache / "cpu").glob("*.so")
    _damage(library, "half")
    compiler = tmp_path / "c++"
    real = shutil.which("c++") or shutil.which("g++")
    compiler.write_text(BROKEN_COMPILER.format(python=sys.executable, real=real))
    compiler.chmod(0o755)
    code = """
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as seen:
            first, second = stepped(1, backend=None), stepped(1, backend=None)
        for w in seen:
            print("WARNING", str(w.message).replace("\\n", " "))
        print("BACKEND", F.backend_for([np.ones(3, np.float32)]).name)
        print("DIGESTS", first == second)
    """
    done = _run(code, CUPYLARS_CACHE_DIR=str(cache), CUPYLARS_CXX=str(compiler))
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warned) == 1 and "native CPU backend is unavailable" in warned[0], done.stdout
    # Rebuilt once (the damaged file failed its digest), and the build came out truncated.
    assert "after a fresh build (before the rebuild: " in warned[0] and "recorded digest" in warned[0]
    assert f"{library} is truncated" in warned[0]
    assert "BACKEND reference" in done.stdout and "DIGESTS True" in done.stdout


# ---- 5. Ctrl-C in the middle of a step --------------------------------------------------------------
INTERRUPTS = """
    import _thread
    # A channels_last-like weight: a strided view, stepped through a contiguous copy.
    shape = (256, 3, 3, 256)
    def fresh():
        rng = np.random.default_rng(5)
        p = np.empty(shape, np.float32).transpose(0, 3, 1, 2)
        p[...] = rng.standard_normal(p.shape)
        g = rng.standard_normal(p.shape).astype(np.float32)
        s = F.init_state(p)
        F.lars_update_many([p], [g], [s], backend="cpu", **HP)  # momentum exists
        return p, g, s
    def snapshot(p, s):
        return [p.copy(), *(np.asarray(a).copy() for a in s.arrays().values())]
    def same(a, b):
        return all(x.tobytes() == y.tobytes() for x, y in zip(a, b))

    p, g, s = fresh()
    before = snapshot(p, s)
    start = time.perf_counter()
    F.lars_update_many([p], [g], [s], backend="cpu", **HP)
    took = time.perf_counter() - start
    after = snapshot(p, s)

    outcomes = {"before": 0, "after": 0}
    for k in range(60):
        p, g, s = fresh()
        timer = threading.Timer(took * k / 40, _thread.interrupt_main)
        try:
            timer.start()
            F.lars_update_many([p], [g], [s], backend="cpu", **HP)
            timer.join()
            time.sleep(0.05)  # the interrupt lands here when it came late
        except KeyboardInterrupt:
            pass
        timer.join()
        now = snapshot(p, s)
        if same(now, before):
            outcomes["before"] += 1
        elif same(now, after):
            outcomes["after"] += 1
        else:
            changed = [i for i, (x, y) in enumerate(zip(now, before)) if x.tobytes() != y.tobytes()]
            print("HALF", k, "changed arrays:", changed)
    print(outcomes["before"], outcomes["after"])
"""


def test_an_interrupted_step_is_all_or_nothing():
    done = _run(INTERRUPTS)
    assert done.returncode == 0, done.stderr
    assert "HALF" not in done.stdout, done.stdout
    before, after = map(int, done.stdout.split())
    assert before + after == 60 and before > 0 and after > 0, done.stdout


# ---- the emulator's modules take the same guards ------------------------------------------------------
EMULATED = """
    import warnings
    from cupylars._emulator import EmulatedModule
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as seen:
        module = EmulatedModule([sys.argv[1]], ["scale"], cache_dir=sys.argv[2])
    x = np.arange(4, dtype=np.int32)
    module.get_function("scale")(1, 4, (x,))
    for w in seen:
        print("WARNING", str(w.message).replace("\\n", " "))
    print("LIBRARY", module.library_path)
    print("COMPILED", module.compiled, "RESULT", *x)
"""


def _emulated(source: Path, cache: Path) -> tuple[list[str], Path, str]:
    code = "import sys\nsys.argv[1:] = [" + repr(str(source)) + ", " + repr(str(cache)) + "]\n"
    done = _run(code, EMULATED)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    library = Path(next(line for line in lines if line.startswith("LIBRARY")).split(" ", 1)[1])
    return [line for line in lines if line.startswith("WARNING")], library, lines[-1]


def test_a_damaged_emulated_module_is_rebuilt_and_an_untrusted_folder_not_used(tmp_path):
    source = tmp_path / "scale.cu"
    source.write_text(f'// {tmp_path}\nextern "C" __global__ void scale(int* x) {{ x[threadIdx.x] *= 3; }}\n')
    cache = tmp_path / "cache"
    warned, library, result = _emulated(source, cache)
    assert warned == [] and library.parent == cache and result == "COMPILED True RESULT 0 3 6 9"
    _damage(library, "half")
    warned, again, result = _emulated(source, cache)
    assert warned == [] and again == library and result == "COMPILED True RESULT 0 3 6 9"
    warned, again, result = _emulated(source, cache)
    assert warned == [] and again == library and result == "COMPILED False RESULT 0 3 6 9"

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    warned, elsewhere, result = _emulated(source, shared / "cache")
    assert len(warned) == 1 and f"{shared} can be written by others" in warned[0]
    assert not elsewhere.is_relative_to(shared) and result == "COMPILED True RESULT 0 3 6 9"


TORCH_INTERRUPTS = """
    import _thread
    import torch
    from cupylars.optim import LARS
    torch.set_num_threads(2)
    def fresh():
        torch.manual_seed(5)
        w = torch.nn.Parameter(torch.randn(256, 256, 3, 3).to(memory_format=torch.channels_last))
        w.grad = torch.randn(256, 256, 3, 3)
        opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=1e-2)
        opt.step()  # momentum exists
        return w, opt
    def snapshot(w, opt):
        tensors = [w.detach().clone()]
        tensors += [v.clone() for v in opt.state[w].values() if isinstance(v, torch.Tensor)]
        return [t.numpy().copy() for t in tensors]
    def same(a, b):
        return len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))

    w, opt = fresh()
    before = snapshot(w, opt)
    start = time.perf_counter()
    opt.step()
    took = time.perf_counter() - start
    after = snapshot(w, opt)
    outcomes = {"before": 0, "after": 0}
    for k in range(40):
        w, opt = fresh()
        timer = threading.Timer(took * k / 25, _thread.interrupt_main)
        try:
            timer.start()
            opt.step()
            timer.join()
            time.sleep(0.05)
        except KeyboardInterrupt:
            pass
        timer.join()
        now = snapshot(w, opt)
        if same(now, before):
            outcomes["before"] += 1
        elif same(now, after):
            outcomes["after"] += 1
        else:
            print("HALF", k)
    print(outcomes["before"], outcomes["after"])
"""


def test_an_interrupted_torch_step_on_a_channels_last_weight_is_all_or_nothing():
    pytest.importorskip("torch")
    done = _run(TORCH_INTERRUPTS)
    assert done.returncode == 0, done.stderr
    assert "HALF" not in done.stdout, done.stdout
    before, after = map(int, done.stdout.split())
    assert before + after == 40 and before > 0 and after > 0, done.stdout
