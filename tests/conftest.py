import os
import sys
from pathlib import Path

import pytest

# tests import their helpers (spec64, lars_cases) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The GPU tests (tests/test_kernels_gpu.py) must run on an image with CuPy and torch
# but no hypothesis, so hypothesis is configured only where it is installed; the
# property-based tests import it themselves and fail loudly without it.
try:
    from hypothesis import settings
except ImportError:
    settings = None

if settings is not None:
    # CI runs a fixed set of examples (derandomized): a red CI must mean a regression,
    # not a newly drawn example. Development runs keep drawing new examples and
    # remember failures.
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _torch_thread_count_is_restored():
    # torch's CPU results depend on its thread count in the last bits, and some tests compare
    # bit for bit with a subprocess that starts with the default count: a test that leaves
    # another count behind would make later tests depend on the order they run in.
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None and torch.get_num_threads() != before:
        after = torch.get_num_threads()
        torch.set_num_threads(before)
        pytest.fail(f"the test changed torch's thread count from {before} to {after} without restoring it")
