"""AsyncClient: the Client's surface, awaitable, on zmq.asyncio (no threads).

Done-callbacks of asyncio futures are scheduled by the event loop, never run inline by the
reader task, so a callback may call the client again. Sends never wait: pyzmq completes a
non-blocking send at once, and a full pipe's zmq.Again is read off its future here rather than
left for nobody to read.

Called inside a handler, a call inherits what is left of the handler's deadline and its
trace id, as with Client; async middleware hooks are awaited around each call.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, cast

import zmq
import zmq.asyncio

from zrpc._core._calls import PendingCall
from zrpc._core._clock import Clock, monotonic, timeout_ms
from zrpc._core._config import resolve_brokers, resolve_cluster
from zrpc._core._context import CallContext, Chain, current_call, inherit
from zrpc._core._frames import H_TRACE
from zrpc._core._proxy import ServiceProxy
from zrpc._core._session import Dropped, Output, Session, Transmit, settle
from zrpc._defaults import CALL_TIMEOUT, CLUSTER_NAME, HEARTBEAT_INTERVAL, LIVENESS
from zrpc._errors import Timeout, ZrpcError
from zrpc._io._client import log_dropped
from zrpc._io._follow import ClusterFollower, apply_changes
from zrpc._io._internal import InternalErrors
from zrpc._io._security import client_keys
from zrpc._io._sockets import (
    BrokerLinks,
    SocketOptions,
    parse_handshake,
    quietly,
)

TICK = 0.05
"""Longest wait between deadline checks: a new call's deadline is honoured to within this."""

log = logging.getLogger("zrpc.client")


