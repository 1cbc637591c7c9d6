"""zrpc: Python RPC over ZeroMQ with high availability built in.

Everything in __all__ is the public API; the underscored modules are internal.
"""

from zrpc._core._context import CallContext, Middleware, current_call
from zrpc._core._service import Service
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
from zrpc._io._async_client import AsyncClient
from zrpc._io._client import Client
from zrpc._io._worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "CallContext",
    "CallStateUnknown",
    "Client",
    "MethodNotFound",
    "Middleware",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "Service",
    "ServiceUnavailable",
    "Timeout",
    "Unauthorized",
    "Worker",
    "ZrpcError",
    "current_call",
]

for _name in __all__:
    globals()[_name].__module__ = "zrpc"
del _name

from zrpc import middleware as middleware  # noqa: E402 - zrpc.middleware.Timing after `import zrpc`
