"""The test suite. REPO is the checkout: tests run their children there, with it on the path,
so specs like `tests.worker_services:echo` import."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
