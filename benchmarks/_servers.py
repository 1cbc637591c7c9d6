"""The servers the benchmark compares zrpc with, each run as a child process:
`python benchmarks/_servers.py ROLE ADDRESS...`.

Every one serves the same two calls as zrpc.examples.calc, add(a, b) and echo(value):
- raw-forwarder FRONT BACK, raw-worker BACK: a Python ROUTER/ROUTER forwarder draining in
  batches and a DEALER worker with the handler inline, two frames [head, body] with msgpack
  bodies: the least a broker in Python can do;
- zerorpc ENDPOINT: a zerorpc.Server (gevent, its own msgpack framing and heartbeats);
- grpc PORT, grpc-aio PORT: gRPC's generic handlers with bytes in and out and msgpack bodies
  (nothing generated), the sync server with a pool of WORKER_CONCURRENCY threads, like a
  zrpc worker's handler threads;
- pyro5 PORT: a Pyro5 daemon (thread pool server; clients choose the msgpack serializer).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import zmq

from zrpc import _defaults as D

BATCH = 512
"""Messages the raw forwarder takes from one socket before it polls again."""
PYRO_THREADS = 1100
"""Pyro5 serves each connection from a thread of its pool: room for the 1,024 client threads."""
GRPC_OPTIONS = [("grpc.server.max_pending_requests", 4096)]
"""gRPC's core cancels calls waiting for a handler beyond 1,000 by default (the aio server keeps
them waiting there): room for the 1,024 calls in flight."""


def add(a: int, b: int) -> int:
    return a + b


def echo(value: object) -> object:
    return value


METHODS: dict[str, Callable[..., object]] = {"add": add, "echo": echo}


def raw_forwarder(front_ep: str, back_ep: str) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(front_ep)
    back.bind(back_ep)
    workers: list[bytes] = []
    turn = 0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            for _ in range(BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is back:
                    if len(frames) == 2:  # [wid, b"READY"]
                        workers.append(frames[0])
                    else:  # [wid, cid, head, body]
                        front.send_multipart(frames[1:])
                elif workers:
                    turn = (turn + 1) % len(workers)
                    back.send_multipart([workers[turn], *frames])


def raw_worker(back_ep: str) -> None:
    """The handler is chosen by the argument count: two is add, one is echo."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back_ep)
    s.send(b"READY")
    while True:
        cid, head, body = s.recv_multipart()
        args, _kwargs = msgpack.unpackb(body)
        result = add(*args) if len(args) == 2 else echo(*args)
        s.send_multipart([cid, head, msgpack.packb(result)])


def zerorpc_server(endpoint: str) -> None:
    zerorpc: Any = importlib.import_module("zerorpc")

    class Calc:
        def add(self, a: int, b: int) -> int:
            return add(a, b)

        def echo(self, value: object) -> object:
            return echo(value)

    server = zerorpc.Server(Calc())
    server.bind(endpoint)
    server.run()


def grpc_handler(grpc: Any, name: str, wrap_async: bool) -> Any:
    """A generic unary-unary handler: msgpack [args, kwargs] in, msgpack result out."""
    fn = METHODS[name]

    def handle(request: bytes, context: object) -> bytes:
        args, kwargs = msgpack.unpackb(request)
        return bytes(msgpack.packb(fn(*args, **kwargs)))

    async def handle_async(request: bytes, context: object) -> bytes:
        return handle(request, context)

    return grpc.unary_unary_rpc_method_handler(handle_async if wrap_async else handle)


def grpc_handlers(grpc: Any, wrap_async: bool) -> Any:
    return grpc.method_handlers_generic_handler(
        "calc", {name: grpc_handler(grpc, name, wrap_async) for name in METHODS})


def grpc_server(port: str) -> None:
    grpc: Any = importlib.import_module("grpc")
    server = grpc.server(ThreadPoolExecutor(max_workers=D.WORKER_CONCURRENCY), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc_handlers(grpc, wrap_async=False),))
    server.add_insecure_port(f"{D.LOCAL_HOST}:{port}")
    server.start()
    server.wait_for_termination()


def grpc_aio_server(port: str) -> None:
    grpc: Any = importlib.import_module("grpc")
    aio: Any = importlib.import_module("grpc.aio")

    async def serve() -> None:
        server = aio.server(options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((grpc_handlers(grpc, wrap_async=True),))
        server.add_insecure_port(f"{D.LOCAL_HOST}:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def pyro5_server(port: str) -> None:
    pyro5: Any = importlib.import_module("Pyro5")
    api: Any = importlib.import_module("Pyro5.api")
    pyro5.config.THREADPOOL_SIZE = PYRO_THREADS

    @api.expose
    class Calc:
        def add(self, a: int, b: int) -> int:
            return add(a, b)

        def echo(self, value: object) -> object:
            return echo(value)

    daemon = api.Daemon(host=D.LOCAL_HOST, port=int(port))
    daemon.register(Calc, "calc")
    daemon.requestLoop()


ROLES: dict[str, Callable[..., None]] = {
    "raw-forwarder": raw_forwarder, "raw-worker": raw_worker, "zerorpc": zerorpc_server,
    "grpc": grpc_server, "grpc-aio": grpc_aio_server, "pyro5": pyro5_server}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ROLES:
        print(f"usage: _servers.py {{{','.join(ROLES)}}} ADDRESS...", file=sys.stderr)
        return 2
    try:
        ROLES[argv[0]](*argv[1:])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
