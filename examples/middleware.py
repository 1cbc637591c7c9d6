"""Middleware to copy from: a log line per call, an authorization check by caller key, and
OpenTelemetry spans (when `opentelemetry` is installed; zrpc does not depend on it).

Each works on a worker and on a client alike (`ctx.kind` says which side it is on):

    zrpc.Worker([calc], middleware=[RequireCaller(admin_only={"reset": {ADMIN_KEY}}), Logging()])
    zrpc.Client(middleware=[Spans(), Logging()])

`python -m zrpc.examples.middleware` serves the calc example with logging (and spans, when
OpenTelemetry is there) through the brokers in $ZRPC_BROKERS, or the local pair.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import zrpc

log = logging.getLogger("zrpc.examples.middleware")

try:  # optional: spans only when the OpenTelemetry API is installed
    from opentelemetry import trace as otel_trace  # type: ignore[import-not-found, unused-ignore]  # optional
    from opentelemetry.trace import (  # type: ignore[import-not-found, unused-ignore]  # optional
        SpanKind,
        Status,
        StatusCode,
    )
except ImportError:  # pragma: no cover - depends on what is installed
    otel_trace = None  # type: ignore[assignment, unused-ignore]  # None: OpenTelemetry is not installed

_T0 = "examples.logging.t0"
_SPAN = "examples.otel.span"


class Logging(zrpc.Middleware):
    """One line per call: what, who, which trace, how long, and how it ended."""

    def __init__(self, logger: logging.Logger = log, level: int = logging.INFO) -> None:
        self.logger = logger
        self.level = level

    def before(self, ctx: zrpc.CallContext) -> None:
        ctx.state[_T0] = ctx.clock()

    def after(self, ctx: zrpc.CallContext, result: Any) -> None:
        self._line(ctx, "ok")

    def on_error(self, ctx: zrpc.CallContext, exc: BaseException) -> None:
        self._line(ctx, f"failed: {type(exc).__name__}: {exc}")

    def _line(self, ctx: zrpc.CallContext, outcome: str) -> None:
        t0 = ctx.state.get(_T0)
        took = "" if t0 is None else f" in {(ctx.clock() - t0) * 1000:.1f} ms"
        who = f" from {ctx.caller[:8]}..." if ctx.caller else ""
        trace = f" trace={ctx.trace_id}" if ctx.trace_id else ""
        self.logger.log(self.level, "%s %s.%s #%d%s%s%s: %s", ctx.kind, ctx.service, ctx.method,
                        ctx.request_id, who, trace, took, outcome)


class RequireCaller(zrpc.Middleware):
    """Lets a call through only when its caller's CURVE key may call that method.

    `admin_only` maps a method name (or "service.method") to the only keys that may call it;
    `keys`, when given, are those that may call the other methods (else anyone may). A call
    refused here fails with PermissionError (the client gets a RemoteError of that type), and
    its handler never runs. For a fixed list on one
    method, `@svc.method(allow=[...])` does the same in the worker itself, answering
    Unauthorized; a middleware suits rules that live elsewhere (a file, a directory service).
    """

    def __init__(self, keys: Iterable[str] = (), admin_only: Mapping[str, Iterable[str]] | None = None) -> None:
        self.keys = frozenset(keys)
        self.admin_only = {name: frozenset(k) for name, k in (admin_only or {}).items()}

    def before(self, ctx: zrpc.CallContext) -> None:
        if ctx.kind != "server":
            return  # a client knows no caller key: nothing to check on that side
        limited = self.admin_only.get(f"{ctx.service}.{ctx.method}", self.admin_only.get(ctx.method))
        if limited is None and not self.keys:
            return  # an open method
        if ctx.caller is None:
            raise PermissionError(f"{ctx.service}.{ctx.method} needs a caller key (the broker runs "
                                  "without CURVE keys)")
        if ctx.caller not in (self.keys if limited is None else limited):
            raise PermissionError(f"{ctx.service}.{ctx.method}: caller {ctx.caller} may not call it")


class Spans(zrpc.Middleware):
    """An OpenTelemetry span per call (SERVER on a worker, CLIENT on a client), named
    `service/method` with the rpc.* attributes; errors are recorded on it.

    Raises:
        RuntimeError: OpenTelemetry is not installed (check `available()` first).
    """

    def __init__(self, tracer: Any = None) -> None:
        if otel_trace is None:
            raise RuntimeError("OpenTelemetry is not installed: pip install opentelemetry-api")
        self.tracer = tracer or otel_trace.get_tracer("zrpc")

    @staticmethod
    def available() -> bool:
        return otel_trace is not None

    def before(self, ctx: zrpc.CallContext) -> None:
        kind = SpanKind.SERVER if ctx.kind == "server" else SpanKind.CLIENT
        attributes = {"rpc.system": "zrpc", "rpc.service": ctx.service, "rpc.method": ctx.method,
                      "zrpc.request_id": ctx.request_id, "zrpc.attempt": ctx.attempt}
        if ctx.trace_id:
            attributes["zrpc.trace_id"] = ctx.trace_id
        if ctx.caller:
            attributes["zrpc.caller"] = ctx.caller
        ctx.state[_SPAN] = self.tracer.start_span(f"{ctx.service}/{ctx.method}", kind=kind,
                                                  attributes=attributes)

    def after(self, ctx: zrpc.CallContext, result: Any) -> None:
        span = ctx.state.pop(_SPAN, None)
        if span is not None:
            span.set_status(Status(StatusCode.OK))
            span.end()

    def on_error(self, ctx: zrpc.CallContext, exc: BaseException) -> None:
        span = ctx.state.pop(_SPAN, None)
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()


def default() -> list[zrpc.Middleware]:
    """Spans (when OpenTelemetry is installed) around a log line per call."""
    return [*([Spans()] if Spans.available() else []), Logging()]


if __name__ == "__main__":
    from zrpc.examples.calc import calc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    zrpc.Worker([calc], middleware=default()).run()
