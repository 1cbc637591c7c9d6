"""Client: thread-safe calls over one DEALER per broker, owned by a background I/O thread.

Caller threads encode their call and queue it; the I/O thread sends, matches replies by
request id and completes concurrent.futures.Future objects, so any number of calls from any
number of threads share one socket.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from concurrent.futures import Future
from typing import Any, Sequence

import zmq

from ._calls import CallTable, PendingCall
from ._clock import Clock, monotonic, timeout_ms
from ._config import resolve_brokers
from ._errors import ProtocolError, Timeout, ZrpcError
from ._frames import ClientReply, decode_frames
from ._proxy import ServiceProxy
from ._serial import outcome
from ._sockets import SocketOptions, Waker, make_socket, send_frames

BATCH = 512


class Client:
    """Calls services through the broker(s). Use as a context manager, or call close()."""

    def __init__(
        self,
        brokers: Sequence[str] | str | None = None,
        *,
        timeout: float = 10.0,
        context: zmq.Context | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
    ) -> None:
        self.brokers = resolve_brokers(brokers)
        self.timeout = timeout
        self.identity = uuid.uuid4().bytes
        self._clock = clock
        self._table = CallTable(clock, timeout)
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._opts = SocketOptions(max_message=max_message) if max_message else SocketOptions()
        self._outbox: deque[PendingCall] = deque()
        self._closed = threading.Event()
        self._waker = Waker(self._ctx, "client-" + self.identity.hex())
        self._socks = [make_socket(self._ctx, zmq.DEALER, identity=self.identity, options=self._opts)
                       for _ in self.brokers]
        for s, ep in zip(self._socks, self.brokers):
            s.connect(ep)
        self._active = 0
        self._thread = threading.Thread(target=self._loop, name="zrpc-client", daemon=True)
        self._thread.start()

    # --- public --------------------------------------------------------------------------

    def proxy(self, service: str) -> ServiceProxy:
        return ServiceProxy(self, service)

    def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls and waits; raises a ZrpcError subclass on failure."""
        return self._invoke(service, method, args, kwargs)

    def future(self, service: str, method: str, *args: Any, **kwargs: Any) -> Future:
        return self._submit(service, method, args, kwargs)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._waker.wake()
        self._thread.join(timeout=5)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- used by proxies -----------------------------------------------------------------

    def _submit(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None) -> Future:
        if self._closed.is_set():
            raise ZrpcError("client is closed")
        fut: Future = Future()
        call = self._table.prepare(service, method, args, kwargs, fut, timeout, idempotent, trace_id)
        self._outbox.append(call)
        self._waker.wake()
        return fut

    def _invoke(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                **options: Any) -> Any:
        fut = self._submit(service, method, args, kwargs, **options)
        timeout = options.get("timeout") or self.timeout
        try:
            return fut.result(timeout=timeout + 5.0)  # the loop answers at the deadline
        except TimeoutError:
            raise Timeout(f"{service}.{method}: no reply within {timeout:g}s") from None

    # --- the I/O thread ------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        for s in self._socks:
            poller.register(s, zmq.POLLIN)
        poller.register(self._waker.socket, zmq.POLLIN)
        table = self._table
        try:
            while not self._closed.is_set():
                now = self._clock()
                for sock, _ in poller.poll(timeout_ms(table.next_deadline(), now, cap=0.25)):
                    if sock is self._waker.socket:
                        continue
                    for _ in range(BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                self._waker.clear()
                self._send_outbox()
                for call in table.expired():
                    _fail(call, Timeout(f"{call.service}.{call.method}: no reply before the deadline"))
        finally:
            for call in [*table.drain(), *self._outbox]:
                _fail(call, ZrpcError("client closed"))
            for s in self._socks:
                s.close(linger=0)
            self._waker.close()

    def _send_outbox(self) -> None:
        outbox = self._outbox
        if not outbox:
            return
        now = self._clock()
        sock = self._socks[self._active]
        while outbox:
            call = outbox.popleft()
            self._table.add(call)
            call.broker = self._active
            call.sent_at = now
            send_frames(sock, call.encode(now))

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError:
            return  # a broken reply cannot be matched to a call; the call times out
        if type(msg) is not ClientReply:
            return
        call = self._table.pop(msg.request_id)
        if call is None:
            return  # late or duplicate reply
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
