"""zrpc: Python RPC over ZeroMQ with high availability built in.

Everything in __all__ is the public API; the underscored modules are internal.
"""

from ._async_client import AsyncClient
from ._client import Client
from ._errors import (
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
from ._service import Service
from ._worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "CallStateUnknown",
    "Client",
    "MethodNotFound",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "Service",
    "ServiceUnavailable",
    "Timeout",
    "Unauthorized",
    "Worker",
    "ZrpcError",
]

for _name in __all__:
    globals()[_name].__module__ = "zrpc"
del _name
