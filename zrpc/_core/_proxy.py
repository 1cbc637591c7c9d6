"""Proxies: `client.proxy("calc").add(1, 2)`, shared by Client and AsyncClient."""

from __future__ import annotations

from typing import Any, Protocol

from zrpc._core._calls import check_copies


class _Calls(Protocol):
    """What a proxy needs of its client: Client and AsyncClient both have it."""

    def _invoke(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                **options: Any) -> Any: ...

    def _submit(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None, **options: Any) -> Any: ...


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
                     trace_id: str | None = None, hedge_after: float | None = None,
                     max_attempts: int | None = None, redundant: int | None = None
                     ) -> MethodProxy:
        """The same method with some options set (the others kept), checked now:

        - `timeout` (seconds), `idempotent=False` (never retried), `trace_id`;
        - `hedge_after=0.05, max_attempts=2`: when no reply came 50 ms after a copy went out,
          the broker sends another copy to a different worker, up to `max_attempts` copies
          (2..5) in all; the first reply wins, the others are cancelled at the broker;
        - `redundant=2`: the call runs on two (2..5) different workers at once; the first
          reply is the result, and a later one that differs raises a `result_mismatch` alert
          naming both workers.

        Hedged and redundant calls are for idempotent methods only, as the broker knows them
        from its workers: it does not hedge another one, and answers a redundant call to one
        ProtocolError without running it. Both cost retry tokens of the broker's retry budget
        (docs/protocol.md §7, rules 16-17)::

            fast = client.proxy("calc").add.with_options(hedge_after=0.05, max_attempts=2)
            fast(1, 2)
            checked = client.proxy("calc").add.with_options(redundant=2)
            checked(1, 2)
        """
        opts = dict(self._options)
        for k, v in (("timeout", timeout), ("idempotent", idempotent), ("trace_id", trace_id),
                     ("hedge_after", hedge_after), ("max_attempts", max_attempts),
                     ("redundant", redundant)):
            if v is not None:
                opts[k] = v
        if hedge_after is not None:  # a new hedge replaces a redundancy, and the other way
            opts.pop("redundant", None)
        if redundant is not None:
            opts.pop("hedge_after", None)
            opts.pop("max_attempts", None)
        check_copies(opts.get("hedge_after"), opts.get("max_attempts"), opts.get("redundant"),
                     opts.get("timeout"))
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
