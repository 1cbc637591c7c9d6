"""The benchmark's load and idle peers, each a child process: `python benchmarks/_load.py MODE ...`.

Modes (each prints one JSON line on stdout when it is ready, and another when it is done):
- calls EP SECONDS GO [--raw]: one client (zrpc.Client, or a raw DEALER to the forwarder)
  calling add(1, 2) in a loop, warming up until the file GO exists, then counting for SECONDS:
  prints its calls, seconds, CPU seconds and every latency (µs), then exits;
- dealers EP N: N DEALER sockets in one context speaking the client protocol (zrpc._core._frames),
  each makes one call, then all stay connected and idle (the broker does not watch clients);
- clients EP N: N zrpc.Client objects as a program makes them (a context each), one call each,
  then idle: what a zrpc.Client costs in its own process;
- workers EP N: N zrpc.Worker objects (concurrency 1) serving calc, each heartbeating from a
  thread of its own, idle.
Idle modes wait until they are terminated.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq
from _measure import memory_kb, threads_of
from _systems import CALL_TIMEOUT, RawClient

import zrpc
from zrpc._core._frames import ClientReply, ClientRequest, decode_frames, encode
from zrpc._core._serial import outcome, pack_call

GO_TIMEOUT = 120.0
"""Seconds a load client waits for its start signal before it gives up (its parent is gone)."""
REPLY_TIMEOUT_MS = int(CALL_TIMEOUT * 1000)
CALC: zrpc.Service = importlib.import_module("zrpc.examples.calc").calc
"""The service `zrpc worker zrpc.examples.calc:calc` serves (zrpc.examples is mapped at install,
out of the type checker's sight)."""
SOCKETS_SPARE = 16
"""Sockets a context may hold beyond the DEALERs asked for (libzmq's own, and slack)."""


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def idle() -> None:
    """Until SIGTERM (Python's default ends the process)."""
    threading.Event().wait()


def caller(ep: str, raw: bool) -> tuple[Callable[[], object], Callable[[], None]]:
    """add(1, 2) through a zrpc.Client or a raw DEALER, and how to close it."""
    if raw:
        rc = RawClient(ep)
        return partial(rc.call, "add", 1, 2), rc.close
    client = zrpc.Client([ep], timeout=CALL_TIMEOUT)
    return partial(client.proxy("calc").add, 1, 2), client.close


def calls(ep: str, seconds: str, go: str, *flags: str) -> None:
    call, close = caller(ep, "--raw" in flags)
    if call() != 3:
        raise RuntimeError("add(1, 2) answered wrongly")
    say(ready=True, pid=os.getpid())
    deadline = time.monotonic() + GO_TIMEOUT
    while not os.path.exists(go):  # the warm-up: calls until every client is up and told to go
        call()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no start signal ({go}) within {GO_TIMEOUT:g}s")
    lat: list[int] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    end = t0 + float(seconds)
    t = t0
    while t < end:
        t = time.perf_counter()
        call()
        lat.append(int((time.perf_counter() - t) * 1e6))
    elapsed = time.perf_counter() - t0
    say(done=True, calls=len(lat), seconds=elapsed, cpu_s=time.process_time() - cpu0, lat_us=lat)
    close()


def dealers(ep: str, n: str) -> None:
    count = int(n)
    ctx = zmq.Context()
    ctx.max_sockets = count + SOCKETS_SPARE
    rss0 = memory_kb(os.getpid())
    socks = []
    for _ in range(count):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        socks.append(s)
    body = pack_call((1, 2), {})
    for s in socks:
        s.send_multipart(encode(ClientRequest(1, "calc", "add", {"budget_ms": REPLY_TIMEOUT_MS}, body)))
    for s in socks:
        if not s.poll(REPLY_TIMEOUT_MS):
            raise TimeoutError("a DEALER's call was not answered")
        reply = decode_frames(s.recv_multipart())
        if not isinstance(reply, ClientReply) or outcome(reply.status, reply.body) != 3:
            raise RuntimeError(f"unexpected answer {reply!r}")
    say(ready=True, clients=count, rss_kb=memory_kb(os.getpid()) - rss0)
    idle()


def clients(ep: str, n: str) -> None:
    count = int(n)
    rss0, threads0 = memory_kb(os.getpid()), threads_of(os.getpid())
    made = [zrpc.Client([ep], timeout=CALL_TIMEOUT) for _ in range(count)]
    for c in made:
        if c.call("calc", "add", 1, 2) != 3:
            raise RuntimeError("add(1, 2) answered wrongly")
    say(ready=True, clients=count, rss_kb=memory_kb(os.getpid()) - rss0,
        threads=threads_of(os.getpid()) - threads0)
    idle()


def workers(ep: str, n: str) -> None:
    made = [zrpc.Worker(CALC, [ep], concurrency=1) for _ in range(int(n))]
    for w in made:
        threading.Thread(target=w.run, daemon=True).start()
    deadline = time.monotonic() + GO_TIMEOUT
    for w in made:
        if not w.ready.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("a worker did not start")
    say(ready=True, workers=len(made))
    idle()


MODES: dict[str, Callable[..., None]] = {"calls": calls, "dealers": dealers, "clients": clients, "workers": workers}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MODES:
        print(f"usage: _load.py {{{','.join(MODES)}}} EP ...", file=sys.stderr)
        return 2
    try:
        MODES[argv[0]](*argv[1:])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
