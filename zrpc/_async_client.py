"""AsyncClient: the Client's surface, awaitable, on zmq.asyncio (no threads)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Sequence

import zmq
import zmq.asyncio

from ._calls import CallTable, PendingCall
from ._clock import Clock, monotonic, timeout_ms
from ._config import resolve_brokers
from ._errors import ProtocolError, Timeout, ZrpcError
from ._frames import ClientReply, decode_frames
from ._proxy import ServiceProxy
from ._serial import outcome
from ._sockets import SocketOptions, make_socket

TICK = 0.05
"""Longest wait between deadline checks: a new call's deadline is honoured to within this."""


class AsyncClient:
    """`async with zrpc.AsyncClient() as c: await c.proxy("calc").add(1, 2)`."""

    def __init__(
        self,
        brokers: Sequence[str] | str | None = None,
        *,
        timeout: float = 10.0,
        context: zmq.asyncio.Context | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
    ) -> None:
        self.brokers = resolve_brokers(brokers)
        self.timeout = timeout
        self.identity = uuid.uuid4().bytes
        self._clock = clock
        self._table = CallTable(clock, timeout)
        self._ctx = context or zmq.asyncio.Context()
        self._own_ctx = context is None
        opts = SocketOptions(max_message=max_message) if max_message else SocketOptions()
        self._socks = [make_socket(self._ctx, zmq.DEALER, identity=self.identity, options=opts)
                       for _ in self.brokers]
        for s, ep in zip(self._socks, self.brokers):
            s.connect(ep)
        self._active = 0
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
        for call in self._table.drain():
            _fail(call, ZrpcError("client closed"))
        for s in self._socks:
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
        call = self._table.prepare(service, method, args, kwargs, fut, timeout, idempotent, trace_id)
        self._table.add(call)
        now = self._clock()
        call.broker = self._active
        call.sent_at = now
        self._socks[self._active].send_multipart(call.encode(now), zmq.NOBLOCK)
        return fut

    # --- the reader task -----------------------------------------------------------------

    async def _read(self) -> None:
        poller = zmq.asyncio.Poller()
        for s in self._socks:
            poller.register(s, zmq.POLLIN)
        table = self._table
        while True:
            now = self._clock()
            for sock, _ in await poller.poll(timeout_ms(table.next_deadline(), now, cap=TICK)):
                while True:
                    try:
                        frames = await sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
            for call in table.expired():
                _fail(call, Timeout(f"{call.service}.{call.method}: no reply before the deadline"))

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError:
            return
        if type(msg) is not ClientReply:
            return
        call = self._table.pop(msg.request_id)
        if call is None:
            return
        try:
            result = outcome(msg.status, msg.body)
        except ZrpcError as exc:
            _fail(call, exc)
        else:
            if not call.future.done():
                call.future.set_result(result)


def _fail(call: PendingCall, exc: BaseException) -> None:
    if not call.future.done():
        call.future.set_exception(exc)
