"""``python -m cupylars``: what cupylars runs on here, and whether it works (cupylars/diagnostics.py)."""

import sys

from .diagnostics import main

sys.exit(main())
