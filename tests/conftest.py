import os
import sys
from pathlib import Path

from hypothesis import settings

# tests import their helpers (spec64, lars_cases) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

# CI runs a fixed set of examples (derandomized): a red CI must mean a regression, not a
# newly drawn example. Development runs keep drawing new examples and remember failures.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
