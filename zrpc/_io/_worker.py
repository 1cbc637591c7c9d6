"""Worker: an I/O loop that owns one DEALER per broker; handlers run off that thread.

Sync handlers run in a thread pool of `concurrency` threads, async ones on an event loop
thread, so a busy handler never stops the loop from reading, replying and heartbeating.
The loop sleeps until its next deadline (a heartbeat due, a broker's expiry, a reconnect, the
end of a drain) or until a handler rings the waker: an idle worker costs nothing.

Nothing a handler does can take a slot away: every call is answered, even when its error or
its result cannot be encoded, and a bug of ours costs one message (counted as an internal
error and reported in every heartbeat), never the loop or a handler thread.
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
from typing import Any, Coroutine, Iterable, Sequence

import zmq

from zrpc._core._clock import Clock, monotonic, timeout_ms
from zrpc._core._config import is_loopback, resolve_brokers
from zrpc._errors import ProtocolError
from zrpc._core._frames import (
    MAX_METHODS,
    MAX_SERVICES,
    H_BUDGET,
    H_IDEMPOTENT,
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
from zrpc._core._serial import pack_error, pack_result, unpack_call
from zrpc._core._service import Method, Service
from zrpc._io._security import client_keys
from zrpc._io._internal import InternalErrors
from zrpc._core._liveness import Backoff, LivenessTracker
from zrpc._core._reply_cache import DONE, NEW, RUNNING, UNKNOWN, ReplyCache
from zrpc._io._sockets import (
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
MAX_TEXT = 64 * 1024
"""An error's message and traceback are cut to this many characters: they are for people,
and a huge one must not make the reply larger than a message may be."""

_UNKNOWN_BODY = pack_error("CallStateUnknown",
                           "this call ran here already; its reply is no longer held")
_INTERNAL_BODY = pack_error("InternalError", "the worker failed to run or answer this call")


def _printable(text: str) -> str:
    """`text` as valid UTF-8 (lone surrogates escaped), so msgpack can always pack it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _cut(text: str, keep_end: bool = False) -> str:
    if len(text) <= MAX_TEXT:
        return text
    more = f"[... {len(text) - MAX_TEXT} more characters]"
    return more + text[-MAX_TEXT:] if keep_end else text[:MAX_TEXT] + more


def _describe(exc: BaseException) -> str:
    """str(exc), or a stand-in when its __str__ raises."""
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - any __str__ may fail in any way
        return f"<unprintable {type(exc).__name__} object>"


