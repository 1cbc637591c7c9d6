"""ZRPC/1 codec: two frames (msgpack head, opaque body) <-> frozen dataclasses, sans-IO.

Every malformed input raises `ProtocolError` and nothing else, so a loop can catch one type
and stay up. The spec is docs/protocol.md; keep the two in step: its message list is READERS
(protocol tag -> command -> reader) and WRITERS (message class -> writer) below.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from zrpc._errors import ProtocolError

CLIENT = "ZRPC1C"
WORKER = "ZRPC1W"
PEER = "ZRPC1S"  # broker <-> broker state (Binary Star)

MAX_HEAD = 64 * 1024
"""Heads are small routing data; anything larger is an attack or a bug."""

MAX_ID = 255
"""ZeroMQ routing ids are at most 255 bytes."""

MAX_BUDGET_MS = 86_400_000
"""A day: no call waits longer, and a larger budget is a client's bug (or an attack on the
queues' deadlines)."""

MAX_SERVICES = 100
"""Services one READY may announce: each costs the broker a queue and a strategy."""

MAX_METHODS = 1000
"""Methods one READY may announce per service."""

MAX_CAPACITY = 100_000
"""Calls one READY may offer at once: a larger capacity is a bug, and would let one worker
take every queued call."""

MAX_WEIGHT = 1e6
"""A READY's weight for the weighted strategy: beyond this the shares stop making sense."""

MAX_ATTEMPT = 1000
"""The attempt header counts a call's retries: more than this is no client's retry loop."""


