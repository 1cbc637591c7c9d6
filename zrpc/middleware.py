"""Built-in middleware for workers and clients (`Timing`), and the base class to write one.

    timing = zrpc.middleware.Timing()
    zrpc.Worker([calc], middleware=[timing]).run()     # or Client(middleware=[timing])
    timing.snapshot()   # {"calc.add": {"calls": 3, "errors": 0, "seconds": 0.0012, "max": 0.0005}}

See examples/middleware.py for logging, an authorization check by caller key and
OpenTelemetry spans.
"""

from __future__ import annotations

import threading
from typing import Any

from zrpc._core._clock import Clock, monotonic
from zrpc._core._context import CallContext, Middleware

__all__ = ["Middleware", "Timing"]

_STARTED = "zrpc.timing.started"


class Timing(Middleware):
    """Counts calls, failures and their time, per `service.method`.

    On a worker it times handlers (with the middleware given after it); on a client, whole
    calls as the caller waits for them. Thread-safe: one instance may serve several workers
    or clients.

    Args:
        clock: monotonic seconds (tests give a fake one).
    """

    def __init__(self, clock: Clock = monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._stats: dict[str, list[float]] = {}  # name -> [calls, errors, seconds, max]

    def before(self, ctx: CallContext) -> None:
        ctx.state[_STARTED] = self._clock()

    def after(self, ctx: CallContext, result: Any) -> None:
        self._record(ctx, failed=False)

    def on_error(self, ctx: CallContext, exc: BaseException) -> None:
        self._record(ctx, failed=True)

    def _record(self, ctx: CallContext, failed: bool) -> None:
        started = ctx.state.get(_STARTED)
        took = 0.0 if started is None else max(0.0, self._clock() - started)
        name = f"{ctx.service}.{ctx.method}"
        with self._lock:
            s = self._stats.get(name)
            if s is None:
                s = self._stats[name] = [0, 0, 0.0, 0.0]
            s[0] += 1
            s[1] += failed
            s[2] += took
            s[3] = max(s[3], took)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per `service.method`: calls, errors, seconds (their sum) and max (the longest)."""
        with self._lock:
            return {name: {"calls": int(s[0]), "errors": int(s[1]), "seconds": s[2], "max": s[3]}
                    for name, s in sorted(self._stats.items())}

    def __repr__(self) -> str:
        with self._lock:
            calls = sum(int(s[0]) for s in self._stats.values())
        return f"<Timing methods={len(self._stats)} calls={calls}>"
