"""Shared fixtures: real broker and worker processes on free loopback ports, always killed."""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

import zrpc
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

    def broker(self, *args: str, port: int | None = None, name: str = "broker") -> str:
        ep = f"tcp://127.0.0.1:{port or free_port()}"
        self.procs.zrpc("broker", "--frontend", ep, "--log-level", "debug", *args, name=name)
        wait_until(lambda: broker_status(ep), 15, what=f"broker at {ep} answering")
        return ep

    def worker(self, ep: str, *args: str, spec: str = "examples.calc:calc", wait: bool = True,
               env: dict[str, str] | None = None, name: str | None = None):
        before = len((broker_status(ep) or {}).get("workers", []))
        p = self.procs.zrpc("worker", spec, "--brokers", ep, "--log-level", "debug", *args,
                            env=env, name=name or f"worker{len(self.procs.procs)}")
        if wait:
            self.wait_workers(ep, before + 1)
        return p

    def wait_workers(self, ep: str, n: int, timeout: float = 15) -> dict[str, Any]:
        return wait_until(lambda: (lambda s: s if s and len(s["workers"]) == n else None)(broker_status(ep)),
                          timeout, what=f"{n} workers registered")


@pytest.fixture
def procs(tmp_path) -> Processes:
    p = Processes(log_dir=tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def cluster(procs) -> Cluster:
    return Cluster(procs)


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
