"""Call bodies: how arguments, results and errors travel (msgpack), and status -> exception."""

from __future__ import annotations

from typing import Any

import msgpack

from zrpc._core._frames import Status, pack
from zrpc._errors import (
    CallStateUnknown,
    MethodNotFound,
    Overloaded,
    ProtocolError,
    RemoteError,
    ServiceUnavailable,
    Timeout,
    Unauthorized,
    ZrpcError,
)


def pack_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Raises TypeError at the caller, before anything is sent, for unserializable arguments."""
    try:
        return pack([list(args), kwargs])
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"arguments cannot be sent with msgpack: {exc}") from None


def unpack_call(body: bytes) -> tuple[list[Any], dict[str, Any]]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"call body is not valid msgpack: {type(exc).__name__}") from None
    if (
        not isinstance(obj, list)
        or len(obj) != 2
        or not isinstance(obj[0], list)
        or not isinstance(obj[1], dict)
        or not all(isinstance(k, str) for k in obj[1])
    ):
        raise ProtocolError("call body must be [args array, kwargs map with string keys]")
    return obj[0], obj[1]


def pack_result(value: Any) -> bytes:
    return pack(value)


def unpack_result(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def pack_error(kind: str, message: str, traceback: str | None = None) -> bytes:
    return pack({"type": kind, "message": message, "traceback": traceback})


def unpack_error(body: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        obj = None
    if not isinstance(obj, dict):
        return {"type": "ProtocolError", "message": "undecodable error body", "traceback": None}
    return {
        "type": str(obj.get("type", "Error")),
        "message": str(obj.get("message", "")),
        "traceback": obj.get("traceback") if isinstance(obj.get("traceback"), str) else None,
    }


_TRANSPORT: dict[int, type[ZrpcError]] = {
    Status.TIMEOUT: Timeout,
    Status.SERVICE_UNAVAILABLE: ServiceUnavailable,
    Status.METHOD_NOT_FOUND: MethodNotFound,
    Status.OVERLOADED: Overloaded,
    Status.CALL_STATE_UNKNOWN: CallStateUnknown,
    Status.PROTOCOL_ERROR: ProtocolError,
    Status.UNAUTHORIZED: Unauthorized,
}


def outcome(status: int, body: bytes) -> Any:
    """The result of a reply, or raises the exception its status stands for."""
    if status == Status.OK:
        try:
            return unpack_result(body)
        except Exception as exc:
            raise ProtocolError(f"result body is not valid msgpack: {type(exc).__name__}") from None
    err = unpack_error(body)
    if status == Status.ERROR:
        raise RemoteError(err["type"], err["message"], err["traceback"])
    cls = _TRANSPORT.get(status, ZrpcError)
    raise cls(err["message"] or cls.__name__)
