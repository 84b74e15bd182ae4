"""The calls into CuPy and torch that need no device, against the installed CuPy (14, from
the test extra) and against CuPy 13 (installed by ``make test`` into ``.venv/cupy13``).

A mock of CuPy would prove nothing about CuPy's signatures: every test here calls the
real package. Without a GPU, CuPy imports and packs kernel arguments; what needs the
driver raises ``CUDARuntimeError``, which is how a test tells "packed, then stopped at
the device" from "refused the argument".
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from cupylars import cuda, plan, streams
from cupylars import functional as F
from cupylars.config import LarsConfig

cupy = pytest.importorskip("cupy", reason="the test extra installs cupy-cuda13x")
from cupy.cuda import function as cupy_function  # noqa: E402
from cupy_backends.cuda.api.runtime import CUDARuntimeError  # noqa: E402

CUPY13 = Path(sys.prefix) / "cupy13"


class TorchStream(torch.cuda.Stream):
    """A real ``torch.cuda.Stream`` (torch's own ``__cuda_stream__``) over a made-up handle:
    torch cannot create a stream without CUDA, but the protocol method is torch's."""

    def __new__(cls, handle: int) -> TorchStream:
        self = object.__new__(cls)
        self._handle = handle
        return self

    def __init__(self, handle: int) -> None:
        pass

    @property
    def cuda_stream(self) -> int:  # type: ignore[override]
        return self._handle


def _no_device_launch(args: tuple) -> Exception:
    """Launch a null kernel with ``args`` on the installed CuPy: its argument packing runs,
    then the launch stops at the missing driver. Returns what was raised."""
    kernel = cupy_function.Function.__new__(cupy_function.Function)
    try:
        kernel((1,), (64,), args, stream=types.SimpleNamespace(ptr=0))
    except Exception as exc:
        return exc
    raise AssertionError("a launch without a GPU went through")


def _raised_at_collection(monkeypatch, make) -> list:
    """What the finalizer of the object ``make()`` returns raises when it is collected."""
    raised: list = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    obj = make()
    del obj
    gc.collect()
    return [r.exc_value for r in raised]


def test_torch_streams_wrap_without_ownership(monkeypatch):
    handle = 0x5EED0
    torch_stream = TorchStream(handle)
    alive = weakref.ref(torch_stream)
    wrapped = streams.as_cupy_stream(cupy, torch_stream)
    assert isinstance(wrapped, cupy.cuda.Stream)
    assert wrapped.ptr == handle
    del torch_stream
    gc.collect()
    assert alive() is not None, "the CuPy stream must keep the torch stream alive"
    del wrapped
    # CuPy destroys the handle of a stream it owns when the object goes (without a driver
    # that raises); a wrapped foreign stream must be let go without touching the handle.
    assert _raised_at_collection(monkeypatch, lambda: streams.as_cupy_stream(cupy, TorchStream(handle))) == []

    def owned():
        stream = cupy.cuda.Stream.__new__(cupy.cuda.Stream)
        cupy.cuda.stream._BaseStream.__init__(stream, handle, -1)
        stream._foreign_stream_ref = None
        return stream

    raised = _raised_at_collection(monkeypatch, owned)
    assert len(raised) == 1 and isinstance(raised[0], CUDARuntimeError)


def test_cupy_streams_pass_through_and_other_objects_are_refused():
    assert streams.as_cupy_stream(cupy, cupy.cuda.Stream.null) is cupy.cuda.Stream.null
    with pytest.raises(TypeError, match="CUDA stream protocol"):
        streams.as_cupy_stream(cupy, 0x1234)


def test_stream_argument_is_refused_for_host_arrays():
    p = np.ones(8, np.float32)
    state = F.init_state(p)
    with pytest.raises(TypeError, match="stream= applies to CUDA arrays"):
        F.lars_update(p, np.ones_like(p), state, lr=0.1, stream=cupy.cuda.Stream.null)
    assert state.step == 0 and np.all(p == 1)


def test_set_grads_struct_is_packed_by_the_installed_cupy():
    patches = cuda.grad_patches([0x1000 + 256 * k for k in range(70)], np.ones(70, bool))
    assert len(patches) == 2
    for patch in patches:
        exc = _no_device_launch((None, patch))
        assert isinstance(exc, CUDARuntimeError), exc


def test_step_config_struct_is_packed_by_the_installed_cupy():
    step = plan.step_config(LarsConfig(lr=0.1, momentum=0.9))
    exc = _no_device_launch((None, None, None, np.uint64(0), np.uint64(0), step))
    assert isinstance(exc, CUDARuntimeError), exc


def test_a_multi_element_array_is_not_taken_for_a_struct():
    exc = _no_device_launch((None, np.zeros(2, cuda.GRAD_PATCH)))
    assert isinstance(exc, TypeError) and "size one" in str(exc)


@pytest.mark.skipif(not CUPY13.is_dir(), reason=f"CuPy 13 is not installed at {CUPY13} (make test does it)")
def test_the_device_free_seams_on_cupy_13():
    """The same calls on cupy-cuda12x 13.x, in a process of its own (one CuPy per process)."""
    script = textwrap.dedent(
        """
        import gc, types, weakref
        import numpy as np
        import cupy
        from cupy.cuda import function
        from cupy_backends.cuda.api.runtime import CUDARuntimeError
        from cupylars import cuda, plan, streams
        assert cupy.__version__.startswith("13."), cupy.__version__

        def launch(args):
            kernel = function.Function.__new__(function.Function)
            try:
                kernel((1,), (64,), args, stream=types.SimpleNamespace(ptr=0))
            except Exception as exc:
                return exc
            raise AssertionError("launched")

        # the struct as cupylars packs it: by value (stopped at the missing driver)
        for patch in cuda.grad_patches([0x1000, 0x2000], np.ones(2, bool)):
            assert isinstance(launch((None, patch)), CUDARuntimeError)
        from cupylars import plan
        from cupylars.config import LarsConfig
        step = plan.step_config(LarsConfig(lr=0.1, momentum=0.9))
        assert isinstance(launch((None, np.uint64(0), step)), CUDARuntimeError)
        # what CuPy 13 refuses: a structured NumPy scalar
        assert isinstance(launch((None, np.zeros((), cuda.GRAD_PATCH)[()])), TypeError)

        class TorchLike:  # the CUDA stream protocol, as torch implements it
            device = types.SimpleNamespace(index=0)
            def __cuda_stream__(self):
                return (0, 0x5EED0)
        wrapped = streams.as_cupy_stream(cupy, TorchLike())
        assert wrapped.ptr == 0x5EED0 and wrapped.device_id == 0
        unraised = []
        import sys
        sys.unraisablehook = unraised.append  # a handle destroyed without a driver raises here
        del wrapped
        gc.collect()
        assert not unraised, unraised
        print("ok", cupy.__version__)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CUPY13), str(Path(__file__).parents[1])])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok 13.")
