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
from ._config import is_loopback, resolve_brokers
from ._errors import ProtocolError
from ._frames import (
    H_BUDGET,
    H_PROBE,
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
from ._security import client_keys
from ._liveness import Backoff, LivenessTracker
from ._reply_cache import DONE, NEW, RUNNING, ReplyCache
from ._sockets import (
    HANDSHAKE_EVENTS,
    NOBLOCK,
    SocketOptions,
    Waker,
    handshake_outcome,
    make_socket,
    send_frames,
)

log = logging.getLogger("zrpc.worker")

BATCH = 256


class _Link:
    """This worker's connection to one broker."""

    def __init__(self, index: int, endpoint: str) -> None:
        self.index = index
        self.endpoint = endpoint
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None  # handshake events: a refused key is not silence
        self.refused = False
        self.last_sent = 0.0
        self.last_beat = 0.0
        self.acked = False  # our DISCONNECT was acknowledged
        self.backoff = Backoff()
        self.reconnect_at: float | None = None


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
        liveness: int = 3,
        send_tracebacks: bool | None = None,
        drain_timeout: float = 30.0,
        curve_server_key: str | None = None,
        curve_secret: str | None = None,
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
        # tracebacks show code and paths: by default only to clients on this machine
        self.send_tracebacks = (all(is_loopback(ep) for ep in self.brokers)
                                if send_tracebacks is None else send_tracebacks)
        self.drain_timeout = drain_timeout
        self.identity = uuid.uuid4().bytes
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.identity.hex()[:6]}"
        self._clock = clock
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._opts = SocketOptions(curve=client_keys(curve_server_key, curve_secret),
                                   **({"max_message": max_message} if max_message else {}))
        self._stop = threading.Event()
        self._hard_stop = threading.Event()
        self._results: deque[tuple[int, bytes, int, int, bytes]] = deque()
        self._inflight = 0
        self._jobs: queue.SimpleQueue[tuple[int, WorkerRequest, Method] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._aloop: asyncio.AbstractEventLoop | None = None
        self.counters: dict[str, int] = dict.fromkeys(("calls", "errors", "malformed"), 0)
        self._tracker: LivenessTracker[int] = LivenessTracker(clock, heartbeat_interval, liveness)
        self._cache = ReplyCache(clock)
        self._links = [_Link(i, ep) for i, ep in enumerate(self.brokers)]
        self._by_sock: dict[zmq.Socket, _Link] = {}
        self._poller = zmq.Poller()
        self._heartbeat = encode(Heartbeat(WORKER, {}))
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
        self._threads = [threading.Thread(target=self._handler_thread, name=f"zrpc-handler-{i}", daemon=True)
                         for i in range(self.concurrency)]
        for t in self._threads:
            t.start()
        if any(m.is_async for s in self.services.values() for m in s.methods.values()):
            self._aloop = asyncio.new_event_loop()
            threading.Thread(target=self._aloop.run_forever, name="zrpc-async", daemon=True).start()
        self._ready_frames = self._ready_msg()
        for link in self._links:
            self._connect(link)
        self.ready.set()
        log.info("worker %s serving %s on %s (concurrency %d)", self.name,
                 ", ".join(sorted(self.services)), ", ".join(self.brokers), self.concurrency)
        leaving_since: float | None = None
        try:
            while not self._hard_stop.is_set():
                now = self._clock()
                if self._stop.is_set() and leaving_since is None:
                    leaving_since = now
                    log.info("draining %d in-flight call(s), then leaving", self._inflight)
                    for link in self._links:
                        self._send(link, encode(Disconnect()))
                if leaving_since is not None:
                    acked = all(link.acked or link.sock is None for link in self._links)
                    if self._inflight == 0 and (acked or now - leaving_since > max(1.0, 4 * self._tracker.interval)):
                        break
                    if now - leaving_since > self.drain_timeout:
                        log.warning("drain timeout: leaving with %d call(s) unfinished", self._inflight)
                        break
                for sock, _ in self._poller.poll(timeout_ms(self._next_deadline(), now, cap=0.1)):
                    if sock is self._waker.socket:
                        continue
                    link = self._by_sock[sock]
                    if sock is link.monitor:
                        self._handshake(link)
                        continue
                    self._tracker.seen(link.index)
                    link.backoff.reset()
                    for _ in range(BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(link, frames)
                self._flush_results()
                self._keep_alive()
        finally:
            self._shutdown()

    # --- links to brokers: heartbeats and reconnects --------------------------------------

    def _connect(self, link: _Link) -> None:
        link.sock = make_socket(self._ctx, zmq.DEALER, identity=self.identity, options=self._opts)
        link.monitor = link.sock.get_monitor_socket(HANDSHAKE_EVENTS)
        link.sock.connect(link.endpoint)
        self._poller.register(link.sock, zmq.POLLIN)
        self._poller.register(link.monitor, zmq.POLLIN)
        self._by_sock[link.sock] = link
        self._by_sock[link.monitor] = link
        link.reconnect_at = None
        self._tracker.seen(link.index)  # a full liveness period to hear from it
        self._send(link, self._ready_frames)

    def _disconnect(self, link: _Link) -> None:
        if link.sock is not None:
            for s in (link.sock, link.monitor):
                self._poller.unregister(s)
                del self._by_sock[s]
            link.sock.disable_monitor()
            link.monitor.close(linger=0)  # type: ignore[union-attr]
            link.sock.close(linger=0)
            link.sock = link.monitor = None

    def _handshake(self, link: _Link) -> None:
        outcome = handshake_outcome(link.monitor)  # type: ignore[arg-type]
        if outcome is None:
            return
        if outcome[1] is not None and not link.refused:
            log.error("broker %s refused this worker: %s", link.endpoint, outcome[1])
        elif outcome[1] is None and link.refused:
            log.info("broker %s accepted this worker's key", link.endpoint)
        link.refused = outcome[1] is not None

    def _next_deadline(self) -> float:
        nxt = self._tracker.next_deadline()
        for link in self._links:
            if link.reconnect_at is not None:
                nxt = min(nxt, link.reconnect_at)
            elif link.sock is not None:
                nxt = min(nxt, link.last_beat + self._tracker.interval)
        return nxt

    def _keep_alive(self) -> None:
        """Heartbeats to every broker, and the Paranoid Pirate reconnect of silent ones."""
        now = self._clock()
        for index in self._tracker.expired():
            link = self._links[index]
            delay = link.backoff.next_delay()
            log.warning("broker %s silent for %.2fs: reconnecting in %.2fs", link.endpoint,
                        self._tracker.timeout, delay)
            self._disconnect(link)
            link.reconnect_at = now + delay
        interval = self._tracker.interval
        for link in self._links:
            if link.sock is None:
                if link.reconnect_at is not None and now >= link.reconnect_at:
                    log.info("reconnecting to broker %s", link.endpoint)
                    self._connect(link)
            elif now - link.last_beat >= interval:
                # every interval, busy or not: the broker's phi-accrual detector reads their rhythm
                link.last_beat = now
                self._send(link, self._heartbeat)

    def _on_frames(self, link: _Link, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            if self.counters["malformed"] <= 10:
                log.warning("dropped malformed message from broker %s: %s", link.endpoint, exc)
            return
        t = type(msg)
        if t is WorkerRequest:
            self._start(link.index, msg)  # type: ignore[arg-type]
        elif t is Heartbeat:
            info = msg.info  # type: ignore[union-attr]
            self._follow(info)
            if info.get("register") and not self._stop.is_set():  # a leaving worker stays gone
                log.info("broker %s asks this worker to register", link.endpoint)
                self._send(link, self._ready_frames)
        elif t is Disconnect:
            link.acked = True
        else:
            self.counters["malformed"] += 1

    def _follow(self, info: dict[str, Any]) -> None:
        """Adopts the broker's heartbeat settings, so a mismatch cannot make it declare us dead."""
        ms, liveness = info.get("interval_ms"), info.get("liveness")
        if type(ms) is int and type(liveness) is int and 10 <= ms <= 60_000 and 1 <= liveness <= 100:
            if ms / 1000 != self._tracker.interval or liveness != self._tracker.liveness:
                self._tracker.configure(ms / 1000, liveness)
                log.info("following the broker's heartbeat: %d ms x %d", ms, liveness)

    def _start(self, idx: int, req: WorkerRequest) -> None:
        if req.headers.get(H_PROBE):
            state, entry = self._cache.probe((req.client_id, req.request_id), idx)
            if state == NEW:
                self._reply(idx, req, Status.NOT_SEEN, b"")
            elif state == DONE:
                self._reply(idx, req, entry.status, entry.body)  # type: ignore[union-attr,arg-type]
            return  # RUNNING: the reply will come to this broker too
        svc = self.services.get(req.service)
        method = svc.get(req.method) if svc is not None else None
        if method is None:
            self._reply(idx, req, Status.METHOD_NOT_FOUND,
                        pack_error("MethodNotFound", f"no method {req.service}.{req.method} here"))
            return
        if req.headers.get(H_BUDGET, 1) <= 0:
            self._reply(idx, req, Status.TIMEOUT, pack_error("Timeout", "deadline passed"))
            return
        state, entry = self._cache.begin((req.client_id, req.request_id), idx)
        if state == DONE:  # a retried call that already ran here: answer, never re-run
            self._reply(idx, req, entry.status, entry.body)  # type: ignore[union-attr,arg-type]
            return
        if state == RUNNING:  # its reply will go to this broker too
            return
        self._inflight += 1
        self.counters["calls"] += 1
        if method.is_async and self._aloop is not None:
            asyncio.run_coroutine_threadsafe(self._run_async(idx, req, method), self._aloop)
        else:
            self._jobs.put((idx, req, method))

    def _reply(self, idx: int, req: WorkerRequest, status: int, body: bytes) -> None:
        self._send_reply(idx, encode(WorkerReply(req.client_id, req.request_id, status, body)))

    def _send_reply(self, idx: int, frames: list[bytes]) -> None:
        """To the broker the call came from, else through another one (it passes replies
        for calls it does not hold on to the client)."""
        first = self._links[idx]
        for link in [first, *(x for x in self._links if x is not first)]:
            if link.sock is not None and self._send(link, frames):
                return
        self.counters["replies_lost"] = self.counters.get("replies_lost", 0) + 1

    def _send(self, link: _Link, frames: list[bytes]) -> bool:
        """Never blocks the loop: a broker that cannot take more (gone, or its queue full)
        loses this message, which is counted; liveness and retries deal with the rest."""
        if link.sock is None:
            return False
        try:
            send_frames(link.sock, frames, NOBLOCK)
        except zmq.Again:
            self.counters["send_dropped"] = self.counters.get("send_dropped", 0) + 1
            return False
        link.last_sent = self._clock()
        return True

    # --- handler side (other threads) -----------------------------------------------------

    def _error(self, exc: BaseException) -> tuple[int, bytes]:
        tb = traceback.format_exc() if self.send_tracebacks else None
        return Status.ERROR, pack_error(type(exc).__name__, str(exc), tb)

    def _arguments(self, idx: int, req: WorkerRequest) -> tuple[list[Any], dict[str, Any]] | None:
        """The call's arguments; an undecodable body is answered here (None)."""
        try:
            return unpack_call(req.body)
        except ProtocolError as exc:
            self._done(idx, req, Status.PROTOCOL_ERROR, pack_error("ProtocolError", str(exc)))
            return None

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
        call = self._arguments(idx, req)
        if call is None:
            return
        try:
            status, body = self._pack(method.func(*call[0], **call[1]))
        except BaseException as exc:  # a handler must never take the worker down
            status, body = self._error(exc)
        self._done(idx, req, status, body)

    async def _run_async(self, idx: int, req: WorkerRequest, method: Method) -> None:
        call = self._arguments(idx, req)
        if call is None:
            return
        try:
            status, body = self._pack(await method.func(*call[0], **call[1]))
        except BaseException as exc:
            status, body = self._error(exc)
        self._done(idx, req, status, body)

    def _done(self, idx: int, req: WorkerRequest, status: int, body: bytes) -> None:
        self._results.append((idx, req.client_id, req.request_id, status, body))
        self._waker.wake()

    # --- back on the loop ------------------------------------------------------------------

    def _flush_results(self) -> None:
        self._waker.clear()
        results = self._results
        while results:
            idx, cid, rid, status, body = results.popleft()
            self._inflight -= 1
            if status != Status.OK:
                self.counters["errors"] += 1
            frames = encode(WorkerReply(cid, rid, status, body))
            for dest in self._cache.finish((cid, rid), status, body) or [idx]:
                self._send_reply(dest, frames)  # type: ignore[arg-type]

    def _shutdown(self) -> None:
        linger = 0 if self._hard_stop.is_set() else 2000  # let the last replies leave
        for link in self._links:
            if link.sock is not None:
                link.sock.disable_monitor()
                link.monitor.close(linger=0)  # type: ignore[union-attr]
                link.sock.close(linger=linger)
        self._waker.close()
        for _ in self._threads:
            self._jobs.put(None)
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._aloop.stop)
        if self._own_ctx:
            self._ctx.term()
        log.info("worker %s stopped", self.name)
