"""Proxies: `client.proxy("calc").add(1, 2)`, shared by Client and AsyncClient."""

from __future__ import annotations

from typing import Any, Protocol


class _Calls(Protocol):
    """What a proxy needs of its client: Client and AsyncClient both have it."""

    def _invoke(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                **options: Any) -> Any: ...

    def _submit(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None) -> Any: ...


class MethodProxy:
    """A remote method; call it, `.future()` it, or `.with_options(timeout=...)` it."""

    __slots__ = ("_client", "_service", "_method", "_options")

    def __init__(self, client: _Calls, service: str, method: str,
                 options: dict[str, Any] | None = None) -> None:
        self._client = client
        self._service = service
        self._method = method
        self._options = options or {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client._invoke(self._service, self._method, args, kwargs, **self._options)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        """Sends now and returns a future (concurrent.futures or asyncio, by client kind)."""
        return self._client._submit(self._service, self._method, args, kwargs, **self._options)

    def with_options(self, *, timeout: float | None = None, idempotent: bool | None = None,
                     trace_id: str | None = None) -> MethodProxy:
        opts = dict(self._options)
        for k, v in (("timeout", timeout), ("idempotent", idempotent), ("trace_id", trace_id)):
            if v is not None:
                opts[k] = v
        return MethodProxy(self._client, self._service, self._method, opts)

    def __repr__(self) -> str:
        return f"<zrpc method {self._service}.{self._method}>"


class ServiceProxy:
    """A remote service: each attribute is one of its methods."""

    __slots__ = ("_client", "_service")

    def __init__(self, client: _Calls, service: str) -> None:
        self._client = client
        self._service = service

    def __getattr__(self, name: str) -> MethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return MethodProxy(self._client, self._service, name)

    def __repr__(self) -> str:
        return f"<zrpc service {self._service}>"
