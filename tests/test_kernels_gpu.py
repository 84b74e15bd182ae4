"""The CUDA kernels on a GPU (CuPy arrays) against the NumPy reference, and against the
CPU emulator bit for bit.

Skipped without CuPy or a CUDA device. The checks live in tests/gpu_checks.py, which
needs neither pytest nor hypothesis, so that scripts/gpu_check.py can run the same
checks on an image with only NumPy and CuPy; this module runs them under pytest. Each
step starts the reference from a host copy of the device state, so every step is
compared on its own, with the tolerances of tests/test_kernels_emulated.py.
"""

from __future__ import annotations

import gpu_checks
import pytest

pytestmark = pytest.mark.gpu

cp, _why_not = gpu_checks.load_cupy()
if cp is None:
    pytest.skip(_why_not, allow_module_level=True)


@pytest.mark.parametrize(
    ("check", "kwargs"), [c[1:] for c in gpu_checks.CHECKS], ids=[c[0] for c in gpu_checks.CHECKS]
)
def test_gpu_check(check, kwargs):
    try:
        check(cp, **kwargs)
    except gpu_checks.Skip as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("case", gpu_checks.bitexact_cases(), ids=lambda c: c["name"])
def test_the_device_computes_what_the_emulator_computes(case):
    device = gpu_checks.device_runner(cp)(case)
    emulated = gpu_checks.emulator_runner()(case)
    problems = gpu_checks.compare_bits(device, emulated)
    assert not problems, "\n".join(problems[:20])