class AsyncClient:
    """`async with zrpc.AsyncClient() as c: await c.proxy("calc").add(1, 2)`; `cluster=` as
    for Client (the cluster's brokers, followed through etcd, calls spread over them).

    `middleware=` as for Client, and hooks may be `async def` (awaited). With middleware,
    `future()` returns a task that runs the hooks and the call: it sends when the event loop
    next runs, and is done once the `after` or `on_error` hooks ran."""

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
        context: zmq.asyncio.Context | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
        cluster: str | None = None,
        cluster_name: str = CLUSTER_NAME,
        middleware: Iterable[object] | None = None,
    ) -> None:
        self._chain = Chain(middleware, log)
        self.cluster = resolve_cluster(brokers, cluster)
        self.brokers = [] if self.cluster else resolve_brokers(brokers)
        self.timeout = timeout
        self.identity = uuid.uuid4().bytes
        self._clock = clock
        self._session = Session(clock, len(self.brokers), timeout, interval=heartbeat_interval,
                                liveness=liveness, failover_timeout=failover_timeout,
                                spread=self.cluster is not None)
        self._ctx = context or zmq.asyncio.Context()
        self._own_ctx = context is None
        self._opts = SocketOptions(curve=client_keys(curve_server_key, curve_secret),
                                   **({"max_message": max_message} if max_message else {}))
        self._poller = zmq.asyncio.Poller()
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
                # the reader polls every TICK at most: it reads what etcd answered unwoken
                self._follower = ClusterFollower(self.cluster, lambda: None, name=cluster_name, logger=log)
                self._follower.start()
        except BaseException:  # what was made is released: a failed constructor leaks nothing
            if self._follower is not None:
                quietly(self._follower.stop)
            self._links.close()
            if self._own_ctx:
                self._ctx.term()
            raise
        self.brokers = self._links.endpoints  # grows as brokers join (cluster mode)
        self._reader: asyncio.Task[None] | None = None
        self._closed = False  # no new calls: close() was called, or the reader died
        self._released = False  # sockets and context released (close() ran)
        self._dead: str | None = None  # why the reader task died, when it did
        self._errors = InternalErrors(log, "async client")

    def proxy(self, service: str) -> ServiceProxy:
        return ServiceProxy(self, service)

    async def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self._invoke(service, method, args, kwargs)

    def future(self, service: str, method: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return self._submit(service, method, args, kwargs)

    @property
    def internal_errors(self) -> int:
        """Unexpected exceptions the reader task contained (each cost at most one message)."""
        return self._errors.count

    @property
    def malformed(self) -> int:
        """Messages from brokers that could not be decoded (or made no sense), dropped."""
        return self._session.malformed.count

    @property
    def middleware_errors(self) -> int:
        """Failures of middleware's `after` and `on_error` hooks (each logged; results stood)."""
        return self._chain.errors

    async def close(self) -> None:
        """Fails the calls still pending and releases the sockets and the context. Idempotent;
        also after the reader task died."""
        if self._released:
            return
        self._released = True
        self._closed = True
        reader = self._reader
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.wait([reader])  # our own cancellation still reaches us
        self._fail_pending(self._dead or "client closed")
        if self._follower is not None:
            quietly(self._follower.stop)
        self._links.close()
        if self._own_ctx:
            self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- used by proxies -----------------------------------------------------------------

    async def _invoke(self, service: str, method: str, args: tuple[Any, ...],
                      kwargs: dict[str, Any], **options: Any) -> Any:
        if not self._chain:
            return await self._submit(service, method, args, kwargs, **options)
        fut, call = self._prepare(service, method, args, kwargs, options)
        if call is None:
            return await fut
        chain = self._chain
        ctx = CallContext(service, method, call.request_id, 0, call.headers.get(H_TRACE),
                          call.deadline, None, "client", self._clock)
        await chain.abefore(ctx)  # raises: the call fails with it, unsent
        if self._closed:
            closed = ZrpcError(self._dead or "client is closed")
            await chain.aon_error(ctx, closed)
            raise closed
        self._send(call)
        try:
            result = await fut
        except BaseException as exc:
            await chain.aon_error(ctx, exc)
            raise
        await chain.aafter(ctx, result)
        return result

    def _submit(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None, **options: Any) -> asyncio.Future[Any]:
        options.update(timeout=timeout, idempotent=idempotent, trace_id=trace_id)
        if self._chain:  # the hooks may be awaited: a task runs them and the call
            if self._closed:
                raise ZrpcError(self._dead or "client is closed")
            return asyncio.get_running_loop().create_task(
                self._invoke(service, method, args, kwargs, **options))
        fut, call = self._prepare(service, method, args, kwargs, options)
        if call is not None:
            self._send(call)
        return fut

    def _prepare(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: dict[str, Any]) -> tuple[asyncio.Future[Any], PendingCall | None]:
        """A call's future and the call to send (None: it failed at once: its outer call,
        that of the handler it is made in, is past its deadline)."""
        if self._closed:
            raise ZrpcError(self._dead or "client is closed")
        loop = asyncio.get_running_loop()
        if self._reader is None:  # in a context of its own: no handler's call is its
            self._reader = loop.create_task(self._read(), context=contextvars.Context())
        fut = loop.create_future()
        timeout, trace_id = options.pop("timeout", None), options.pop("trace_id", None)
        outer = current_call()
        if outer is not None:  # inside a handler: never outlive its call
            try:
                timeout, trace_id = inherit(self.timeout, timeout, trace_id, outer)
            except Timeout as exc:
                fut.set_exception(exc)
                return fut, None
        idempotent = options.pop("idempotent", None)
        call = self._session.table.prepare(service, method, args, kwargs, fut, timeout, idempotent,
                                           trace_id, **options)
        return fut, call

    def _send(self, call: PendingCall) -> None:
        try:  # a plain try per call: free until something raises
            self._send_new(call)
        except Exception as exc:  # noqa: BLE001 - a bug costs this one call
            self._errors.record(exc, "a new call")

    def _send_new(self, call: PendingCall) -> None:
        try:
            self._apply(self._session.submit(call))
        except Exception:
            self._session.table.pop(call.request_id)
            call.fail(ZrpcError(f"{call.service}.{call.method}: internal error, the call was not sent"))
            raise

    def _fail_pending(self, reason: str) -> None:
        for call in self._session.close():
            call.fail(ZrpcError(reason))

    # --- the reader task -----------------------------------------------------------------

    async def _read(self) -> None:
        try:
            await self._run()
        except (asyncio.CancelledError, GeneratorExit):
            if not self._released:  # not our close(): the event loop is going away
                self._die("the event loop cancelled it")
            raise
        except BaseException as exc:  # noqa: BLE001 - the client must learn its reader is gone
            self._errors.record(exc, "the async client's reader task, which stopped")
            try:
                why = f"{type(exc).__name__}: {exc}"
            except Exception:  # noqa: BLE001 - an exception whose __str__ raises
                why = type(exc).__name__
            self._die(why)

    def _die(self, why: str) -> None:
        """No reader, no replies: every pending call fails now, and later ones at once."""
        self._closed = True
        self._dead = f"client I/O task died: {why}"[:500]
        self._fail_pending(self._dead)

    async def _run(self) -> None:
        """Each message and timer step is contained: a bug costs that one, counted in
        `internal_errors` and logged, and the reader goes on."""
        poller = self._poller
        index = self._index
        session = self._session
        contain = self._errors.contain
        record = self._errors.record
        follower = self._follower
        while True:
            now = self._clock()
            for sock, _ in await poller.poll(timeout_ms(session.next_deadline(), now, cap=TICK)):
                owner = index.get(sock)
                if owner is None:  # closed while handling this batch
                    continue
                b, is_monitor = owner
                if is_monitor:
                    with contain("a security handshake event"):
                        outcome = parse_handshake(await sock.recv_multipart())
                        if outcome is not None:
                            self._apply(session.handshake(b, outcome[1]))
                    continue
                while True:
                    try:
                        frames = await sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:  # a plain try per message: free until something raises
                        self._apply(session.frames_received(b, frames))
                    except Exception as exc:  # noqa: BLE001 - a bug costs this one message
                        record(exc, "a message from a broker")
            if follower is not None:
                with contain("following the cluster"):
                    changes = follower.step()
                    if changes:
                        self._apply(apply_changes(changes, session, self._members, self._links.connect,
                                                  self._links.disconnect))
            with contain("a timer step"):
                self._apply(session.tick())

    def _apply(self, outputs: list[Output]) -> None:
        for o in outputs:
            if type(o) is Transmit:
                sock = self._socks[o.broker]
                if sock is None:  # it left the cluster: the session never sends there
                    continue
                # an asyncio socket's send returns a Future (pyzmq's stubs say otherwise)
                sent = cast("asyncio.Future[Any]", sock.send_multipart(o.frames, zmq.NOBLOCK))
                if sent.done() and not sent.cancelled():
                    # zmq.Again (that broker cannot take more now) is read here, not left for
                    # nobody to read: the calls keep their deadlines; any other error is a bug
                    exc = sent.exception()
                    if exc is not None and not isinstance(exc, zmq.Again):
                        raise exc
            elif type(o) is Dropped:
                log_dropped(self.brokers, o)
            else:
                settle(o)
