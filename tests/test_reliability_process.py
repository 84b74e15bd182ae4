"""The process around a step: fork, the trust and integrity of cached native code,
and Ctrl-C in the middle of a step.

Each scenario runs in a child process under a timeout: a hang becomes a failure
(the whole process group is killed), and a crash (SIGBUS, SIGTRAP) is an exit
status the test reads. The child's results are compared with the same step
computed here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cupylars import functional as F
from cupylars.testing import native_cpu

_PACKAGE_ROOT = str(Path(F.__file__).resolve().parents[1])
NOBODY = 65534
TIMEOUT = 240

# The step every child takes: 200k elements are 13 chunks, so 4 threads share them.
COMMON = """
    import hashlib, os, sys, threading, time, warnings
    import numpy as np
    from cupylars import functional as F, native

    HP = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, max_unorm=0.05)

    def problem(seed, n=200_000):
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
