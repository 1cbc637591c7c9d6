"""The one place sockets are made, so every socket gets the same limits and options."""

from __future__ import annotations

import enum
import errno
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import zmq

from zrpc._defaults import MAX_MESSAGE
from zrpc._io._security import CurveKeys

_MORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
ZERO_COPY_MIN = 64 * 1024
"""Frames at least this large are sent without copying; smaller ones are cheaper to copy
(DESIGN.md §2: zero-copy only pays for large bodies)."""

DEFAULT_MAX_MESSAGE = MAX_MESSAGE
"""Larger messages make libzmq drop the sender's connection instead of allocating them."""


@dataclass(frozen=True)
class SocketOptions:
    max_message: int = DEFAULT_MAX_MESSAGE
    hwm: int = 100_000
    reconnect_ivl_ms: int = 250
    reconnect_ivl_max_ms: int = 8000
    linger_ms: int = 0
    curve: CurveKeys | None = None


def make_socket(
    ctx: zmq.Context[Any],
    kind: int,
    *,
    identity: bytes | None = None,
    options: SocketOptions | None = None,
) -> zmq.Socket[Any]:
    """Creates a socket with limits (max message size, high-water marks), no linger, capped
    reconnect backoff, and on routers ROUTER_MANDATORY (a vanished peer is an error) and
    ROUTER_HANDOVER (a peer that reconnects with its routing id takes it over: after a network
    cut the old connection may linger half-open for many seconds, and without handover libzmq
    refuses the new one until it dies)."""
    o = options or SocketOptions()
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.linger = o.linger_ms
    sock.setsockopt(zmq.MAXMSGSIZE, o.max_message)
    sock.sndhwm = o.hwm
    sock.rcvhwm = o.hwm
    sock.setsockopt(zmq.RECONNECT_IVL, o.reconnect_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, o.reconnect_ivl_max_ms)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if o.curve is not None:
        o.curve.apply(sock)
    return sock


_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
# an int option (EVENTS) gives an int: the stubs' `int | bytes` covers every option
_backend_get = cast("Callable[[zmq.Socket[Any], int], int]", zmq.backend.Socket.get)
_backend_send = zmq.backend.Socket.send
"""pyzmq's own send: the Socket.send above it only adds DRAFT routing_id/group handling, which
no zrpc socket uses; calling this one directly halves the cost of a small frame."""


def send_frames(sock: zmq.Socket[Any], frames: list[bytes], flags: int = 0) -> None:
    """send_multipart without its per-frame enum arithmetic (measured 3x faster for small
    messages, which is most of a broker's work)."""
    send = _backend_send
    last = len(frames) - 1
    more = flags | _MORE
    for i, f in enumerate(frames):
        if len(f) >= ZERO_COPY_MIN:
            send(sock, f, flags if i == last else more, copy=False)
        else:
            send(sock, f, flags if i == last else more)


class Sent(enum.Enum):
    """What became of a message given to a socket without blocking."""

    OK = "sent"
    GONE = "unroutable"  # the peer is gone (ROUTER_MANDATORY): nothing went out
    FULL = "full"  # its pipe is full (high-water mark): nothing went out


_SENT_BY_ERRNO = {errno.EHOSTUNREACH: Sent.GONE, errno.EAGAIN: Sent.FULL}


