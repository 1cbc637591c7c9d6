"""Worker: an I/O loop that owns one DEALER per broker; handlers run off that thread.

Sync handlers run in a thread pool of `concurrency` threads, async ones on an event loop
thread, so a busy handler never stops the loop from reading, replying and heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import traceback
import uuid
from collections import deque
import queue
from typing import Any, Iterable, Sequence

import zmq

from ._clock import Clock, monotonic, timeout_ms
from ._config import resolve_brokers
from ._errors import ProtocolError
from ._frames import (
    H_BUDGET,
    WORKER,
    Disconnect,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from ._serial import pack_error, pack_result, unpack_call
from ._service import Method, Service
from ._sockets import NOBLOCK, SocketOptions, Waker, make_socket, send_frames

log = logging.getLogger("zrpc.worker")

BATCH = 256


class Worker:
    """Serves one or more services to the brokers; `run()` blocks until stopped (SIGTERM
    drains in-flight calls first, a second signal stops at once)."""

    def __init__(
        self,
        services: Service | Iterable[Service],
        brokers: Sequence[str] | str | None = None,
        *,
        concurrency: int = 8,
        weight: float = 1.0,
        heartbeat_interval: float = 0.25,
        send_tracebacks: bool = True,
        drain_timeout: float = 30.0,
        context: zmq.Context | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
    ) -> None:
        svcs = [services] if isinstance(services, Service) else list(services)
        if not svcs or not all(isinstance(s, Service) for s in svcs):
            raise TypeError("Worker needs one or more zrpc.Service objects")
        if not all(s.methods for s in svcs):
            raise ValueError("every service needs at least one @method")
        names = [s.name for s in svcs]
        if len(set(names)) != len(names):
            raise ValueError(f"service names repeat: {names}")
        if not 1 <= concurrency <= 10_000:
            raise ValueError("concurrency must be between 1 and 10000")
        self.services = {s.name: s for s in svcs}
        self.brokers = resolve_brokers(brokers)
        self.concurrency = concurrency
        self.weight = weight
        self.heartbeat_interval = heartbeat_interval
        self.send_tracebacks = send_tracebacks
        self.drain_timeout = drain_timeout
        self.identity = uuid.uuid4().bytes
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.identity.hex()[:6]}"
        self._clock = clock
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._opts = SocketOptions(max_message=max_message) if max_message else SocketOptions()
        self._stop = threading.Event()
        self._hard_stop = threading.Event()
        self._results: deque[tuple[int, bytes, int, int, bytes]] = deque()
        self._inflight = 0
        self._jobs: queue.SimpleQueue[tuple[int, WorkerRequest, Method] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._aloop: asyncio.AbstractEventLoop | None = None
        self.counters: dict[str, int] = dict.fromkeys(("calls", "errors", "malformed"), 0)
        self.ready = threading.Event()  # set once READY went out to every broker

    # --- public --------------------------------------------------------------------------

    def stop(self, *, drain: bool = True) -> None:
        """Graceful by default: stop taking calls, finish in-flight ones, then leave."""
        if self._stop.is_set() or not drain:
            self._hard_stop.set()
        self._stop.set()

    def run(self) -> None:
        restore = self._install_signals()
        try:
            self._run()
        finally:
            for sig, old in restore.items():
                signal.signal(sig, old)

    # --- loop ----------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: self.stop())
        return old

    def _ready_msg(self) -> list[bytes]:
        return encode(Ready(self.name, {n: s.spec() for n, s in self.services.items()},
                            self.concurrency, self.weight,
                            {"host": socket.gethostname(), "pid": os.getpid()}))

    def _run(self) -> None:
        ctx = self._ctx
        self._waker = Waker(ctx, "worker-" + self.identity.hex())
        socks = [make_socket(ctx, zmq.DEALER, identity=self.identity, options=self._opts)
                 for _ in self.brokers]
        self._socks = socks
        self._threads = [threading.Thread(target=self._handler_thread, name=f"zrpc-handler-{i}", daemon=True)
                         for i in range(self.concurrency)]
        for t in self._threads:
            t.start()
        if any(m.is_async for s in self.services.values() for m in s.methods.values()):
            self._aloop = asyncio.new_event_loop()
            threading.Thread(target=self._aloop.run_forever, name="zrpc-async", daemon=True).start()
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        poller.register(self._waker.socket, zmq.POLLIN)
        ready = self._ready_msg()
        for i, (s, ep) in enumerate(zip(socks, self.brokers)):
            s.connect(ep)
            self._send(i, ready)
        self.ready.set()
        log.info("worker %s serving %s on %s (concurrency %d)", self.name,
                 ", ".join(sorted(self.services)), ", ".join(self.brokers), self.concurrency)
        acked = [False] * len(socks)
        leaving_since: float | None = None
        last_sent = [self._clock()] * len(socks)
        interval = self.heartbeat_interval
        try:
            while not self._hard_stop.is_set():
                now = self._clock()
                if self._stop.is_set() and leaving_since is None:
                    leaving_since = now
                    log.info("draining %d in-flight call(s), then leaving", self._inflight)
                    for i in range(len(socks)):
                        self._send(i, encode(Disconnect()))
                if leaving_since is not None:
                    if self._inflight == 0 and (all(acked) or now - leaving_since > max(1.0, 4 * interval)):
                        break
                    if now - leaving_since > self.drain_timeout:
                        log.warning("drain timeout: leaving with %d call(s) unfinished", self._inflight)
                        break
                next_hb = min(last_sent) + interval
                for sock, _ in poller.poll(timeout_ms(next_hb, now, cap=0.1)):
                    if sock is self._waker.socket:
                        continue
                    idx = socks.index(sock)
                    for _ in range(BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(idx, frames, acked, ready)
                self._flush_results(last_sent)
                now = self._clock()
                for i in range(len(socks)):
                    if now - last_sent[i] >= interval:
                        self._send(i, encode(Heartbeat(WORKER, {})))
                        last_sent[i] = now
        finally:
            self._shutdown()

    def _on_frames(self, idx: int, frames: list[bytes], acked: list[bool], ready: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            if self.counters["malformed"] <= 10:
                log.warning("dropped malformed message from broker %s: %s", self.brokers[idx], exc)
            return
        t = type(msg)
        if t is WorkerRequest:
            self._start(idx, msg)  # type: ignore[arg-type]
        elif t is Heartbeat:
            if msg.info.get("register"):  # type: ignore[union-attr]
                self._send(idx, ready)
        elif t is Disconnect:
            acked[idx] = True
        else:
            self.counters["malformed"] += 1

    def _start(self, idx: int, req: WorkerRequest) -> None:
        svc = self.services.get(req.service)
        method = svc.get(req.method) if svc is not None else None
        if method is None:
            self._reply(idx, req, Status.METHOD_NOT_FOUND,
                        pack_error("MethodNotFound", f"no method {req.service}.{req.method} here"))
            return
        if req.headers.get(H_BUDGET, 1) <= 0:
            self._reply(idx, req, Status.TIMEOUT, pack_error("Timeout", "deadline passed"))
            return
        self._inflight += 1
        self.counters["calls"] += 1
        if method.is_async and self._aloop is not None:
            asyncio.run_coroutine_threadsafe(self._run_async(idx, req, method), self._aloop)
        else:
            self._jobs.put((idx, req, method))

    def _reply(self, idx: int, req: WorkerRequest, status: int, body: bytes) -> None:
        self._send(idx, encode(WorkerReply(req.client_id, req.request_id, status, body)))

    def _send(self, idx: int, frames: list[bytes]) -> bool:
        """Never blocks the loop: a broker that cannot take more (gone, or its queue full)
        loses this message, which is counted; liveness and retries deal with the rest."""
        try:
            send_frames(self._socks[idx], frames, NOBLOCK)
            return True
        except zmq.Again:
            self.counters["send_dropped"] = self.counters.get("send_dropped", 0) + 1
            return False

    # --- handler side (other threads) -----------------------------------------------------

    def _error(self, exc: BaseException) -> tuple[int, bytes]:
        tb = traceback.format_exc() if self.send_tracebacks else None
        return Status.ERROR, pack_error(type(exc).__name__, str(exc), tb)

    def _decode_args(self, req: WorkerRequest) -> tuple[list[Any], dict[str, Any]] | tuple[int, bytes]:
        try:
            return unpack_call(req.body)
        except ProtocolError as exc:
            return Status.PROTOCOL_ERROR, pack_error("ProtocolError", str(exc))

    def _pack(self, value: Any) -> tuple[int, bytes]:
        try:
            return Status.OK, pack_result(value)
        except Exception as exc:
            return Status.ERROR, pack_error("TypeError", f"result cannot be sent with msgpack: {exc}")

    def _handler_thread(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            self._run_sync(*job)

    def _run_sync(self, idx: int, req: WorkerRequest, method: Method) -> None:
        decoded = self._decode_args(req)
        if isinstance(decoded[0], int):
            status, body = decoded  # type: ignore[misc]
        else:
            args, kwargs = decoded
            try:
                status, body = self._pack(method.func(*args, **kwargs))  # type: ignore[arg-type]
            except BaseException as exc:  # a handler must never take the worker down
                status, body = self._error(exc)
        self._done(idx, req, status, body)

    async def _run_async(self, idx: int, req: WorkerRequest, method: Method) -> None:
        decoded = self._decode_args(req)
        if isinstance(decoded[0], int):
            status, body = decoded  # type: ignore[misc]
        else:
            args, kwargs = decoded
            try:
                status, body = self._pack(await method.func(*args, **kwargs))  # type: ignore[arg-type]
            except BaseException as exc:
                status, body = self._error(exc)
        self._done(idx, req, status, body)

    def _done(self, idx: int, req: WorkerRequest, status: int, body: bytes) -> None:
        self._results.append((idx, req.client_id, req.request_id, status, body))
        self._waker.wake()

    # --- back on the loop ------------------------------------------------------------------

    def _flush_results(self, last_sent: list[float]) -> None:
        self._waker.clear()
        results = self._results
        if not results:
            return
        now = self._clock()
        while results:
            idx, cid, rid, status, body = results.popleft()
            self._inflight -= 1
            if status != Status.OK:
                self.counters["errors"] += 1
            self._send(idx, encode(WorkerReply(cid, rid, status, body)))
            last_sent[idx] = now

    def _shutdown(self) -> None:
        linger = 0 if self._hard_stop.is_set() else 2000  # let the last replies leave
        for s in self._socks:
            s.close(linger=linger)
        self._waker.close()
        for _ in self._threads:
            self._jobs.put(None)
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._aloop.stop)
        if self._own_ctx:
            self._ctx.term()
        log.info("worker %s stopped", self.name)
