"""The exceptions a zrpc user catches: one family, named for what went wrong."""

from __future__ import annotations


class ZrpcError(Exception):
    """Base of every error zrpc raises for a call or a peer."""


class RemoteError(ZrpcError):
    """The handler raised: its type, message and (when the broker allows) traceback."""

    def __init__(self, remote_type: str, message: str, remote_traceback: str | None = None) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback


class Timeout(ZrpcError):
    """No reply before the call's deadline."""


class ServiceUnavailable(ZrpcError):
    """No worker serves the service."""


class MethodNotFound(ZrpcError):
    """The service exists but has no such method."""


class Overloaded(ZrpcError):
    """A bounded queue or limit is full; retrying later may succeed."""


class CallStateUnknown(ZrpcError):
    """A non-idempotent call may or may not have run, and retrying it is not safe."""


class ProtocolError(ZrpcError):
    """A message broke the ZRPC/1 rules (malformed frames, wrong types, too large).

    `reply_to` is the request id when enough of the message was readable to answer it.
    """

    def __init__(self, message: str, reply_to: int | None = None) -> None:
        super().__init__(message)
        self.reply_to = reply_to


class Unauthorized(ZrpcError):
    """The broker refused this peer's credentials."""


__all__ = [
    "CallStateUnknown",
    "MethodNotFound",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "ServiceUnavailable",
    "Timeout",
    "Unauthorized",
    "ZrpcError",
]
