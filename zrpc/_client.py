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

from ._calls import PendingCall
from ._clock import Clock, monotonic, timeout_ms
from ._config import resolve_brokers
from ._errors import ProtocolError, Timeout, ZrpcError
from ._frames import decode_frames
from ._proxy import ServiceProxy
from ._security import client_keys
from ._session import Output, Session, Transmit, settle
from ._sockets import (
    HANDSHAKE_EVENTS,
    NOBLOCK,
    SocketOptions,
    Waker,
    handshake_outcome,
    make_socket,
    send_frames,
)

BATCH = 512


class Client:
    """Calls services through the broker(s). Use as a context manager, or call close()."""

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
        context: zmq.Context | None = None,
        clock: Clock = monotonic,
        max_message: int | None = None,
    ) -> None:
        self.brokers = resolve_brokers(brokers)
        self.timeout = timeout
        self.identity = uuid.uuid4().bytes
        self._clock = clock
        self._session = Session(clock, len(self.brokers), timeout, interval=heartbeat_interval,
                                liveness=liveness, failover_timeout=failover_timeout)
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._opts = SocketOptions(curve=client_keys(curve_server_key, curve_secret),
                                   **({"max_message": max_message} if max_message else {}))
        self._outbox: deque[PendingCall] = deque()
        self._closed = threading.Event()
        self._waker = Waker(self._ctx, "client-" + self.identity.hex())
        self._socks = [make_socket(self._ctx, zmq.DEALER, identity=self.identity, options=self._opts)
                       for _ in self.brokers]
        # handshake outcomes tell a refused key (Unauthorized) from a silent broker (Timeout)
        self._monitors = [s.get_monitor_socket(HANDSHAKE_EVENTS) for s in self._socks]
        for s, ep in zip(self._socks, self.brokers):
            s.connect(ep)
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
        call = self._session.table.prepare(service, method, args, kwargs, fut, timeout, idempotent, trace_id)
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
        index = {s: i for i, s in enumerate(self._socks)}
        monitors = {m: i for i, m in enumerate(self._monitors)}
        for s in [*self._socks, *self._monitors]:
            poller.register(s, zmq.POLLIN)
        poller.register(self._waker.socket, zmq.POLLIN)
        session = self._session
        try:
            while not self._closed.is_set():
                now = self._clock()
                for sock, _ in poller.poll(timeout_ms(session.next_deadline(), now, cap=0.25)):
                    if sock is self._waker.socket:
                        continue
                    if sock in monitors:
                        outcome = handshake_outcome(sock)
                        if outcome is not None:
                            self._apply(session.handshake(monitors[sock], outcome[1]))
                        continue
                    b = index[sock]
                    for _ in range(BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            msg = decode_frames(frames)
                        except ProtocolError:
                            continue  # cannot be matched to a call; that call will time out
                        self._apply(session.received(b, msg))
                self._waker.clear()
                outbox = self._outbox
                while outbox:
                    self._apply(session.submit(outbox.popleft()))
                self._apply(session.tick())
        finally:
            for call in [*session.close(), *self._outbox]:
                call.fail(ZrpcError("client closed"))
            for s, m in zip(self._socks, self._monitors):
                s.disable_monitor()
                m.close(linger=0)
                s.close(linger=0)
            self._waker.close()

    def _apply(self, outputs: list[Output]) -> None:
        for o in outputs:
            if type(o) is Transmit:
                try:
                    send_frames(self._socks[o.broker], o.frames, NOBLOCK)  # type: ignore[union-attr]
                except zmq.Again:
                    pass  # that broker cannot take more now: its calls keep their deadlines
            else:
                settle(o)
