import re
import subprocess
import sys

import pytest

from zrpc._procs import REPO


@pytest.mark.slow
def test_demo_plain_tells_the_whole_story():
    p = subprocess.run([sys.executable, "-m", "zrpc", "demo", "--plain"], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    for step in ("SIGSTOP worker", "kill -9 workers", "kill -9 the primary broker", "restarting the old primary"):
        assert step in out
    assert "calls failed: 0" in out and "double executions: 0" in out
    assert int(re.search(r"calls made: (\d+)", out).group(1)) > 1000
    for alert in ("worker_suspect raised", "worker_lost raised", "redundancy_lost raised",
                  "failover raised", "failover resolved"):
        assert alert in out
    assert "Traceback" not in out + p.stderr
