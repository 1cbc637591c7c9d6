"""AsyncClient: the Client's surface, awaitable, on zmq.asyncio (no threads)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Sequence

import zmq
import zmq.asyncio

from ._clock import Clock, monotonic, timeout_ms
from ._config import resolve_brokers
from ._errors import ProtocolError, ZrpcError
from ._frames import decode_frames
from ._proxy import ServiceProxy
from ._security import client_keys
from ._session import Output, Session, Transmit, settle
from ._sockets import HANDSHAKE_EVENTS, SocketOptions, make_socket, parse_handshake

TICK = 0.05
"""Longest wait between deadline checks: a new call's deadline is honoured to within this."""


class AsyncClient:
    """`async with zrpc.AsyncClient() as c: await c.proxy("calc").add(1, 2)`."""

    def __init__(
        self,
        brokers: Sequence[str] | str | None = None,
        *,
        timeout: float = 10.0,
        heartbeat_interval: float = 0.25,
        liveness: int = 3,
        failover_timeout: float | None = None,
        curve_server_key: str | None = None,
        curve_secret: str | None = None,
        context: zmq.asyncio.Context | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
    ) -> None:
        self.brokers = resolve_brokers(brokers)
        self.timeout = timeout
        self.identity = uuid.uuid4().bytes
        self._clock = clock
        self._session = Session(clock, len(self.brokers), timeout, interval=heartbeat_interval,
                                liveness=liveness, failover_timeout=failover_timeout)
        self._ctx = context or zmq.asyncio.Context()
        self._own_ctx = context is None
        opts = SocketOptions(curve=client_keys(curve_server_key, curve_secret),
                             **({"max_message": max_message} if max_message else {}))
        self._socks = [make_socket(self._ctx, zmq.DEALER, identity=self.identity, options=opts)
                       for _ in self.brokers]
        self._monitors = [s.get_monitor_socket(HANDSHAKE_EVENTS) for s in self._socks]
        for s, ep in zip(self._socks, self.brokers):
            s.connect(ep)
        self._reader: asyncio.Task | None = None
        self._closed = False

    def proxy(self, service: str) -> ServiceProxy:
        return ServiceProxy(self, service)

    async def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self._invoke(service, method, args, kwargs)

    def future(self, service: str, method: str, *args: Any, **kwargs: Any) -> asyncio.Future:
        return self._submit(service, method, args, kwargs)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        for call in self._session.close():
            call.fail(ZrpcError("client closed"))
        for s, m in zip(self._socks, self._monitors):
            s.disable_monitor()
            m.close(linger=0)
            s.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- used by proxies -----------------------------------------------------------------

    async def _invoke(self, service: str, method: str, args: tuple[Any, ...],
                      kwargs: dict[str, Any], **options: Any) -> Any:
        return await self._submit(service, method, args, kwargs, **options)

    def _submit(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None) -> asyncio.Future:
        if self._closed:
            raise ZrpcError("client is closed")
        loop = asyncio.get_running_loop()
        if self._reader is None:
            self._reader = loop.create_task(self._read())
        fut = loop.create_future()
        call = self._session.table.prepare(service, method, args, kwargs, fut, timeout, idempotent,
                                           trace_id)
        self._apply(self._session.submit(call))
        return fut

    # --- the reader task -----------------------------------------------------------------

    async def _read(self) -> None:
        poller = zmq.asyncio.Poller()
        index = {s: i for i, s in enumerate(self._socks)}
        monitors = {m: i for i, m in enumerate(self._monitors)}
        for s in [*self._socks, *self._monitors]:
            poller.register(s, zmq.POLLIN)
        session = self._session
        while True:
            now = self._clock()
            for sock, _ in await poller.poll(timeout_ms(session.next_deadline(), now, cap=TICK)):
                if sock in monitors:
                    outcome = parse_handshake(await sock.recv_multipart())
                    if outcome is not None:
                        self._apply(session.handshake(monitors[sock], outcome[1]))
                    continue
                b = index[sock]
                while True:
                    try:
                        frames = await sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = decode_frames(frames)
                    except ProtocolError:
                        continue
                    self._apply(session.received(b, msg))
            self._apply(session.tick())

    def _apply(self, outputs: list[Output]) -> None:
        for o in outputs:
            if type(o) is Transmit:
                try:
                    self._socks[o.broker].send_multipart(o.frames, zmq.NOBLOCK)  # type: ignore[union-attr]
                except zmq.Again:
                    pass
            else:
                settle(o)
