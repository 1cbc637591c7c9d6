"""Shared fixtures: real broker and worker processes on free loopback ports, always killed.

A test fails when a process it started exits unasked, is restarted by `zrpc pair`, or logs a
traceback or an internal error (checked at teardown over every log in the test's log dir).
A test that means a process to end says so: `procs.signal(p, SIGKILL)`, `procs.terminate(p)`,
`procs.kill(p)`, `procs.expect_exit(p)`; one that means a log line, `procs.expect_in_log(...)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

import zrpc
from tests import CHILD_ENV, REPO
from tests.wire_tap import TcpRelay  # noqa: F401 (the fixtures cut links with it; tests patch it here)
from zrpc.testing import Processes, free_port, wait_until


def broker_status(ep: str, timeout: float = 0.5) -> dict[str, Any] | None:
    try:
        with zrpc.Client([ep], timeout=timeout) as c:
            return c.call("zrpc", "status")
    except zrpc.ZrpcError:
        return None


class Cluster:
    """Starts brokers and workers as child processes; the fixture kills them all."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.pairs: list[PairInfo] = []

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        """wait_until that fails at once, with the log tail, when a process of this test has
        died unasked (a dead broker is not worth a 15 s timeout)."""
        def check() -> Any:
            self.procs.assert_running()
            return pred()

        try:
            return wait_until(check, timeout, what=what)
        except TimeoutError:
            self.procs.assert_running()  # it died on the last poll: say so, not "timeout"
            raise

    def broker(self, *args: str, port: int | None = None, name: str = "broker") -> str:
        ep = f"tcp://127.0.0.1:{port or free_port()}"
        self.procs.zrpc("broker", "--frontend", ep, "--log-level", "debug", *args, name=name)
        self.wait(lambda: broker_status(ep), 15, what=f"broker at {ep} answering")
        return ep

    def pair(self, *args: str, relay: bool = False) -> PairInfo:
        """A primary and a backup on free ports, configured as `zrpc pair` does; with `relay`,
        each broker reaches its peer's state socket through a TcpRelay that can be cut."""
        from zrpc._tools._pair import PairPorts, broker_args

        ports = PairPorts((free_port(), free_port()), (free_port(), free_port()), (free_port(), free_port()))
        info = PairInfo(ports, self.procs)
        self.pairs.append(info)
        for role, _me, peer in (("primary", 0, 1), ("backup", 1, 0)):
            argv = broker_args(role, "127.0.0.1", ports)
            if relay:
                r = TcpRelay(free_port(), ports.state[peer])
                info.relays.append(r)
                argv[argv.index("--peer-state") + 1] = f"tcp://127.0.0.1:{r.port}"
            info.procs[role] = self.procs.zrpc("broker", *argv, "--log-level", "debug", *args, name=role)
        for ep in info.endpoints:
            self.wait(lambda ep=ep: broker_status(ep), 15, what=f"broker at {ep} answering")
        self.wait(lambda: info.states() == ["active", "passive"], 10, what="pair settled")
        return info

    def start_broker(self, info: PairInfo, role: str, *args: str) -> None:
        """(Re)starts one side of a pair, as `zrpc pair` restarts a dead broker."""
        from zrpc._tools._pair import broker_args

        argv = broker_args(role, "127.0.0.1", info.ports)
        if info.relays:
            r = info.relays[0 if role == "primary" else 1]
            argv[argv.index("--peer-state") + 1] = f"tcp://127.0.0.1:{r.port}"
        info.procs[role] = self.procs.zrpc("broker", *argv, "--log-level", "debug", *args,
                                           name=f"{role}-restarted")
        ep = info.endpoints[0 if role == "primary" else 1]
        self.wait(lambda: broker_status(ep), 15, what=f"broker at {ep} answering")

    def worker(self, ep: str, *args: str, spec: str = "zrpc.examples.calc:calc", wait: bool = True,
               env: dict[str, str] | None = None, name: str | None = None):
        before = len((broker_status(ep) or {}).get("workers", []))
        p = self.procs.zrpc("worker", spec, "--brokers", ep, "--log-level", "debug", *args,
                            env=env, name=name or f"worker{len(self.procs.procs)}")
        if wait:
            self.wait_workers(ep, before + 1)
        return p

    def wait_workers(self, ep: str, n: int, timeout: float = 15) -> dict[str, Any]:
        return self.wait(lambda: (lambda s: s if s and len(s["workers"]) == n else None)(broker_status(ep)),
                         timeout, what=f"{n} workers registered")


class PairInfo:
    def __init__(self, ports: Any, children: Processes | None = None) -> None:
        self.ports = ports
        self.procs: dict[str, Any] = {}
        self.relays: list[TcpRelay] = []
        self._children = children

    @property
    def endpoints(self) -> list[str]:
        return [f"tcp://127.0.0.1:{p}" for p in self.ports.frontend]

    @property
    def brokers(self) -> str:
        return ",".join(self.endpoints)

    def states(self) -> list[str | None]:
        """Each broker's state (None: no answer). A broker that died unasked fails the test
        here, at once, rather than as a wait for a state that cannot come."""
        if self._children is not None:
            self._children.assert_running(*(p for p in self.procs.values() if p is not None))
        return [(broker_status(ep) or {}).get("broker", {}).get("state") for ep in self.endpoints]

    def close(self) -> None:
        for r in self.relays:
            r.close()


@pytest.fixture
def procs(tmp_path) -> Processes:
    p = Processes(log_dir=tmp_path / "logs", env=CHILD_ENV, cwd=REPO)
    try:
        yield p
    finally:
        exits = p.exit_problems()  # before close() kills what is left
        p.close()
    problems = exits + p.log_problems()
    if problems:
        pytest.fail(f"{len(problems)} child process problem(s):\n\n" + "\n\n".join(problems),
                    pytrace=False)


@pytest.fixture
def cluster(procs) -> Cluster:
    c = Cluster(procs)
    yield c
    for pair in c.pairs:
        pair.close()


@pytest.fixture
def client_factory() -> Callable[..., zrpc.Client]:
    made: list[zrpc.Client] = []

    def make(*a: Any, **kw: Any) -> zrpc.Client:
        c = zrpc.Client(*a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def pytest_sessionstart(session: Any) -> None:
    os.environ.pop("ZRPC_BROKERS", None)
    os.environ.pop("ZRPC_CLUSTER", None)