class Command(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    READY = 3
    HEARTBEAT = 4
    DISCONNECT = 5


# plain ints on the hot path (an IntEnum comparison costs more than an int's)
_REQUEST, _REPLY, _READY, _HEARTBEAT, _DISCONNECT = (int(c) for c in Command)


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1  # the handler raised
    TIMEOUT = 2
    SERVICE_UNAVAILABLE = 3
    METHOD_NOT_FOUND = 4
    OVERLOADED = 5
    CALL_STATE_UNKNOWN = 6
    PROTOCOL_ERROR = 7
    NOT_ACTIVE = 8  # a passive broker: send to its peer
    UNAUTHORIZED = 9
    NOT_SEEN = 10  # worker -> broker, answering a probe: this call never ran here


_STATUSES = frozenset(int(s) for s in Status)
_REQUEST_FIELDS = 6  # [protocol, REQUEST, request_id, service, method, headers]

# Header keys (docs/protocol.md §4). Unknown keys are carried along untouched.
H_BUDGET = "budget_ms"
H_IDEMPOTENT = "idempotent"
H_ATTEMPT = "attempt"
H_TRACE = "trace_id"
H_RESENT = "resent"  # the client re-sent it after losing its broker: it may have run already
H_PROBE = "probe"  # broker -> worker: answer from your reply cache only, never run it
H_EPOCH = "epoch"  # broker -> worker (--elect): the sender's epoch; an older one is refused
H_CALLER = "caller"  # broker -> worker: the caller's CURVE public key (Z85), when keys are on
H_HEDGE = "hedge_after_ms"  # client -> broker: run a second copy elsewhere if no reply by then
H_REDUNDANT = "redundant"  # client -> broker: run on this many workers, compare the replies

NO_WORKER = "no worker serves"
"""How a broker's SERVICE_UNAVAILABLE message begins when no worker of the service is there
(rule 8), as opposed to a lost worker's call it could not retry: a cluster client tries the
other members for the first kind only."""


@dataclass(frozen=True, slots=True)
class ClientRequest:
    request_id: int
    service: str
    method: str
    headers: dict[str, Any]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ClientReply:
    request_id: int
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    client_id: bytes
    request_id: int
    service: str
    method: str
    headers: dict[str, Any]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class WorkerReply:
    client_id: bytes
    request_id: int
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Ready:
    """A worker's announcement: services -> {method: idempotent}, and its capacity."""

    worker_id: str
    services: dict[str, dict[str, bool]]
    capacity: int
    weight: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness both ways; `info` carries settings and state (interval_ms, broker state)."""

    sender: str  # CLIENT or WORKER protocol tag
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """From a worker: take no new calls, in-flight ones will still be replied.
    From the broker: acknowledged, nothing more will be sent."""


Message = Union[  # noqa: UP007
    ClientRequest, ClientReply, WorkerRequest, WorkerReply, Ready, Heartbeat, Disconnect]


def pack(obj: Any) -> bytes:
    """msgpack with bin and str kept apart (packb: a shared Packer is not thread-safe)."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


# --- encoding -------------------------------------------------------------------------------
# One writer per message class (docs/protocol.md §3): the head's fields in order, and the body.


def _write_client_request(m: ClientRequest) -> list[bytes]:
    return [pack([CLIENT, _REQUEST, m.request_id, m.service, m.method, m.headers]), m.body]


def _write_client_reply(m: ClientReply) -> list[bytes]:
    return [pack([CLIENT, _REPLY, m.request_id, m.status]), m.body]


def _write_worker_request(m: WorkerRequest) -> list[bytes]:
    return [pack([WORKER, _REQUEST, m.client_id, m.request_id, m.service, m.method, m.headers]), m.body]


def _write_worker_reply(m: WorkerReply) -> list[bytes]:
    return [pack([WORKER, _REPLY, m.client_id, m.request_id, m.status]), m.body]


def _write_ready(m: Ready) -> list[bytes]:
    return [pack([WORKER, _READY, m.worker_id, m.services, m.capacity, m.weight, m.info]), b""]


def _write_heartbeat(m: Heartbeat) -> list[bytes]:
    return [pack([m.sender, _HEARTBEAT, m.info]), b""]


def _write_disconnect(m: Disconnect) -> list[bytes]:
    return [pack([WORKER, _DISCONNECT]), b""]


WRITERS: dict[type[Any], Callable[[Any], list[bytes]]] = {
    ClientRequest: _write_client_request,
    ClientReply: _write_client_reply,
    WorkerRequest: _write_worker_request,
    WorkerReply: _write_worker_reply,
    Ready: _write_ready,
    Heartbeat: _write_heartbeat,
    Disconnect: _write_disconnect,
}
"""Message class -> its writer (each takes exactly the class it is filed under)."""


def encode(msg: Message) -> list[bytes]:
    """Returns the two frames [head, body] for one message."""
    writer = WRITERS.get(type(msg))
    if writer is None:
        raise TypeError(f"not a ZRPC/1 message: {msg!r}")
    return writer(msg)


# --- decoding -------------------------------------------------------------------------------


def _unpack_head(head: bytes) -> list[Any]:
    if len(head) > MAX_HEAD:
        raise ProtocolError(f"head of {len(head)} bytes exceeds {MAX_HEAD}")
    try:
        # Any map key is read: an int key in an ignored trailing field must not sink the
        # message, and fields that need string keys check them (headers). msgpack's guard
        # against hash floods is not needed: str and bin hash with a seed, and its 64-bit
        # numbers, nil and booleans cannot be chosen to share hashes in bulk.
        fields = msgpack.unpackb(head, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise ProtocolError(f"head is not valid msgpack: {type(exc).__name__}",
                            reply_to=_readable_request_id(head)) from None
    if not isinstance(fields, list) or len(fields) < 2:
        raise ProtocolError("head must be an array [protocol, command, ...]")
    return fields


def _readable_request_id(head: bytes) -> int | None:
    """The request id of a client REQUEST whose head did not unpack as a whole (a header map
    with an int key, trailing bytes, a truncated head...): read one element at a time, up to
    the id, so such a request is answered PROTOCOL_ERROR rather than dropped. Only on the
    error path."""
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=MAX_HEAD)
        unpacker.feed(head)
        if unpacker.read_array_header() < 3:
            return None
        tag, cmd, rid = unpacker.unpack(), unpacker.unpack(), unpacker.unpack()
    except Exception:  # noqa: BLE001 - garbage before the id: nothing to answer
        return None
    if tag == CLIENT and type(cmd) is int and cmd == _REQUEST and type(rid) is int and 0 <= rid < 2**64:
        return rid
    return None


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}]")
    return v


