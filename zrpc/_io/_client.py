"""Client: thread-safe calls over one DEALER per broker, owned by a background I/O thread.

Caller threads encode their call and queue it; the I/O thread sends, matches replies by
request id and completes concurrent.futures.Future objects, so any number of calls from any
number of threads share one socket. No user code ever runs on the I/O thread: done-callbacks
of the futures it completes run on a callback thread of their own (see `CallFuture`).

Called inside a handler, a call inherits what is left of the handler's deadline and its
trace id (zrpc._core._context.inherit): a nested call never outlives the call it serves.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any

import zmq

from zrpc._core._calls import PendingCall
from zrpc._core._clock import Clock, monotonic, timeout_ms
from zrpc._core._config import resolve_brokers, resolve_cluster
from zrpc._core._context import CallContext, Chain, current_call, inherit
from zrpc._core._proxy import ServiceProxy
from zrpc._core._session import Dropped, Output, Session, Transmit, settle
from zrpc._defaults import CALL_TIMEOUT, CLUSTER_NAME, HEARTBEAT_INTERVAL, LIVENESS
from zrpc._errors import Timeout, ZrpcError
from zrpc._io._follow import ClusterFollower, apply_changes
from zrpc._io._internal import InternalErrors
from zrpc._io._security import client_keys
from zrpc._io._sockets import (
    BrokerLinks,
    SocketOptions,
    Waker,
    handshake_outcome,
    quietly,
    recv_nowait,
    send_nowait,
)

BATCH = 512
"""Messages read from one socket before the loop looks at the others and at its timers."""

POLL_CAP = HEARTBEAT_INTERVAL
"""Longest wait in poll: the session's deadlines and the waker end it sooner; this bounds the
wait should a wake-up ever be missed."""

log = logging.getLogger("zrpc.client")
_futures_log = logging.getLogger("concurrent.futures")  # where Future reports a failing callback


class _Callbacks:
    """Runs, in order, the done-callbacks of futures completed by the I/O thread.

    A callback may block on the client (`client.call()`, `client.close()`): were it run by the
    I/O thread, that thread would wait on itself and every deadline would stall. Started on
    first use, so a client whose futures have no callbacks never pays for it.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[Future[Any]], object], Future[Any]] | None] = (
            queue.SimpleQueue())
        self.thread = threading.Thread(target=self._run, name="zrpc-client-callbacks", daemon=True)
        self.thread.start()

    def post(self, fn: Callable[[Future[Any]], object], fut: Future[Any]) -> None:
        self._queue.put((fn, fut))

    def stop(self) -> None:
        """The I/O thread has ended: run what was posted, then end."""
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            try:
                fn(fut)
            except Exception:  # noqa: BLE001 - as Future itself does with a failing callback
                _futures_log.exception("exception calling callback for %r", fut)


class CallFuture(Future[Any]):
    """A concurrent.futures.Future whose done-callbacks never run on the client's I/O thread.

    Setting a result stays cheap (the I/O thread does it, no thread hop); only a callback that
    would be invoked on the I/O thread is handed to the client's callback thread. A callback
    added to a future already done runs at once in the caller, as with any Future.
    """

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        client = self._client

        def run(f: Future[Any]) -> None:
            if threading.get_ident() == client._io_ident:
                client._post_callback(fn, f)
            else:
                fn(f)

        super().add_done_callback(run)