def send_nowait(sock: zmq.Socket[Any], frames: list[bytes]) -> Sent:
    """Sends without blocking, the two zmq errors a loop expects mapped to what they mean;
    any other zmq error is a bug and propagates."""
    try:
        send_frames(sock, frames, NOBLOCK)
    except zmq.ZMQError as exc:
        sent = _SENT_BY_ERRNO.get(exc.errno or 0)
        if sent is None:
            raise
        return sent
    return Sent.OK


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message waits: for sockets that are mostly empty, asking ZMQ_EVENTS costs a
    third of the zmq.Again an empty read raises."""
    return bool(_backend_get(sock, _EVENTS) & _POLLIN)


def recv_nowait(sock: zmq.Socket[Any]) -> list[bytes] | None:
    """The next message, or None when there is none yet (zmq.Again).

    recv_multipart's bytes, read as frames: a frame's `more` replaces a getsockopt(RCVMORE)
    per part (measured 40% cheaper for a five-frame message); the bytes are the same copy."""
    recv = sock.recv
    try:
        frame = recv(NOBLOCK, copy=False)
    except zmq.Again:
        return None
    parts = [frame.bytes]
    while frame.more:  # the rest of a message is there once its first part is
        frame = recv(NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


@contextmanager
def map_zmq_errors(what: str) -> Iterator[None]:
    """zmq errors of setting a socket up become the OSError an operator reads, naming what
    failed ("cannot bind frontend tcp://*:5555: Address already in use"), with no traceback
    of zmq internals; the one place loops translate them (httpcore's map_exceptions shape)."""
    try:
        yield
    except zmq.ZMQError as exc:
        raise OSError(f"cannot {what}: {exc.strerror}") from None


def bind(sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
    """Binds, or raises OSError naming `what` and `endpoint`."""
    with map_zmq_errors(f"bind {what} {endpoint}"):
        sock.bind(endpoint)


class Waker:
    """Wakes a socket loop from other threads (zmq sockets are not thread-safe, so other
    threads never touch the loop's sockets; they queue work and ring this)."""

    def __init__(self, ctx: zmq.Context[Any], name: str) -> None:
        addr = f"inproc://zrpc-wake-{name}"
        self.socket = ctx.socket(zmq.PAIR)  # the loop polls this one
        self.socket.bind(addr)
        self._tx = ctx.socket(zmq.PAIR)
        self._tx.connect(addr)
        self._lock = threading.Lock()
        self._pending = False

    def wake(self) -> None:
        if self._pending:  # a wake-up is on its way; the loop will see our work
            return
        self._pending = True
        with self._lock:
            try:
                self._tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def clear(self) -> None:
        """Called by the loop before it looks at the queued work (on every wake-up, so it asks
        ZMQ_EVENTS first: a zmq.Again raised costs three times as much)."""
        self._pending = False
        sock = self.socket
        while _backend_get(sock, _EVENTS) & _POLLIN:
            try:
                sock.recv(NOBLOCK)
            except zmq.Again:
                return

    def close(self) -> None:
        with self._lock:
            self._tx.close(linger=0)
        self.socket.close(linger=0)


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


def handshake_outcome(monitor: zmq.Socket[Any]) -> tuple[bool, str | None] | None:
    """Reads one event from a socket monitor: (True, None) for a completed handshake,
    (True, reason) for a refused one, None for anything else."""
    try:
        frames = monitor.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None
    return parse_handshake(frames)


def parse_handshake(frames: list[bytes]) -> tuple[bool, str | None] | None:
    """The same, from an event already received (asyncio sockets receive it themselves)."""
    from zmq.utils.monitor import parse_monitor_message

    try:
        ev = parse_monitor_message(frames)
    except Exception:
        return None
    kind = ev["event"]
    if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return True, None
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return True, f"the broker refused this key (ZAP status {ev['value']})"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return True, "security handshake failed (CURVE keys on one side only, or the wrong server key)"
    return None


def quietly(fn: Callable[..., object], *args: Any) -> None:
    """Releasing one socket must not keep the others (and the context) from being released."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


class BrokerLinks:
    """A client's DEALER per broker, each with its handshake monitor, by the session's broker
    index; one list for both clients (threads and asyncio: `ctx` and `poller` say which).

    Indexes only grow: a broker that left the cluster keeps its index with None in `socks`
    (the session never sends there again)."""

    def __init__(self, ctx: Any, poller: Any, identity: bytes, options: SocketOptions) -> None:
        self._ctx, self._poller, self._identity, self._options = ctx, poller, identity, options
        self.endpoints: list[str] = []
        self.socks: list[zmq.Socket[Any] | None] = []
        self.monitors: list[zmq.Socket[Any] | None] = []
        self.index: dict[Any, tuple[int, bool]] = {}  # socket -> (broker, is its monitor)

    def connect(self, b: int, endpoint: str) -> None:
        """Broker `b`'s socket (always the next index), with its handshake monitor, polled."""
        if len(self.endpoints) <= b:
            self.endpoints.append(endpoint)
        self.socks.append(None)  # the index exists whatever fails below
        self.monitors.append(None)
        sock = make_socket(self._ctx, zmq.DEALER, identity=self._identity, options=self._options)
        try:
            monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        except Exception:
            sock.close(linger=0)
            raise
        self.socks[b], self.monitors[b] = sock, monitor
        for s, is_monitor in ((sock, False), (monitor, True)):
            self.index[s] = (b, is_monitor)
            self._poller.register(s, zmq.POLLIN)
        try:
            sock.connect(endpoint)
        except Exception:
            self.disconnect(b)
            raise

    def disconnect(self, b: int) -> None:
        """Broker `b` left the cluster (or the client closes): its sockets are closed."""
        sock, monitor = self.socks[b], self.monitors[b]
        self.socks[b] = self.monitors[b] = None
        for s in (sock, monitor):
            if s is not None and self.index.pop(s, None) is not None:
                quietly(self._poller.unregister, s)
        if sock is not None:
            quietly(sock.disable_monitor)
            quietly(sock.close, 0)
        if monitor is not None:
            quietly(monitor.close, 0)

    def close(self) -> None:
        for b in range(len(self.socks)):
            self.disconnect(b)