def _str(v: Any, what: str, max_len: int = 256) -> str:
    if type(v) is not str or len(v) > max_len:
        raise ProtocolError(f"{what} must be a string of at most {max_len} characters")
    return v


def _id(v: Any, what: str) -> bytes:
    if type(v) is not bytes or not 0 < len(v) <= MAX_ID:
        raise ProtocolError(f"{what} must be 1..{MAX_ID} bytes")
    return v


def _headers(v: Any) -> dict[str, Any]:
    if type(v) is not dict:
        raise ProtocolError("headers must be a map")
    for k in v:
        if type(k) is not str:
            raise ProtocolError("header keys must be strings")
    b = v.get(H_BUDGET)
    if b is not None and (type(b) is not int or not 0 <= b <= MAX_BUDGET_MS):
        raise ProtocolError(f"header {H_BUDGET} must be an integer in [0, {MAX_BUDGET_MS}] (ms)")
    i = v.get(H_IDEMPOTENT)
    if i is not None and type(i) is not bool:
        raise ProtocolError(f"header {H_IDEMPOTENT} must be a boolean")
    for flag in (H_RESENT, H_PROBE):
        f = v.get(flag)
        if f is not None and type(f) is not bool:
            raise ProtocolError(f"header {flag} must be a boolean")
    a = v.get(H_ATTEMPT)
    if a is not None and (type(a) is not int or not 0 <= a <= MAX_ATTEMPT):
        raise ProtocolError(f"header {H_ATTEMPT} must be a small non-negative integer")
    return v


def _status(v: Any) -> int:
    if type(v) is not int or v not in _STATUSES:
        raise ProtocolError(f"unknown status {v!r}")
    return v


def _any_status(v: Any) -> int:
    """A worker's status byte: one the broker does not know is still a reply it must answer
    its client for (with PROTOCOL_ERROR), not a message to drop."""
    if type(v) is not int or not 0 <= v <= 255:
        raise ProtocolError(f"status must be an integer in [0, 255], got {v!r}")
    return v


def _services(v: Any) -> dict[str, dict[str, bool]]:
    if type(v) is not dict or not v or len(v) > MAX_SERVICES:
        raise ProtocolError(f"services must be a non-empty map of at most {MAX_SERVICES} services")
    for name, methods in v.items():
        _str(name, "service name")
        if type(methods) is not dict or len(methods) > MAX_METHODS:
            raise ProtocolError(f"methods of {name!r} must be a map method -> idempotent of at "
                                f"most {MAX_METHODS} methods")
        for m, idem in methods.items():
            _str(m, "method name")
            if type(idem) is not bool:
                raise ProtocolError(f"idempotent flag of {name}.{m} must be a boolean")
    return v


def _info(fields: list[Any], at: int) -> dict[str, Any]:
    if len(fields) <= at:
        return {}
    v = fields[at]
    if type(v) is not dict:
        raise ProtocolError("info must be a map")
    return v


def _need(fields: list[Any], n: int, what: str) -> None:
    if len(fields) < n:
        raise ProtocolError(f"{what} needs {n} head fields, got {len(fields)}")


# One reader per (dialect, command) of docs/protocol.md §3. Each gets the head's fields, whose
# first two (tag, command) were checked, and the body; it checks the rest of what it reads.


