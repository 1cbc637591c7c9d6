"""The test suite. REPO is the checkout: tests run their children there, with it on the path,
so specs like `tests.worker_services:echo` import."""

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def run_to_end(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Runs a command that starts children of its own (a demo, a fuzzer) in the checkout:
    (exit code, stdout, stderr). Past `timeout` it gets SIGTERM, not SIGKILL, so it stops the
    brokers and workers it started (they run in sessions of their own); SIGKILL 20 s later."""
    p = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
    return p.returncode, out, err
