"""The systems compared: how each one's servers start (as child processes on free ports) and
how its client makes the workloads' calls.

A system's client makes one call (`call`) and keeps calls in flight (`flood`) in the way that
system offers: zrpc futures or AsyncClient tasks, zerorpc's async results, gRPC futures or aio
tasks, one Pyro5 proxy per thread (Pyro5 has no pipelining), raw DEALER sends and receives.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
from _measure import Proc, in_flight, in_tasks, in_threads

import zrpc
from zrpc import _defaults as D
from zrpc._tools._pair import PairPorts, broker_args
from zrpc.testing import Processes, free_port, wait_until

SERVERS = str(Path(__file__).resolve().parent / "_servers.py")
CALL_TIMEOUT = 30.0
"""Seconds a benchmark call may take: far above any latency here, so a stall shows as one."""
UP_TIMEOUT = 20.0
"""Seconds a system has to start answering."""
QUEUE_LIMIT = 4096
"""The bench's brokers queue this many calls per service (`--queue-limit`): 1,024 calls in flight
to one worker of capacity 8 leave 1,016 waiting, beyond the default of 1,000 (Overloaded)."""

Start = Callable[[], None]


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    method: str
    window: int  # calls in flight (1: sequential)
    tasks: bool = False  # in flight from asyncio tasks (AsyncClient, grpc.aio)


class Client:
    """One system's client, made once its servers answer."""

    def call(self, method: str, *args: Any) -> object:
        raise NotImplementedError

    def flood(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class System:
    key: str
    label: str
    workloads: tuple[str, ...]
    needs: str | None  # the module it needs (None: zrpc's own)
    launch: Callable[[Processes], tuple[list[Proc], Client]]

    def missing(self) -> str | None:
        """Why it cannot run here (None: it can)."""
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not importable (pip install -e '.[bench]')"
        return None


def server(procs: Processes, role: str, *addresses: str) -> subprocess.Popen[bytes]:
    return procs.spawn([sys.executable, SERVERS, role, *addresses], name=role, die_with_parent=True)


def listening(port: int) -> bool:
    try:
        with socket.create_connection((D.LOCAL_HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def body(args: tuple[Any, ...]) -> bytes:
    return bytes(msgpack.packb([list(args), {}]))


def up(procs: Processes, pred: Callable[[], object], what: str) -> object:
    """Waits for `pred`, failing at once with the log tail when a child has died."""
    def check() -> object:
        procs.assert_running()
        return pred()

    return wait_until(check, UP_TIMEOUT, what=what)


# --- raw pyzmq ---------------------------------------------------------------------------------


class RawClient(Client):
    def __init__(self, ep: str) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.connect(ep)
        self.rid = 0

    def send(self, args: tuple[Any, ...]) -> None:
        self.rid += 1
        self.s.send_multipart([msgpack.packb(self.rid), body(args)])

    def recv(self, _token: object = None) -> object:
        _head, reply = self.s.recv_multipart()
        return msgpack.unpackb(reply)

    def call(self, method: str, *args: Any) -> object:
        self.send(args)
        return self.recv()

    def ready(self) -> bool:
        """One probe call; False if the forwarder had no worker yet (it drops the call)."""
        self.send((1, 2))
        if not self.s.poll(200):
            return False
        self.recv()
        return True

    def flood(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        return in_flight(lambda: self.send(args), self.recv, wl.window, warm, seconds, start)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@dataclass(frozen=True)
class RawSetup:
    """The forwarder's endpoints (front for clients, back for workers) and its processes."""

    front: str
    back: str
    procs: list[Proc]


def raw_forwarder(procs: Processes) -> tuple[RawSetup, RawClient]:
    """The forwarder and one raw worker, answering."""
    front, back = f"tcp://{D.LOCAL_HOST}:{free_port()}", f"tcp://{D.LOCAL_HOST}:{free_port()}"
    fwd = server(procs, "raw-forwarder", front, back)
    worker = server(procs, "raw-worker", back)
    client = RawClient(front)
    up(procs, client.ready, "raw forwarder and worker answering")
    return RawSetup(front, back, [Proc("forwarder", "broker", fwd.pid), Proc("worker", "server", worker.pid)]), client


def launch_raw(procs: Processes) -> tuple[list[Proc], Client]:
    setup, client = raw_forwarder(procs)
    return setup.procs, client


# --- zrpc --------------------------------------------------------------------------------------


def broker_status(ep: str, **client_kw: Any) -> dict[str, Any] | None:
    """zrpc.status of the broker at `ep` (None: no answer); `client_kw`: CURVE keys, say."""
    try:
        with zrpc.Client([ep], timeout=0.5, **client_kw) as c:
            status: dict[str, Any] = c.call("zrpc", "status")
            return status
    except zrpc.ZrpcError:
        return None


class ZrpcClient(Client):
    def __init__(self, brokers: list[str]) -> None:
        self.brokers = brokers
        self.client = zrpc.Client(brokers, timeout=CALL_TIMEOUT)
        self.calc = self.client.proxy("calc")

    def call(self, method: str, *args: Any) -> object:
        return getattr(self.calc, method)(*args)

    def flood(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        if wl.tasks:
            return asyncio.run(self._tasks(wl, args, warm, seconds, start))
        future = getattr(self.calc, wl.method).future
        return in_flight(lambda: future(*args), lambda f: f.result(), wl.window, warm, seconds, start)

    async def _tasks(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        async with zrpc.AsyncClient(self.brokers, timeout=CALL_TIMEOUT) as client:
            fn = getattr(client.proxy("calc"), wl.method)
            return await in_tasks(lambda: fn(*args), wl.window, warm, seconds, start)

    def close(self) -> None:
        self.client.close()


def registered(ep: str, **client_kw: Any) -> int:
    """Workers the broker at `ep` has registered (0 when it does not answer)."""
    return len((broker_status(ep, **client_kw) or {}).get("workers") or [])


def zrpc_worker(procs: Processes, brokers: list[str], count: int = 1) -> subprocess.Popen[bytes]:
    """One more `zrpc worker` of calc, once the first broker has `count` workers registered."""
    worker = procs.zrpc("worker", "zrpc.examples.calc:calc", "--brokers", ",".join(brokers),
                        "--log-level", "warning", name="zrpc-worker", die_with_parent=True)
    up(procs, lambda: registered(brokers[0]) >= count, "zrpc worker registered")
    return worker


def zrpc_broker(procs: Processes, *options: str, name: str = "zrpc-broker",
                client_kw: dict[str, Any] | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """One broker on a free port, answering (`options`: more `zrpc broker` flags; `client_kw`:
    what a client needs to be answered, CURVE keys for instance)."""
    ep = f"tcp://{D.LOCAL_HOST}:{free_port()}"
    broker = procs.zrpc("broker", "--frontend", ep, "--queue-limit", str(QUEUE_LIMIT), *options,
                        "--log-level", "warning", name=name, die_with_parent=True)
    up(procs, lambda: broker_status(ep, **(client_kw or {})), "zrpc broker answering")
    return ep, broker


def launch_zrpc(procs: Processes) -> tuple[list[Proc], Client]:
    ep, broker = zrpc_broker(procs)
    worker = zrpc_worker(procs, [ep])
    return [Proc("broker", "broker", broker.pid), Proc("worker", "server", worker.pid)], ZrpcClient([ep])


def launch_zrpc_pair(procs: Processes) -> tuple[list[Proc], Client]:
    """A primary and a backup as `zrpc pair` starts them (heartbeats on), on free ports."""
    ports = PairPorts((free_port(), free_port()), (free_port(), free_port()), (free_port(), free_port()))
    eps = [f"tcp://{D.LOCAL_HOST}:{p}" for p in ports.frontend]
    found = []
    for role in D.ROLES:
        p = procs.zrpc("broker", *broker_args(role, D.LOCAL_HOST, ports), "--queue-limit", str(QUEUE_LIMIT),
                       "--log-level", "warning", name=f"zrpc-{role}", die_with_parent=True)
        found.append(Proc(role, "broker", p.pid))

    def states() -> bool:
        return [(broker_status(ep) or {}).get("broker", {}).get("state") for ep in eps] == ["active", "passive"]

    up(procs, states, "zrpc pair settled (active, passive)")
    worker = zrpc_worker(procs, eps)
    return [*found, Proc("worker", "server", worker.pid)], ZrpcClient(eps)


# --- zerorpc -----------------------------------------------------------------------------------


class ZerorpcClient(Client):
    def __init__(self, ep: str) -> None:
        zerorpc: Any = importlib.import_module("zerorpc")
        self.client = zerorpc.Client(timeout=CALL_TIMEOUT)
        self.client.connect(ep)

    def call(self, method: str, *args: Any) -> object:
        return self.client(method, *args)

    def flood(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        def submit() -> Any:
            return self.client(wl.method, *args, **{"async": True})  # gevent AsyncResult

        return in_flight(submit, lambda r: r.get(), wl.window, warm, seconds, start)

    def close(self) -> None:
        self.client.close()


def launch_zerorpc(procs: Processes) -> tuple[list[Proc], Client]:
    port = free_port()
    p = server(procs, "zerorpc", f"tcp://{D.LOCAL_HOST}:{port}")
    up(procs, lambda: listening(port), "zerorpc server listening")
    return [Proc("server", "server", p.pid)], ZerorpcClient(f"tcp://{D.LOCAL_HOST}:{port}")


# --- gRPC --------------------------------------------------------------------------------------


class GrpcClient(Client):
    """The sync API: a blocking call, or `.future()` for calls in flight."""

    def __init__(self, port: int) -> None:
        self.grpc: Any = importlib.import_module("grpc")
        self.target = f"{D.LOCAL_HOST}:{port}"
        self.channel = self.grpc.insecure_channel(self.target)
        self.grpc.channel_ready_future(self.channel).result(timeout=UP_TIMEOUT)
        self.methods = {m: self.channel.unary_unary(f"/calc/{m}") for m in ("add", "echo")}

    def call(self, method: str, *args: Any) -> object:
        return msgpack.unpackb(self.methods[method](body(args), timeout=CALL_TIMEOUT))

    def flood(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        fn = self.methods[wl.method]
        return in_flight(lambda: fn.future(body(args), timeout=CALL_TIMEOUT),
                         lambda f: msgpack.unpackb(f.result()), wl.window, warm, seconds, start)

    def close(self) -> None:
        self.channel.close()


class GrpcAioClient(Client):
    """grpc.aio: a channel per measured row (an aio channel belongs to its event loop)."""

    def __init__(self, port: int) -> None:
        self.aio: Any = importlib.import_module("grpc.aio")
        self.target = f"{D.LOCAL_HOST}:{port}"

    def call(self, method: str, *args: Any) -> object:
        async def once() -> object:
            async with self.aio.insecure_channel(self.target) as channel:
                reply = await channel.unary_unary(f"/calc/{method}")(body(args), timeout=CALL_TIMEOUT)
                return msgpack.unpackb(reply)

        return asyncio.run(once())

    def flood(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        async def run() -> int:
            async with self.aio.insecure_channel(self.target) as channel:
                fn = channel.unary_unary(f"/calc/{wl.method}")

                async def one() -> object:
                    return msgpack.unpackb(await fn(body(args), timeout=CALL_TIMEOUT))

                return await in_tasks(one, wl.window, warm, seconds, start)

        return asyncio.run(run())


def launch_grpc(procs: Processes) -> tuple[list[Proc], Client]:
    port = free_port()
    p = server(procs, "grpc", str(port))
    up(procs, lambda: listening(port), "gRPC server listening")
    return [Proc("server", "server", p.pid)], GrpcClient(port)


def launch_grpc_aio(procs: Processes) -> tuple[list[Proc], Client]:
    port = free_port()
    p = server(procs, "grpc-aio", str(port))
    up(procs, lambda: listening(port), "gRPC aio server listening")
    client = GrpcAioClient(port)
    client.call("add", 1, 2)
    return [Proc("server", "server", p.pid)], client


# --- Pyro5 -------------------------------------------------------------------------------------


class Pyro5Client(Client):
    """A proxy belongs to one thread and makes one call at a time: calls in flight are
    threads, each with its own proxy (and connection)."""

    def __init__(self, port: int) -> None:
        pyro5: Any = importlib.import_module("Pyro5")
        self.api: Any = importlib.import_module("Pyro5.api")
        pyro5.config.SERIALIZER = "msgpack"
        self.uri = f"PYRO:calc@{D.LOCAL_HOST}:{port}"
        self.proxy = self.api.Proxy(self.uri)

    def call(self, method: str, *args: Any) -> object:
        return getattr(self.proxy, method)(*args)

    def flood(self, wl: Workload, args: tuple[Any, ...], warm: float, seconds: float, start: Start) -> int:
        proxies: list[Any] = []

        def make_call() -> Callable[[], object]:
            proxy = self.api.Proxy(self.uri)
            proxies.append(proxy)
            fn = getattr(proxy, wl.method)
            return lambda: fn(*args)

        try:
            return in_threads(make_call, wl.window, warm, seconds, start)
        finally:
            for proxy in proxies:
                proxy._pyroClaimOwnership()  # made in a thread of the flood, released from this one
                proxy._pyroRelease()

    def close(self) -> None:
        self.proxy._pyroRelease()


def launch_pyro5(procs: Processes) -> tuple[list[Proc], Client]:
    port = free_port()
    p = server(procs, "pyro5", str(port))
    up(procs, lambda: listening(port), "Pyro5 daemon listening")
    return [Proc("server", "server", p.pid)], Pyro5Client(port)


SEQ, PIPE, PIPE1K, TASKS = "seq", "pipe128", "pipe1024", "async256"
ECHO1K, ECHO64K, ECHO1M = "echo1k", "echo64k", "echo1m"
WORKLOADS = {
    SEQ: Workload(SEQ, "add(1, 2) sequential", "add", 1),
    PIPE: Workload(PIPE, "add(1, 2) 128 in flight", "add", 128),
    PIPE1K: Workload(PIPE1K, "add(1, 2) 1,024 in flight", "add", 1024),
    TASKS: Workload(TASKS, "add(1, 2) 256 asyncio tasks", "add", 256, tasks=True),
    ECHO1K: Workload(ECHO1K, "echo 1 KiB, 16 in flight", "echo", 16),
    ECHO64K: Workload(ECHO64K, "echo 64 KiB, 16 in flight", "echo", 16),
    ECHO1M: Workload(ECHO1M, "echo 1 MiB, 4 in flight", "echo", 4),
}
ALL = (SEQ, PIPE, PIPE1K, TASKS, ECHO1K, ECHO64K, ECHO1M)
SYNC = (SEQ, PIPE, PIPE1K, ECHO1K, ECHO64K, ECHO1M)

SYSTEMS = [
    System("raw", "raw pyzmq forwarder", SYNC, None, launch_raw),
    System("zrpc", "zrpc, one broker", ALL, None, launch_zrpc),
    System("zrpc-pair", "zrpc, pair", ALL, None, launch_zrpc_pair),
    System("zerorpc", "zerorpc", SYNC, "zerorpc", launch_zerorpc),
    System("pyro5", "Pyro5 (msgpack)", SYNC, "Pyro5", launch_pyro5),
    System("grpc", "gRPC sync", SYNC, "grpc", launch_grpc),
    System("grpc-aio", "gRPC aio", (PIPE, PIPE1K, TASKS), "grpc", launch_grpc_aio),
]
"""In the order they run: the peers last, and gRPC (whose client keeps threads) after the rest."""