def _read_client_request(fields: list[Any], body: bytes) -> ClientRequest:
    _need(fields, 3, "client REQUEST")
    rid = _int(fields[2], "request_id")
    try:  # the id is readable: every later error can be answered
        _need(fields, _REQUEST_FIELDS, "client REQUEST")
        return ClientRequest(rid, _str(fields[3], "service"), _str(fields[4], "method"), _headers(fields[5]), body)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), reply_to=rid) from None


def _read_client_reply(fields: list[Any], body: bytes) -> ClientReply:
    _need(fields, 4, "client REPLY")
    return ClientReply(_int(fields[2], "request_id"), _status(fields[3]), body)


def _read_client_heartbeat(fields: list[Any], body: bytes) -> Heartbeat:
    return Heartbeat(CLIENT, _info(fields, 2))


def _read_worker_request(fields: list[Any], body: bytes) -> WorkerRequest:
    _need(fields, 7, "worker REQUEST")
    return WorkerRequest(
        _id(fields[2], "client_id"),
        _int(fields[3], "request_id"),
        _str(fields[4], "service"),
        _str(fields[5], "method"),
        _headers(fields[6]),
        body,
    )


def _read_worker_reply(fields: list[Any], body: bytes) -> WorkerReply:
    _need(fields, 5, "worker REPLY")
    return WorkerReply(_id(fields[2], "client_id"), _int(fields[3], "request_id"), _any_status(fields[4]), body)


def _read_ready(fields: list[Any], body: bytes) -> Ready:
    _need(fields, 5, "READY")
    weight = fields[5] if len(fields) > 5 else 1.0
    if type(weight) not in (int, float) or not 0 < weight <= MAX_WEIGHT:
        raise ProtocolError("weight must be a positive number")
    return Ready(
        _str(fields[2], "worker_id"),
        _services(fields[3]),
        _int(fields[4], "capacity", 1, MAX_CAPACITY),
        float(weight),
        _info(fields, 6),
    )


def _read_worker_heartbeat(fields: list[Any], body: bytes) -> Heartbeat:
    return Heartbeat(WORKER, _info(fields, 2))


def _read_disconnect(fields: list[Any], body: bytes) -> Disconnect:
    return Disconnect()


Reader = Callable[[list[Any], bytes], Message]

READERS: dict[str, dict[int, Reader]] = {
    CLIENT: {
        _REQUEST: _read_client_request,  # client -> broker
        _REPLY: _read_client_reply,  # broker -> client
        _HEARTBEAT: _read_client_heartbeat,  # both ways
    },
    WORKER: {
        _REQUEST: _read_worker_request,  # broker -> worker
        _REPLY: _read_worker_reply,  # worker -> broker
        _READY: _read_ready,  # worker -> broker
        _HEARTBEAT: _read_worker_heartbeat,  # both ways
        _DISCONNECT: _read_disconnect,  # both ways
    },
}
"""Protocol tag -> command -> reader: the messages of ZRPC/1 (docs/protocol.md §2 and §3).
A tag or a command missing here is a protocol error."""


def decode(head: bytes, body: bytes = b"") -> Message:
    """Parses one message; raises ProtocolError (with `reply_to` when answerable)."""
    fields = _unpack_head(head)
    tag, cmd = fields[0], fields[1]
    if type(cmd) is not int:  # msgpack true is not command 1
        raise ProtocolError(f"command must be an integer, got {cmd!r}")
    try:
        reader = READERS[tag][cmd]
    except (KeyError, TypeError):  # TypeError: a tag that is a list or a map is no key
        if type(tag) is not str or tag not in READERS:
            raise ProtocolError(f"unknown protocol tag {tag!r}") from None
        raise ProtocolError(f"unknown command {cmd!r} for {tag}") from None
    return reader(fields, body)


def decode_frames(frames: list[bytes]) -> Message:
    """Like decode(), from a frame list: exactly [head, body] or [head]."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"expected 2 frames [head, body], got {len(frames)}")
    return decode(frames[0], frames[1] if len(frames) == 2 else b"")

