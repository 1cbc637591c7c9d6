import subprocess
import sys

from zrpc._procs import REPO


def test_demo_plain_runs_end_to_end():
    p = subprocess.run([sys.executable, "-m", "zrpc", "demo", "--plain"], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "calc.add(1, 2) -> 3" in p.stdout
    assert "4/4 slow calls completed" in p.stdout
    assert "summary: failures=0" in p.stdout