class _Link:
    """This worker's connection to one broker."""

    def __init__(self, index: int, endpoint: str) -> None:
        self.index = index
        self.endpoint = endpoint
        self.sock: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None  # handshake events: a refused key is not silence
        self.refused = False
        self.last_sent = 0.0
        self.last_beat = 0.0
        self.acked = False  # our DISCONNECT was acknowledged
        self.backoff = Backoff()
        self.reconnect_at: float | None = None
        self.epoch: int | None = None  # its epoch while its latest heartbeat says "active"


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
        context: zmq.Context[Any] | None = None,
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
        if len(svcs) > MAX_SERVICES or any(len(s.methods) > MAX_METHODS for s in svcs):
            # a READY beyond the protocol's limits would be dropped by every broker
            raise ValueError(f"a worker serves at most {MAX_SERVICES} services of at most "
                             f"{MAX_METHODS} methods each")
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
        self._counters: dict[str, int] = dict.fromkeys(("calls", "errors", "malformed",
                                                        "internal_errors"), 0)
        self._errors = InternalErrors(log, "worker")
        # handler threads and the event loop hand their own failures to the loop, which
        # alone counts and logs them
        self._thread_errors: deque[tuple[BaseException, str]] = deque()
        self._waker: Waker | None = None
        self._leaving_since: float | None = None
        self._tracker: LivenessTracker[int] = LivenessTracker(clock, heartbeat_interval, liveness)
        self._cache = ReplyCache(clock)
        self._links = [_Link(i, ep) for i, ep in enumerate(self.brokers)]
        self._by_sock: dict[zmq.Socket[Any], _Link] = {}
        self._poller = zmq.Poller()
        self.ready = threading.Event()  # set once READY went out to every broker

    # --- public --------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """calls, errors, malformed, internal_errors (and send_dropped, replies_lost)."""
        self._counters["internal_errors"] = self._errors.count
        return self._counters

    def stop(self, *, drain: bool = True) -> None:
        """Graceful by default: stop taking calls, finish in-flight ones, then leave."""
        if self._stop.is_set() or not drain:
            self._hard_stop.set()
        self._stop.set()
        waker = self._waker
        if waker is not None:  # the loop may be asleep until its next heartbeat
            waker.wake()

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
        old: dict[int, Any] = {}
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
        self._poller.register(self._waker.socket, zmq.POLLIN)
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
        if self._stop.is_set():  # stopped before the loop began
            self._waker.wake()
        try:
            while not self._hard_stop.is_set():
                with self._errors.contain("the drain step"):
                    if self._drained():
                        break
                timeout: int | None = 100  # should working out the deadline ever fail
                with self._errors.contain("the poll timeout"):
                    timeout = self._poll_timeout()
                for sock, _ in self._poller.poll(timeout):
                    if sock is self._waker.socket:
                        continue  # results are flushed below, on every wake-up
                    owner = self._by_sock.get(sock)
                    if owner is None:  # closed while handling this batch
                        continue
                    with self._errors.contain("messages from a broker"):
                        self._read(owner, sock)
                self._flush_results()
                self._keep_alive()
        finally:
            self._shutdown()

    def _read(self, link: _Link, sock: zmq.Socket[Any]) -> None:
        if sock is link.monitor:
            self._handshake(link)
            return
        self._tracker.seen(link.index)
        link.backoff.reset()
        for _ in range(BATCH):
            if link.sock is not sock:  # a message made us close it
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            with self._errors.contain("a message from a broker"):
                self._on_frames(link, frames)

    @property
    def _leaving(self) -> bool:
        return self._stop.is_set()

    def _drain_grace(self) -> float:
        """How long a drained worker waits for the brokers' acknowledgements."""
        return max(1.0, 4 * self._tracker.interval)

    def _drained(self) -> bool:
        """Once stopped: say DISCONNECT, then True when it is time to leave."""
        if not self._leaving:
            return False
        now = self._clock()
        if self._leaving_since is None:
            self._leaving_since = now
            log.info("draining %d in-flight call(s), then leaving", self._inflight)
            for link in self._links:
                self._send(link, encode(Disconnect()))
        acked = all(link.acked or link.sock is None for link in self._links)
        if self._inflight == 0 and (acked or now >= self._leaving_since + self._drain_grace()):
            return True
        if now >= self._leaving_since + self.drain_timeout:
            log.warning("drain timeout: leaving with %d call(s) unfinished", self._inflight)
            return True
        return False

    def _poll_timeout(self) -> int | None:
        """Milliseconds until the next deadline, never 0: a loop that polls without waiting
        burns a core (None: nothing is due, only a message or the waker can wake us)."""
        nxt = self._next_deadline()
        if nxt == float("inf"):
            return None
        return max(1, timeout_ms(nxt, self._clock()) or 0)

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
        link.acked = False
        link.last_beat = self._clock()  # READY (or DISCONNECT) counts as this interval's beat
        self._tracker.seen(link.index)  # a full liveness period to hear from it
        # a leaving worker that reconnects (its broker restarted) says it is leaving: it
        # must not register again and be handed new calls
        self._send(link, encode(Disconnect()) if self._leaving else self._ready_frames)

    def _disconnect(self, link: _Link) -> None:
        link.epoch = None  # what it announced no longer holds
        sock, monitor = link.sock, link.monitor
        link.sock = link.monitor = None  # closed, whatever fails below
        for s in (sock, monitor):
            if s is not None:
                self._by_sock.pop(s, None)
                self._poller.unregister(s)
        if sock is not None:
            sock.disable_monitor()
            sock.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)

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
        """The earliest of: a heartbeat due, a broker's expiry, a reconnect, a drain's end."""
        now = self._clock()
        tracker = self._tracker
        nxt = float("inf")
        for link in self._links:
            if link.sock is None:
                if link.reconnect_at is not None:
                    nxt = min(nxt, link.reconnect_at)
                continue
            nxt = min(nxt, link.last_beat + tracker.interval)
            silence = tracker.silence(link.index)
            if silence != float("inf"):
                nxt = min(nxt, now - silence + tracker.timeout)
        if self._leaving_since is not None:
            nxt = min(nxt, self._leaving_since + self.drain_timeout)
            if self._inflight == 0:  # else the end of the grace changes nothing: no spin
                nxt = min(nxt, self._leaving_since + self._drain_grace())
        return nxt

    def _keep_alive(self) -> None:
        """Heartbeats to every broker, and the Paranoid Pirate reconnect of silent ones."""
        now = self._clock()
        for index in self._tracker.expired():
            with self._errors.contain("a silent broker"):
                self._silent(self._links[index], now)
        interval = self._tracker.interval
        for link in self._links:
            with self._errors.contain("a heartbeat or reconnect"):
                if link.sock is None:
                    if link.reconnect_at is not None and now >= link.reconnect_at:
                        log.info("reconnecting to broker %s", link.endpoint)
                        link.reconnect_at = now + link.backoff.next_delay()  # if this fails
                        self._connect(link)
                elif now - link.last_beat >= interval:
                    # every interval, busy or not: the broker's phi-accrual detector reads
                    # their rhythm
                    link.last_beat = now
                    self._send(link, encode(Heartbeat(WORKER, self._info())))

    def _silent(self, link: _Link, now: float) -> None:
        if self._leaving and link.acked:
            # it let us go and has nothing more for us: leaving means staying gone
            log.info("broker %s has let this worker go: not reconnecting", link.endpoint)
            self._disconnect(link)
            link.reconnect_at = None
            return
        delay = link.backoff.next_delay()
        log.warning("broker %s silent for %.2fs: reconnecting in %.2fs", link.endpoint,
                    self._tracker.timeout, delay)
        self._disconnect(link)
        link.reconnect_at = now + delay

    def _info(self) -> dict[str, Any]:
        """What every heartbeat tells the brokers: our own bugs, and the newest epoch any
        broker now says it is active with (an active broker with a lower one steps down)."""
        epochs = [link.epoch for link in self._links if link.epoch is not None]
        return {"internal_errors": self._errors.count, "active_epoch": max(epochs, default=0)}

    def _on_frames(self, link: _Link, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            self._counters["malformed"] += 1
            if self._counters["malformed"] <= 10:
                log.warning("dropped malformed message from broker %s: %s", link.endpoint, exc)
            return
        t = type(msg)
        if t is WorkerRequest:
            self._start(link.index, msg)  # type: ignore[arg-type]
        elif t is Heartbeat:
            info = msg.info  # type: ignore[union-attr]
            self._follow(info)
            state, epoch = info.get("state"), info.get("epoch")
            link.epoch = epoch if state == "active" and type(epoch) is int and epoch >= 0 else None
            if info.get("register") is True and not self._leaving:  # a leaving worker stays gone
                log.info("broker %s asks this worker to register", link.endpoint)
                self._send(link, self._ready_frames)
        elif t is Disconnect:
            if self._leaving:  # only an answer to ours means anything
                link.acked = True
        else:
            self._counters["malformed"] += 1

    def _follow(self, info: dict[str, Any]) -> None:
        """Adopts the broker's heartbeat settings, so a mismatch cannot make it declare us dead."""
        ms, liveness = info.get("interval_ms"), info.get("liveness")
        if type(ms) is int and type(liveness) is int and 10 <= ms <= 60_000 and 1 <= liveness <= 100:
            if ms / 1000 != self._tracker.interval or liveness != self._tracker.liveness:
                self._tracker.configure(ms / 1000, liveness)
                log.info("following the broker's heartbeat: %d ms x %d", ms, liveness)

    def _start(self, idx: int, req: WorkerRequest) -> None:
        key = (req.client_id, req.request_id)
        if req.headers.get(H_PROBE) is True:
            state, entry = self._cache.probe(key, idx)
            if state == NEW:
                self._reply(idx, req, Status.NOT_SEEN, b"")
            elif state == DONE:
                self._reply(idx, req, entry.status, entry.body)  # type: ignore[union-attr,arg-type]
            elif state == UNKNOWN:  # it ran here, the reply is gone: never "not seen"
                self._reply(idx, req, Status.CALL_STATE_UNKNOWN, _UNKNOWN_BODY)
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
        # the broker says whether it may retry the call; a method declared non-idempotent
        # stays so whatever a header says
        idempotent = req.headers.get(H_IDEMPOTENT) is True and method.idempotent
        state, entry = self._cache.begin(key, idx, idempotent)
        if state == DONE:  # a retried call that already ran here: answer, never re-run
            self._reply(idx, req, entry.status, entry.body)  # type: ignore[union-attr,arg-type]
            return
        if state == UNKNOWN:
            self._reply(idx, req, Status.CALL_STATE_UNKNOWN, _UNKNOWN_BODY)
            return
        if state == RUNNING:  # its reply will go to this broker too
            return
        self._inflight += 1
        self._counters["calls"] += 1
        try:
            if method.is_async and self._aloop is not None:
                coro = self._run_async(idx, req, method)
                try:
                    fut = asyncio.run_coroutine_threadsafe(coro, self._aloop)
                except BaseException:
                    coro.close()
                    raise
                fut.add_done_callback(self._async_finished)
            else:
                self._jobs.put((idx, req, method))
        except Exception as exc:  # noqa: BLE001 - the call is answered, the slot kept
            self._errors.record(exc, "starting a call")
            self._done(idx, req, Status.ERROR, _INTERNAL_BODY)

    def _reply(self, idx: int, req: WorkerRequest, status: int, body: bytes) -> None:
        self._send_reply(idx, encode(WorkerReply(req.client_id, req.request_id, status, body)))

    def _send_reply(self, idx: int, frames: list[bytes]) -> None:
        """To the broker the call came from, else through another one (it passes replies
        for calls it does not hold on to the client)."""
        first = self._links[idx]
        for link in [first, *(x for x in self._links if x is not first)]:
            if link.sock is not None and self._send(link, frames):
                return
        self._counters["replies_lost"] = self._counters.get("replies_lost", 0) + 1

    def _send(self, link: _Link, frames: list[bytes]) -> bool:
        """Never blocks the loop: a broker that cannot take more (gone, or its queue full)
        loses this message, which is counted; liveness and retries deal with the rest."""
        if link.sock is None:
            return False
        try:
            send_frames(link.sock, frames, NOBLOCK)
        except zmq.Again:
            self._counters["send_dropped"] = self._counters.get("send_dropped", 0) + 1
            return False
        link.last_sent = self._clock()
        return True

    # --- handler side (other threads) -----------------------------------------------------

    def _error(self, exc: BaseException) -> tuple[int, bytes]:
        """The ERROR reply for a handler's exception; never raises, whatever the exception
        holds (lone surrogates, a __str__ that raises, megabytes of text)."""
        kind = "Exception"
        try:
            kind = _printable(type(exc).__name__)[:256]
            tb = None
            if self.send_tracebacks:
                tb = _cut(_printable("".join(traceback.format_exception(exc))), keep_end=True)
            return Status.ERROR, pack_error(kind, _cut(_printable(_describe(exc))), tb)
        except Exception as bug:  # noqa: BLE001 - a gap in the above: still answer the call
            self._thread_error(bug, "encoding a handler's error")
            return Status.ERROR, pack_error(kind, f"<unprintable {kind} object>")

    def _pack(self, value: Any) -> tuple[int, bytes]:
        try:
            return Status.OK, pack_result(value)
        except Exception as exc:  # noqa: BLE001 - whatever msgpack raises for it
            text = _cut(_printable(f"result cannot be sent with msgpack: {_describe(exc)}"))
            return Status.ERROR, pack_error("TypeError", text)

    def _handler_thread(self) -> None:
        """Runs calls until told to stop; nothing a handler does ends it."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            idx, req, method = job
            try:
                status, body = self._call_sync(req, method)
            except BaseException as exc:  # noqa: BLE001 - our bug: count it, answer the call
                self._thread_error(exc, "a call in a handler thread")
                status, body = Status.ERROR, _INTERNAL_BODY
            self._done(idx, req, status, body)

    def _call_sync(self, req: WorkerRequest, method: Method) -> tuple[int, bytes]:
        try:
            args, kwargs = unpack_call(req.body)
        except ProtocolError as exc:
            return Status.PROTOCOL_ERROR, pack_error("ProtocolError", str(exc))
        try:
            value = method.func(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - a handler must never take the worker down
            return self._error(exc)
        return self._pack(value)

    async def _run_async(self, idx: int, req: WorkerRequest, method: Method) -> None:
        try:
            status, body = await self._call_async(req, method)
        except BaseException as exc:  # noqa: BLE001 - our bug: count it, answer the call
            self._thread_error(exc, "an async call")
            status, body = Status.ERROR, _INTERNAL_BODY
        self._done(idx, req, status, body)

    async def _call_async(self, req: WorkerRequest, method: Method) -> tuple[int, bytes]:
        try:
            args, kwargs = unpack_call(req.body)
        except ProtocolError as exc:
            return Status.PROTOCOL_ERROR, pack_error("ProtocolError", str(exc))
        try:
            coro: Coroutine[Any, Any, Any] = method.func(*args, **kwargs)
            value = await coro
        except BaseException as exc:  # noqa: BLE001 - cancellation too: the call is answered
            return self._error(exc)
        return self._pack(value)

    def _async_finished(self, fut: Any) -> None:
        """The future of an async call: _run_async lets nothing out, so anything here is a bug
        that must be seen, not left in a discarded future."""
        if not fut.cancelled() and fut.exception() is not None:
            self._thread_error(fut.exception(), "an async call")

    def _thread_error(self, exc: BaseException, what: str) -> None:
        """From any thread: the loop counts and logs it (it alone touches the counters)."""
        self._thread_errors.append((exc, what))
        waker = self._waker
        if waker is not None:
            waker.wake()

    def _done(self, idx: int, req: WorkerRequest, status: int, body: bytes) -> None:
        self._results.append((idx, req.client_id, req.request_id, status, body))
        waker = self._waker
        if waker is not None:
            waker.wake()

    # --- back on the loop ------------------------------------------------------------------

    def _flush_results(self) -> None:
        with self._errors.contain("the waker"):
            self._waker.clear()  # type: ignore[union-attr]
        errors = self._thread_errors
        while errors:
            exc, what = errors.popleft()
            self._errors.record(exc, what)
        results = self._results
        while results:
            idx, cid, rid, status, body = results.popleft()
            self._inflight -= 1
            with self._errors.contain("a handler's reply"):
                if status != Status.OK:
                    self._counters["errors"] += 1
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
        waker, self._waker = self._waker, None  # a signal now must not wait on its lock
        if waker is not None:
            waker.close()
        for _ in self._threads:
            self._jobs.put(None)
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._aloop.stop)
        if self._own_ctx:
            self._ctx.term()
        log.info("worker %s stopped", self.name)
