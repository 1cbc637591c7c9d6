"""Worker: the I/O loop around WorkerCore; one DEALER per broker, handlers off this thread.

The loop only translates: frames from a broker's socket and handlers' results go to the core,
whose actions (send, open or close a link, run a handler, log, exit) it carries out. Every rule
(admission, the reply cache, probes, draining, liveness, heartbeats) is the core's
(zrpc/_core/_worker.py). Sync handlers run in a pool of `concurrency` threads, async ones on an
event loop thread, so a busy handler never stops the loop from reading, replying and
heartbeating; only handlers declared inline run on the loop's thread (until one is slow).
Wherever a handler runs, `zrpc.current_call()` names its call meanwhile, and the worker's
middleware runs around it in the handler's thread (or task). The loop sleeps until the core's
next deadline or until a handler or stop() rings the waker: an idle worker costs nothing.

Nothing a handler does can take a slot away: every call is answered, even when its error or
its result cannot be encoded, and a bug of ours costs one message (counted as an internal
error and reported in every heartbeat), never the loop or a handler thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import socket
import threading
import traceback
import uuid
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

import zmq

from zrpc._core._clock import Clock, monotonic, timeout_ms
from zrpc._core._config import MAX_WORKER_BROKERS, is_loopback, resolve_brokers, resolve_cluster
from zrpc._core._context import CallContext, Chain, entered, left
from zrpc._core._frames import MAX_METHODS, MAX_SERVICES, Status
from zrpc._core._membership import parse_cluster
from zrpc._core._serial import pack_error, pack_result, unpack_call
from zrpc._core._service import Service
from zrpc._core._worker import (
    INTERNAL_BODY,
    Action,
    CallFinished,
    CloseLink,
    Exit,
    HandshakeEnded,
    InlineRan,
    Log,
    OpenFailed,
    OpenLink,
    RunHandler,
    Send,
    SendReply,
    StopRequested,
    WorkerCore,
)
from zrpc._defaults import (
    CLUSTER_NAME,
    DRAIN_TIMEOUT,
    HEARTBEAT_INTERVAL,
    INLINE_LIMIT,
    LIVENESS,
    WORKER_CONCURRENCY,
    WORKER_PREFETCH,
)
from zrpc._errors import ProtocolError
from zrpc._io._follow import ClusterFollower
from zrpc._io._internal import InternalErrors
from zrpc._io._security import client_keys
from zrpc._io._sockets import (
    HANDSHAKE_EVENTS,
    Sent,
    SocketOptions,
    Waker,
    handshake_outcome,
    make_socket,
    recv_nowait,
    send_nowait,
)

log = logging.getLogger("zrpc.worker")

BATCH = 256
"""Messages read from one socket per wake-up: the other broker and the results wait no longer."""
MAX_TEXT = 64 * 1024
"""An error's message and traceback are cut to this many characters: they are for people,
and a huge one must not make the reply larger than a message may be."""
LINGER_MS = 2000
"""How long closing sockets may take to let the last replies leave, unless stopped at once."""


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


PREFORK_ENV = "ZRPC_PREFORK"
"""Set by `zrpc worker --processes N` in each process it forks: `INDEX:RESTARTS` (which of the N,
and how often it was restarted), said in READY so the brokers can tell of restarts."""


def _ready_info() -> dict[str, Any]:
    """What READY tells the brokers of this process: host, pid, and its place in a prefork set."""
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    index, _, restarts = os.environ.get(PREFORK_ENV, "").partition(":")
    if index.isdigit() and restarts.isdigit():
        info["prefork"], info["restarts"] = int(index), int(restarts)
    return info


class Worker:
    """Serves one or more services to the brokers; `run()` blocks until stopped (SIGTERM
    drains in-flight calls first, a second signal stops at once).

    `cluster="etcd://H:P[,...]"` (or $ZRPC_CLUSTER) serves every broker of a cluster instead,
    following them as they join and leave, each announced a share of the capacity.

    `middleware=[m, ...]` (zrpc.Middleware, or any object with `before(ctx)`, `after(ctx,
    result)` or `on_error(ctx, exc)`) sees every call: `before` hooks in this order, then the
    handler, then `after` or `on_error` in the reverse order. A `before` that raises answers
    the call with its error and the handler does not run; an `after` or `on_error` that raises
    is logged and counted (`counters["middleware_errors"]`), and the reply stands. Async hooks
    are awaited around async handlers, and refused when a served method is sync."""

    def __init__(
        self,
        services: Service | Iterable[Service],
        brokers: Sequence[str] | str | None = None,
        *,
        concurrency: int = WORKER_CONCURRENCY,
        prefetch: int = WORKER_PREFETCH,
        weight: float = 1.0,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        liveness: int = LIVENESS,
        send_tracebacks: bool | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
        curve_server_key: str | None = None,
        curve_secret: str | None = None,
        context: zmq.Context[Any] | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
        cluster: str | None = None,
        cluster_name: str = CLUSTER_NAME,
        middleware: Iterable[object] | None = None,
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
        if not 0 <= prefetch <= 10_000:
            raise ValueError("prefetch must be between 0 and 10000")
        self.services = {s.name: s for s in svcs}
        self._chain = Chain(middleware, log)
        if any(not m.is_async for s in svcs for m in s.methods.values()):
            self._chain.check_sync("sync handlers")
        self.cluster = resolve_cluster(brokers, cluster)
        self.cluster_name = cluster_name
        self.brokers = [] if self.cluster else resolve_brokers(brokers, MAX_WORKER_BROKERS)
        self.concurrency = concurrency
        self.weight = weight
        self.heartbeat_interval = heartbeat_interval
        # tracebacks show code and paths: by default only to clients on this machine
        here = ([f"tcp://{h}:{p}" for h, p in parse_cluster(self.cluster)] if self.cluster
                else self.brokers)  # a cluster on this machine has its etcd here too
        self.send_tracebacks = (all(is_loopback(ep) for ep in here)
                                if send_tracebacks is None else send_tracebacks)
        self.drain_timeout = drain_timeout
        self.identity = uuid.uuid4().bytes
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.identity.hex()[:6]}"
        self._clock = clock
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._opts = SocketOptions(curve=client_keys(curve_server_key, curve_secret),
                                   **({"max_message": max_message} if max_message else {}))
        self._errors = InternalErrors(log, "worker")
        self._core = WorkerCore(
            clock, self.services, self.brokers, name=self.name, concurrency=concurrency,
            prefetch=prefetch, weight=weight, info=_ready_info(),
            heartbeat_interval=heartbeat_interval, liveness=liveness, drain_timeout=drain_timeout,
            internal_errors=lambda: self._errors.count, split=self.cluster is not None)
        # other threads hand the loop their stops, results and failures; it alone feeds the core
        self._stops: deque[bool] = deque()
        self._results: deque[tuple[RunHandler, int, bytes]] = deque()
        self._thread_errors: deque[tuple[BaseException, str]] = deque()
        self._jobs: queue.SimpleQueue[RunHandler | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._athread: threading.Thread | None = None
        self._io_counters: dict[str, int] = {}  # send_dropped, replies_lost: once they happen
        self._waker: Waker | None = None
        self._exit: Exit | None = None
        self._socks: list[zmq.Socket[Any] | None] = [None] * len(self.brokers)
        # handshake events: a refused key is not silence
        self._monitors: list[zmq.Socket[Any] | None] = [None] * len(self.brokers)
        self._by_sock: dict[zmq.Socket[Any], tuple[int, bool]] = {}  # -> (link, is its monitor)
        self._poller = zmq.Poller()
        self._follower: ClusterFollower | None = None  # cluster mode, from run()
        self._members: dict[str, int] = {}  # cluster mode: broker name -> link
        self.ready = threading.Event()  # set once READY went out to every broker

    # --- public --------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """calls, errors, malformed, internal_errors, unauthorized (refused by a method's
        allow=), middleware_errors (and send_dropped, replies_lost)."""
        core = self._core
        return {"calls": core.calls, "errors": core.errors, "malformed": core.malformed.count,
                "internal_errors": self._errors.count, "unauthorized": core.unauthorized,
                "middleware_errors": self._chain.errors, **self._io_counters}

    def stop(self, *, drain: bool = True) -> None:
        """Graceful by default: stop taking calls, finish in-flight ones, then leave."""
        self._stops.append(drain)  # the core decides: a second stop leaves at once
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

    def _run(self) -> None:
        waker = self._waker = Waker(self._ctx, "worker-" + self.identity.hex())
        self._poller.register(waker.socket, zmq.POLLIN)
        self._threads = [threading.Thread(target=self._handler_thread, name=f"zrpc-handler-{i}", daemon=True)
                         for i in range(self.concurrency)]
        for t in self._threads:
            t.start()
        if any(m.is_async for s in self.services.values() for m in s.methods.values()):
            self._aloop = asyncio.new_event_loop()
            self._athread = threading.Thread(target=self._aloop.run_forever, name="zrpc-async", daemon=True)
            self._athread.start()
        self._take_stops()  # stopped before run(): the links open with DISCONNECT, never READY
        for action in self._core.start():  # not contained: a broker that cannot be opened at
            self._do(action)               # all is the caller's error
        if self.cluster is not None:
            self._follower = ClusterFollower(self.cluster, waker.wake, name=self.cluster_name, logger=log)
            self._follower.start()
        self.ready.set()
        log.info("worker %s serving %s on %s (concurrency %d, prefetch %d)", self.name,
                 ", ".join(sorted(self.services)),
                 f"the brokers of cluster {self.cluster_name} ({self.cluster})" if self.cluster
                 else ", ".join(self.brokers), self.concurrency, self._core.prefetch)
        record = self._errors.record
        try:
            while True:
                self._take_stops()
                if self._exit is not None:
                    break
                timeout: int | None = 100  # should working out the deadline ever fail
                # plain tries on every wake-up: contain()'s context manager costs a microsecond
                # each time, a try nothing until it raises
                try:
                    timeout = self._poll_timeout()
                except Exception as exc:  # noqa: BLE001 - a bug costs this step, never the loop
                    record(exc, "the poll timeout")
                for sock, _ in self._poller.poll(timeout):
                    if sock is waker.socket:
                        continue  # results are flushed below, on every wake-up
                    owner = self._by_sock.get(sock)
                    if owner is None:  # closed while handling this batch
                        continue
                    try:
                        self._read(owner[0], owner[1], sock)
                    except Exception as exc:  # noqa: BLE001
                        record(exc, "messages from a broker")
                self._flush_results(waker)
                if self._follower is not None:
                    try:
                        self._follow(self._follower)
                    except Exception as exc:  # noqa: BLE001
                        record(exc, "following the cluster")
                self._take_stops()
                try:
                    self._execute(self._core.tick())
                except Exception as exc:  # noqa: BLE001
                    record(exc, "the heartbeat and reconnect step")
        finally:
            self._shutdown()

    def _poll_timeout(self) -> int | None:
        """Milliseconds until the core's next deadline, never 0: a loop that polls without
        waiting burns a core (None: nothing is due, only a message or the waker can wake us)."""
        nxt = self._core.next_deadline()
        if self._follower is not None:
            fd = self._follower.next_deadline()
            if fd is not None:
                nxt = fd if nxt is None else min(nxt, fd)
        if nxt is None:
            return None
        return max(1, timeout_ms(nxt, self._clock()) or 0)

    def _follow(self, follower: ClusterFollower) -> None:
        """Cluster mode: a link for each broker that joined, none for those that left."""
        changes = follower.step()
        core = self._core
        for name in changes.left:
            link = self._members.pop(name, None)
            if link is not None:
                self._execute(core.remove_broker(link))
        for name, endpoint in changes.joined.items():
            self.brokers.append(endpoint)
            self._socks.append(None)
            self._monitors.append(None)
            link, actions = core.add_broker(endpoint)
            self._members[name] = link
            self._execute(actions)

    def _take_stops(self) -> None:
        stops = self._stops
        while stops:
            drain = stops.popleft()
            with self._errors.contain("a stop"):
                self._execute(self._core.handle(StopRequested(drain)))

    def _read(self, index: int, is_monitor: bool, sock: zmq.Socket[Any]) -> None:
        core = self._core
        if is_monitor:
            outcome = handshake_outcome(sock)
            if outcome is not None:
                self._execute(core.handle(HandshakeEnded(index, outcome[1])))
            return
        for _ in range(BATCH):
            if self._socks[index] is not sock:  # a message made us close it
                return
            frames = recv_nowait(sock)
            if frames is None:
                return
            # a plain try per message: free on this path until something raises
            try:
                self._execute(core.frames_received(index, frames))
            except Exception as exc:  # noqa: BLE001 - a bug costs this one message
                self._errors.record(exc, "a message from a broker")

    def _flush_results(self, waker: Waker) -> None:
        try:
            waker.clear()
        except Exception as exc:  # noqa: BLE001 - a bug costs this step, never the loop
            self._errors.record(exc, "the waker")
        errors = self._thread_errors
        while errors:
            error, what = errors.popleft()
            self._errors.record(error, what)
        results = self._results
        handle = self._core.handle
        while results:
            call, status, body = results.popleft()
            try:
                self._execute(handle(CallFinished(call, status, body)))
            except Exception as exc:  # noqa: BLE001 - a bug costs this one reply
                self._errors.record(exc, "a handler's reply")

    # --- the core's actions ------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        """Carries out the core's actions in order; one that fails costs only itself."""
        for action in actions:
            try:  # not contain(): a plain try costs nothing per action until it raises
                self._do(action)
            except Exception as exc:  # noqa: BLE001 - a bug costs this one action
                self._errors.record(exc, "an action of the worker's core")

    def _do(self, a: Action) -> None:
        if type(a) is SendReply:  # the hot two first
            for index in a.links:
                if self._send(index, a.frames):
                    return
            self._count("replies_lost")
        elif type(a) is RunHandler:
            self._start(a)
        elif type(a) is Send:
            self._send(a.link, a.frames)
        elif type(a) is OpenLink:
            self._open(a.link)
        elif type(a) is CloseLink:
            self._close(a.link)
        elif type(a) is Log:
            log.log(a.level, "%s", a.text)
        elif type(a) is Exit:
            self._exit = a
        else:
            raise TypeError(f"unknown action {a!r}")

    def _count(self, name: str) -> None:
        self._io_counters[name] = self._io_counters.get(name, 0) + 1

    def _send(self, index: int, frames: list[bytes]) -> bool:
        """Never blocks the loop: a broker that cannot take more (gone, or its queue full)
        loses this message, which is counted; liveness and retries deal with the rest."""
        sock = self._socks[index]
        if sock is None:
            return False
        if send_nowait(sock, frames) is Sent.OK:
            return True
        self._count("send_dropped")
        return False

    def _open(self, index: int) -> None:
        """A fresh socket to broker `index`; when that fails the core retries after a backoff
        (at start, the failure is the caller's)."""
        if self._socks[index] is not None:
            self._close(index)
        try:
            sock = make_socket(self._ctx, zmq.DEALER, identity=self.identity, options=self._opts)
            self._socks[index] = sock
            monitor = self._monitors[index] = sock.get_monitor_socket(HANDSHAKE_EVENTS)
            for s, is_monitor in ((sock, False), (monitor, True)):
                self._by_sock[s] = (index, is_monitor)
                self._poller.register(s, zmq.POLLIN)
            sock.connect(self.brokers[index])
        except Exception:
            self._close(index)
            if not self.ready.is_set():
                raise
            self._execute(self._core.handle(OpenFailed(index)))
            raise

    def _close(self, index: int) -> None:
        sock, monitor = self._socks[index], self._monitors[index]
        self._socks[index] = self._monitors[index] = None  # closed, whatever fails below
        for s in (sock, monitor):
            if s is not None and self._by_sock.pop(s, None) is not None:
                self._poller.unregister(s)
        if sock is not None:
            sock.disable_monitor()
            sock.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)

    def _start(self, call: RunHandler) -> None:
        try:
            if call.inline:
                self._run_inline(call)
            elif call.method.is_async and self._aloop is not None:
                coro = self._run_async(call)
                try:
                    fut = asyncio.run_coroutine_threadsafe(coro, self._aloop)
                except BaseException:
                    coro.close()
                    raise
                fut.add_done_callback(self._async_finished)
            else:
                self._jobs.put(call)
        except Exception as exc:  # noqa: BLE001 - the call is answered, the slot kept
            self._errors.record(exc, "starting a call")
            self._done(call, Status.ERROR, INTERNAL_BODY)

    def _run_inline(self, call: RunHandler) -> None:
        """A declared-short handler, here on the loop's thread: no hand-off either way. Its
        reply leaves with the others after this batch; a slow one is reported to the core."""
        clock = self._clock
        started = clock()
        status, body = self._call_sync(call)
        self._results.append((call, status, body))  # answered: nothing below may answer again
        seconds = clock() - started
        if seconds > INLINE_LIMIT:
            try:
                self._execute(self._core.handle(InlineRan(call, seconds)))
            except Exception as exc:  # noqa: BLE001 - a bug costs the warning, not the reply
                self._errors.record(exc, "a slow inline call")

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

    def _pack(self, value: Any) -> tuple[int, bytes, TypeError | None]:
        """The reply for a handler's result, and the error it became if it cannot be sent."""
        try:
            return Status.OK, pack_result(value), None
        except Exception as exc:  # noqa: BLE001 - whatever msgpack raises for it
            text = _cut(_printable(f"result cannot be sent with msgpack: {_describe(exc)}"))
            return Status.ERROR, pack_error("TypeError", text), TypeError(text)

    def _handler_thread(self) -> None:
        """Runs calls until told to stop; nothing a handler does ends it."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                status, body = self._call_sync(job)
            except BaseException as exc:  # noqa: BLE001 - our bug: count it, answer the call
                self._thread_error(exc, "a call in a handler thread")
                status, body = Status.ERROR, INTERNAL_BODY
            self._done(job, status, body)

    def _call_sync(self, call: RunHandler) -> tuple[int, bytes]:
        """Runs a sync handler, `zrpc.current_call()` saying which call it serves meanwhile."""
        if self._chain:
            ctx = call.context(self._clock)
            token = entered(ctx)
            try:
                return self._through_chain(call, ctx)
            finally:
                left(token)
        token = entered(call.context, self._clock)  # made only if the handler asks
        try:
            try:
                args, kwargs = unpack_call(call.request.body)
            except ProtocolError as exc:
                return Status.PROTOCOL_ERROR, pack_error("ProtocolError", str(exc))
            try:
                value = call.method.func(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - a handler must never take the worker down
                return self._error(exc)
            return self._pack(value)[:2]
        finally:
            left(token)

    def _through_chain(self, call: RunHandler, ctx: CallContext) -> tuple[int, bytes]:
        """The handler inside the middleware: a `before` that raises answers the call instead."""
        chain = self._chain
        try:
            chain.before(ctx)
        except BaseException as exc:  # noqa: BLE001 - the middleware's error is the answer
            return self._error(exc)
        try:
            args, kwargs = unpack_call(call.request.body)
        except ProtocolError as exc:
            chain.on_error(ctx, exc)
            return Status.PROTOCOL_ERROR, pack_error("ProtocolError", str(exc))
        try:
            value = call.method.func(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - a handler must never take the worker down
            chain.on_error(ctx, exc)
            return self._error(exc)
        status, body, unsent = self._pack(value)
        if unsent is None:
            chain.after(ctx, value)
        else:
            chain.on_error(ctx, unsent)
        return status, body

    async def _run_async(self, call: RunHandler) -> None:
        try:
            status, body = await self._call_async(call)
        except BaseException as exc:  # noqa: BLE001 - our bug: count it, answer the call
            self._thread_error(exc, "an async call")
            status, body = Status.ERROR, INTERNAL_BODY
        self._done(call, status, body)

    async def _call_async(self, call: RunHandler) -> tuple[int, bytes]:
        """An async handler inside the middleware; this task's context names its call."""
        chain = self._chain
        ctx = call.context(self._clock) if chain else None  # else made only if the handler asks
        token = entered(call.context if ctx is None else ctx, self._clock)
        try:
            if ctx is not None:
                try:
                    await chain.abefore(ctx)
                except BaseException as exc:  # noqa: BLE001 - the middleware's error is the answer
                    return self._error(exc)
            try:
                args, kwargs = unpack_call(call.request.body)
            except ProtocolError as exc:
                if ctx is not None:
                    await chain.aon_error(ctx, exc)
                return Status.PROTOCOL_ERROR, pack_error("ProtocolError", str(exc))
            try:
                coro: Coroutine[Any, Any, Any] = call.method.func(*args, **kwargs)
                value = await coro
            except BaseException as exc:  # noqa: BLE001 - cancellation too: the call is answered
                if ctx is not None:
                    await chain.aon_error(ctx, exc)
                return self._error(exc)
            status, body, unsent = self._pack(value)
            if ctx is not None:
                if unsent is None:
                    await chain.aafter(ctx, value)
                else:
                    await chain.aon_error(ctx, unsent)
            return status, body
        finally:
            left(token)

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

    def _done(self, call: RunHandler, status: int, body: bytes) -> None:
        self._results.append((call, status, body))
        waker = self._waker
        if waker is not None:
            waker.wake()

    # --- leaving ---------------------------------------------------------------------------

    def _stop_async(self, aloop: asyncio.AbstractEventLoop) -> None:
        """Stops the async handlers' loop and closes it here: one left for the garbage collector
        at exit may be closed after its self-pipe was, and print a traceback."""
        aloop.call_soon_threadsafe(aloop.stop)
        thread = self._athread
        if thread is not None:
            thread.join(timeout=LINGER_MS / 1000)
            if thread.is_alive():
                return  # an async handler that never yields: the loop cannot be closed
        aloop.close()

    def _shutdown(self) -> None:
        at_once = self._exit is not None and self._exit.at_once
        linger = 0 if at_once else LINGER_MS  # let the last replies leave
        for index, sock in enumerate(self._socks):
            monitor = self._monitors[index]
            if sock is not None:
                sock.disable_monitor()
            if monitor is not None:
                monitor.close(linger=0)
            if sock is not None:
                sock.close(linger=linger)
        if self._follower is not None:
            try:
                self._follower.stop()
            except Exception as exc:  # noqa: BLE001 - leaving must go on
                self._errors.record(exc, "leaving the cluster")
        waker, self._waker = self._waker, None  # a signal now must not wait on its lock
        if waker is not None:
            waker.close()
        for _ in self._threads:
            self._jobs.put(None)
        if self._aloop is not None:
            self._stop_async(self._aloop)
        if self._own_ctx:
            self._ctx.term()
        log.info("worker %s stopped", self.name)