class Client:
    """Calls services through the broker(s). Use as a context manager, or call close().

    `brokers` (or $ZRPC_BROKERS) names a pair or one broker; `cluster="etcd://H:P[,...]"` (or
    $ZRPC_CLUSTER) finds the brokers of a cluster through etcd instead, follows them as they
    join and leave, and spreads calls over them (DESIGN.md §9).

    `middleware=[m, ...]` (zrpc.Middleware, or any object with `before(ctx)`, `after(ctx,
    result)` or `on_error(ctx, exc)`; sync hooks only here) sees every call, its context of
    kind "client": `before` hooks in this order before it is sent (one that raises fails the
    call with its error, and nothing is sent), `after` or `on_error` in the reverse order once
    it is done: before `call()` returns; for `future()`, on the client's callback thread just
    after the future completes. A hook that raises there is logged and counted
    (`middleware_errors`), and the result stands.
    """

    def __init__(
        self,
        brokers: Sequence[str] | str | None = None,
        *,
        timeout: float = CALL_TIMEOUT,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        liveness: int = LIVENESS,
        failover_timeout: float | None = None,
        curve_server_key: str | None = None,
        curve_secret: str | None = None,
        context: zmq.Context[Any] | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
        cluster: str | None = None,
        cluster_name: str = CLUSTER_NAME,
        middleware: Iterable[object] | None = None,
    ) -> None:
        chain = Chain(middleware, log)
        chain.check_sync("a Client's calls (an AsyncClient awaits them)")
        self._chain = chain
        self.cluster = resolve_cluster(brokers, cluster)
        self.brokers = [] if self.cluster else resolve_brokers(brokers)
        self.timeout = timeout
        self.identity = uuid.uuid4().bytes
        self._clock = clock
        self._session = Session(clock, len(self.brokers), timeout, interval=heartbeat_interval,
                                liveness=liveness, failover_timeout=failover_timeout,
                                spread=self.cluster is not None)
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._opts = SocketOptions(curve=client_keys(curve_server_key, curve_secret),
                                   **({"max_message": max_message} if max_message else {}))
        self._outbox: deque[PendingCall] = deque()
        self._closed = threading.Event()
        # close() and _submit agree under this lock: a call is either queued before the loop
        # can drain the outbox for the last time, or refused
        self._lock = threading.Lock()
        self._dead: str | None = None  # why the I/O thread died, when it did
        self._errors = InternalErrors(log, "client")
        self._callbacks: _Callbacks | None = None
        self._waker = Waker(self._ctx, "client-" + self.identity.hex())
        self._poller = zmq.Poller()
        # one DEALER per broker; handshake monitors tell a refused key (Unauthorized) from a
        # silent broker (Timeout)
        self._links = BrokerLinks(self._ctx, self._poller, self.identity, self._opts)
        self._socks = self._links.socks  # the same list: the hot path reads it
        self._index = self._links.index
        self._members: dict[str, int] = {}  # cluster mode: broker name -> session index
        self._follower: ClusterFollower | None = None
        try:
            for b, ep in enumerate(self.brokers):
                self._links.connect(b, ep)
            if self.cluster:
                self._follower = ClusterFollower(self.cluster, self._waker.wake, name=cluster_name, logger=log)
                self._follower.start()
        except BaseException:  # what was made is released: a failed constructor leaks nothing
            self._release()
            raise
        self.brokers = self._links.endpoints  # grows as brokers join (cluster mode)
        self._thread = threading.Thread(target=self._loop, name="zrpc-client", daemon=True)
        self._thread.start()
        self._io_ident = self._thread.ident

    # --- public --------------------------------------------------------------------------

    def proxy(self, service: str) -> ServiceProxy:
        return ServiceProxy(self, service)

    def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls and waits; raises a ZrpcError subclass on failure."""
        return self._invoke(service, method, args, kwargs)

    def future(self, service: str, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(service, method, args, kwargs)

    @property
    def internal_errors(self) -> int:
        """Unexpected exceptions the I/O thread contained (each cost at most one message)."""
        return self._errors.count

    @property
    def malformed(self) -> int:
        """Messages from brokers that could not be decoded (or made no sense), dropped."""
        return self._session.malformed.count

    @property
    def middleware_errors(self) -> int:
        """Failures of middleware's `after` and `on_error` hooks (each logged; results stood)."""
        return self._chain.errors

    def close(self) -> None:
        """Fails the calls still pending and releases the sockets and the context.

        Idempotent, and safe from any thread: from a done-callback, or from the I/O thread
        itself, which then finishes the job when its current step ends (the loop closes its
        sockets and terminates the context it owns, so nothing waits on itself).
        """
        with self._lock:
            self._closed.set()
        self._waker.wake()
        if threading.get_ident() != self._io_ident:
            self._thread.join(timeout=5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- used by proxies -----------------------------------------------------------------

    def _submit(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None, **options: Any) -> Future[Any]:
        fut, ctx = self._start(service, method, args, kwargs, timeout, idempotent, trace_id, options)
        if ctx is not None:  # registered first: the hooks see the result before other callbacks
            fut.add_done_callback(lambda f: self._finished(ctx, f))
        return fut

    def _invoke(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                **options: Any) -> Any:
        given = options.pop("timeout", None)
        fut, ctx = self._start(service, method, args, kwargs, given, options.pop("idempotent", None),
                               options.pop("trace_id", None), options)
        timeout = given or self.timeout
        try:
            result = fut.result(timeout=timeout + 5.0)  # the loop answers at the deadline
        except TimeoutError:
            exc: BaseException = Timeout(f"{service}.{method}: no reply within {timeout:g}s")
            if ctx is not None:
                self._chain.on_error(ctx, exc)
            raise exc from None
        except BaseException as exc:
            if ctx is not None:
                self._chain.on_error(ctx, exc)
            raise
        if ctx is not None:
            self._chain.after(ctx, result)
        return result

    def _start(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None, idempotent: bool | None, trace_id: str | None,
               options: dict[str, Any]) -> tuple[Future[Any], CallContext | None]:
        """Prepares and queues a call: its future, and its context when middleware must hear
        how it ends (None: no middleware, or the call failed before it was sent)."""
        if self._closed.is_set():
            raise ZrpcError(self._dead or "client is closed")
        fut = CallFuture(self)
        outer = current_call()
        if outer is not None:  # inside a handler: never outlive its call
            try:
                timeout, trace_id = inherit(self.timeout, timeout, trace_id, outer)
            except Timeout as exc:
                fut.set_exception(exc)
                return fut, None
        call = self._session.table.prepare(service, method, args, kwargs, fut, timeout, idempotent,
                                           trace_id, **options)
        ctx = None
        chain = self._chain
        if chain:
            ctx = CallContext(service, method, call.request_id, 0, trace_id, call.deadline, None,
                              "client", self._clock)
            try:
                chain.before(ctx)
            except Exception as exc:  # noqa: BLE001 - the call fails with it, unsent
                fut.set_exception(exc)
                return fut, None
        with self._lock:
            if self._closed.is_set():  # closed while we prepared: the loop may have drained
                closed = ZrpcError(self._dead or "client is closed")
                if ctx is not None:
                    chain.on_error(ctx, closed)
                raise closed
            self._outbox.append(call)
        self._waker.wake()
        return fut, ctx

    def _finished(self, ctx: CallContext, fut: Future[Any]) -> None:
        """A future() call is done: its middleware's `after` or `on_error`."""
        if fut.cancelled():
            self._chain.on_error(ctx, CancelledError())
            return
        exc = fut.exception()
        if exc is None:
            self._chain.after(ctx, fut.result())
        else:
            self._chain.on_error(ctx, exc)

    # --- the I/O thread ------------------------------------------------------------------

    def _loop(self) -> None:
        died: BaseException | None = None
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - the client must learn its loop is gone
            died = exc
        finally:
            self._shutdown(died)

    def _follow(self) -> None:
        """Cluster mode: the brokers that joined or left since the last wake-up."""
        follower = self._follower
        if follower is not None:
            changes = follower.step()
            if changes:
                self._apply(apply_changes(changes, self._session, self._members, self._links.connect,
                                          self._links.disconnect))

    def _deadline(self) -> float:
        nxt = self._session.next_deadline()
        if self._follower is not None:
            fd = self._follower.next_deadline()
            if fd is not None:
                nxt = min(nxt, fd)
        return nxt

    def _run(self) -> None:
        """Each message, new call and timer step is contained: a bug costs that one, counted in
        `internal_errors` and logged, and the loop goes on."""
        poller = self._poller
        index = self._index
        poller.register(self._waker.socket, zmq.POLLIN)
        session = self._session
        contain = self._errors.contain
        record = self._errors.record
        while not self._closed.is_set():
            now = self._clock()
            for sock, _ in poller.poll(timeout_ms(self._deadline(), now, cap=POLL_CAP)):
                if sock is self._waker.socket:
                    continue
                owner = index.get(sock)
                if owner is None:  # closed while handling this batch
                    continue
                b, is_monitor = owner
                if is_monitor:
                    with contain("a security handshake event"):
                        outcome = handshake_outcome(sock)
                        if outcome is not None:
                            self._apply(session.handshake(b, outcome[1]))
                    continue
                for _ in range(BATCH):
                    frames = recv_nowait(sock)
                    if frames is None:
                        break
                    # a plain try per message and per call: free until something raises
                    try:
                        self._apply(session.frames_received(b, frames))
                    except Exception as exc:  # noqa: BLE001 - a bug costs this one message
                        record(exc, "a message from a broker")
            self._waker.clear()
            if self._follower is not None:
                try:
                    self._follow()
                except Exception as exc:  # noqa: BLE001 - a bug costs this step, never the loop
                    record(exc, "following the cluster")
            outbox = self._outbox
            while outbox:
                call = outbox.popleft()
                try:
                    self._send_new(call)
                except Exception as exc:  # noqa: BLE001 - a bug costs this one call
                    record(exc, "a new call")
            try:
                self._apply(session.tick())
            except Exception as exc:  # noqa: BLE001 - a bug costs this step, never the loop
                record(exc, "a timer step")

    def _send_new(self, call: PendingCall) -> None:
        try:
            self._apply(self._session.submit(call))
        except Exception:
            self._session.table.pop(call.request_id)
            call.fail(ZrpcError(f"{call.service}.{call.method}: internal error, the call was not sent"))
            raise

    def _shutdown(self, died: BaseException | None) -> None:
        """The loop's end, asked for or not: fail what is pending, release every socket, and
        terminate the context we own (here, on the thread that owned the sockets)."""
        if died is not None and not isinstance(died, zmq.ContextTerminated):
            self._errors.record(died, "the client's I/O loop, which stopped")
        with self._lock:
            if died is not None:
                try:
                    why = f"{type(died).__name__}: {died}"
                except Exception:  # noqa: BLE001 - an exception whose __str__ raises
                    why = type(died).__name__
                self._dead = f"client I/O thread died: {why}"[:500]
            self._closed.set()
            pending = [*self._session.close(), *self._outbox]
            self._outbox.clear()
        reason = self._dead or "client closed"
        for call in pending:
            call.fail(ZrpcError(reason))
        self._release()
        if self._callbacks is not None:
            self._callbacks.stop()

    def _release(self) -> None:
        """The etcd follower, every socket, the waker, and the context we own."""
        if self._follower is not None:
            quietly(self._follower.stop)
        self._links.close()
        quietly(self._waker.close)
        if self._own_ctx:
            self._ctx.term()

    def _post_callback(self, fn: Callable[[Future[Any]], object], fut: Future[Any]) -> None:
        """Called on the I/O thread only, so the callback thread needs no lock to start."""
        if self._callbacks is None:
            self._callbacks = _Callbacks()
        self._callbacks.post(fn, fut)

    def _apply(self, outputs: list[Output]) -> None:
        for o in outputs:
            if type(o) is Transmit:
                # not sent (FULL: that broker cannot take more now): its calls keep their deadlines
                sock = self._socks[o.broker]
                if sock is not None:  # None: it left the cluster (the session never sends there)
                    send_nowait(sock, o.frames)
            elif type(o) is Dropped:
                log_dropped(self.brokers, o)
            else:
                settle(o)


def log_dropped(brokers: Sequence[str], o: Dropped) -> None:
    """One line per malformed message the session says is worth it, the same for both clients."""
    log.warning("dropped malformed message #%d from broker %s: %s", o.count, brokers[o.broker],
                o.reason)
