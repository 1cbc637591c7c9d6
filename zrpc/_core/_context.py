"""The call a handler serves (`current_call()`) and the middleware that sees each call; sans-IO.

The worker's loop sets the context (a ContextVar) around every handler run: in a pool thread,
on the async loop (each task has a context of its own) and inline, and resets it after. A
client used inside a handler reads it: its calls inherit the outer call's remaining deadline
and trace id (`inherit`), so a nested call never outlives the one it serves.

Middleware rules (the same on a worker and on a client):

1. `before(ctx)` hooks run in the order the middleware were given; `after(ctx, result)` and
   `on_error(ctx, exc)` in the reverse order (the first given wraps all the others).
2. A `before` that raises fails the call with its exception: the handler is not run (on a
   client: nothing is sent); the middleware whose `before` already ran hear `on_error` with it.
3. An `after` or `on_error` that raises is logged and counted (`Chain.errors`); the others
   still run, and the reply stands.
4. A hook may be a coroutine function where calls are async (async handlers, AsyncClient),
   and is awaited there; where calls are sync (sync and inline handlers, Client) one is
   refused when the middleware is given (`Chain.check_sync`), never found out mid-call.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from zrpc._core._clock import Clock, monotonic
from zrpc._errors import Timeout

HOOKS = ("before", "after", "on_error")

_Lazy = tuple[Callable[[Clock], "CallContext"], Clock]
"""A call's context not made yet: the handler may never ask for it (the common case)."""

_CURRENT: ContextVar[CallContext | _Lazy | None] = ContextVar("zrpc_current_call", default=None)


@dataclass(frozen=True, slots=True)
class CallContext:
    """One call as a handler (`kind="server"`) or a client's middleware (`kind="client"`) sees it.

    Attributes:
        service, method: what is called.
        request_id: the client's id for the call (the same on every attempt).
        attempt: 0 for the first run, more when a broker retried it on another worker.
        trace_id: the caller's trace id, if it gave one (nested calls pass it on).
        deadline: when the caller stops waiting, in monotonic seconds on `clock` (None: unknown).
        caller: the caller's CURVE public key (Z85, 40 characters) when the broker runs with
            keys, else None; always None on a client.
        kind: "server" in a handler and in a worker's middleware, "client" in a client's.
        state: free for middleware: what a `before` leaves for its `after`.
    """

    service: str
    method: str
    request_id: int
    attempt: int = 0
    trace_id: str | None = None
    deadline: float | None = None
    caller: str | None = None
    kind: Literal["server", "client"] = "server"
    clock: Clock = field(default=monotonic, repr=False, compare=False)
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def remaining(self) -> float:
        """Seconds until the deadline (negative once it passed; infinite when unknown)."""
        if self.deadline is None:
            return math.inf
        return self.deadline - self.clock()


def current_call() -> CallContext | None:
    """The call the running handler serves, or None outside a handler.

    Example:
        @svc.method
        def whoami() -> dict:
            call = zrpc.current_call()
            return {"caller": call.caller, "left": call.remaining()}
    """
    v = _CURRENT.get()
    if isinstance(v, tuple):  # made on first use, then kept for this handler run
        made = v[0](v[1])
        _CURRENT.set(made)  # left()'s reset still restores what was there before entered()
        return made
    return v


def entered(ctx: CallContext | Callable[[Clock], CallContext], clock: Clock = monotonic) -> Any:
    """Makes `ctx` the current call (or, given a function, the one it makes from `clock` once
    asked for: a handler that never asks pays nothing); give the token back to `left()`."""
    return _CURRENT.set(ctx if isinstance(ctx, CallContext) else (ctx, clock))


def left(token: Any) -> None:
    _CURRENT.reset(token)


def inherit(default_timeout: float, timeout: float | None, trace_id: str | None,
            outer: CallContext | None) -> tuple[float | None, str | None]:
    """The timeout and trace id of a call made now, inside `outer` (None: as given).

    Inside a call, a call's timeout (the client's default, or the one given) is capped by what
    is left of the outer call's, and the outer trace id is used when none is given.

    Raises:
        Timeout: the outer call's deadline has passed: the call is not worth sending.
    """
    if outer is None:
        return timeout, trace_id
    left_s = outer.remaining()
    if not left_s > 0:
        raise Timeout(f"the call this one serves ({outer.service}.{outer.method}) is past its deadline")
    t = default_timeout if timeout is None else timeout
    return (left_s if t > left_s else t), (outer.trace_id if trace_id is None else trace_id)


class Middleware:
    """A base for middleware: override the hooks you need; the others do nothing.

    Any object with one or more of `before`, `after` and `on_error` will do; this class only
    spares writing the others. Each hook may be `async def` for async handlers and AsyncClient.

    Example:
        class Log(zrpc.Middleware):
            def before(self, ctx):
                ctx.state["t0"] = time.monotonic()

            def after(self, ctx, result):
                log.info("%s.%s took %.3fs", ctx.service, ctx.method,
                         time.monotonic() - ctx.state["t0"])
    """

    def before(self, ctx: CallContext) -> Any:
        """Before the call (a raise fails it, and the handler does not run)."""

    def after(self, ctx: CallContext, result: Any) -> Any:
        """After a call that returned `result`."""

    def on_error(self, ctx: CallContext, exc: BaseException) -> Any:
        """After a call that failed with `exc`."""


Hook = Callable[..., Any]

_REPORT_FIRST = 10
"""Failures of one hook logged one by one; after that every 1000th only."""


class Chain:
    """A worker's or a client's middleware, in order; runs their hooks around each call.

    Thread-safe: hooks of different calls may run at once in different threads."""

    __slots__ = ("items", "_before", "_after", "_on_error", "has_async", "errors", "_failures",
                 "_lock", "_log")

    def __init__(self, middleware: Iterable[object] | None, log: logging.Logger) -> None:
        items = [] if middleware is None else list(middleware)
        for m in items:
            hooks = [getattr(m, name, None) for name in HOOKS]
            if all(h is None for h in hooks) or any(h is not None and not callable(h) for h in hooks):
                raise TypeError(f"middleware {m!r} needs one or more of the methods before(ctx), "
                                "after(ctx, result) and on_error(ctx, exc)")
        self.items: tuple[object, ...] = tuple(items)
        self._before = self._hooks("before")
        self._after = self._hooks("after")[::-1]  # rule 1
        self._on_error = self._hooks("on_error")[::-1]
        self.has_async = any(inspect.iscoroutinefunction(h)
                             for _, h in (*self._before, *self._after, *self._on_error))
        self.errors = 0
        self._failures: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()
        self._log = log

    def _hooks(self, name: str) -> list[tuple[int, Hook]]:
        """(position, hook) of the middleware that have this hook and mean it (not the base's no-op)."""
        out = []
        for i, m in enumerate(self.items):
            hook = getattr(m, name, None)
            if hook is not None and getattr(hook, "__func__", None) is not getattr(Middleware, name):
                out.append((i, hook))
        return out

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def check_sync(self, where: str) -> None:
        """Rule 4: refuses async hooks for calls that run sync."""
        if self.has_async:
            raise ValueError(f"async middleware hooks cannot run around {where}: write them as "
                             "plain functions (they run on async calls too)")

    # --- sync calls ------------------------------------------------------------------------

    def before(self, ctx: CallContext) -> None:
        """Rule 2: raises what a `before` raised, after the earlier ones heard `on_error`."""
        for i, hook in self._before:
            try:
                hook(ctx)
            except BaseException as exc:
                self.on_error(ctx, exc, below=i)
                raise

    def after(self, ctx: CallContext, result: Any) -> None:
        for i, hook in self._after:
            try:
                hook(ctx, result)
            except Exception as exc:  # noqa: BLE001 - rule 3: the reply stands
                self._failed(i, "after", exc)

    def on_error(self, ctx: CallContext, exc: BaseException, below: int | None = None) -> None:
        """Rule 2: `below` the position whose `before` failed (only those before it ran)."""
        for i, hook in self._on_error:
            if below is not None and i >= below:
                continue
            try:
                hook(ctx, exc)
            except Exception as error:  # noqa: BLE001 - rule 3: the reply stands
                self._failed(i, "on_error", error)

    # --- async calls -----------------------------------------------------------------------

    async def abefore(self, ctx: CallContext) -> None:
        for i, hook in self._before:
            try:
                await _maybe(hook(ctx))
            except BaseException as exc:
                await self.aon_error(ctx, exc, below=i)
                raise

    async def aafter(self, ctx: CallContext, result: Any) -> None:
        for i, hook in self._after:
            try:
                await _maybe(hook(ctx, result))
            except Exception as exc:  # noqa: BLE001 - rule 3
                self._failed(i, "after", exc)

    async def aon_error(self, ctx: CallContext, exc: BaseException, below: int | None = None) -> None:
        for i, hook in self._on_error:
            if below is not None and i >= below:
                continue
            try:
                await _maybe(hook(ctx, exc))
            except Exception as error:  # noqa: BLE001 - rule 3
                self._failed(i, "on_error", error)

    # --- failures --------------------------------------------------------------------------

    def _failed(self, index: int, hook: str, exc: BaseException) -> None:
        """Rule 3: counted; logged with its traceback the first time, briefly up to 10 times,
        then every 1000th (a broken middleware must not flood the log)."""
        with self._lock:
            self.errors += 1
            n = self._failures[(index, hook)] = self._failures.get((index, hook), 0) + 1
        if n > _REPORT_FIRST and n % 1000:
            return
        name = type(self.items[index]).__name__
        try:
            text = f"{type(exc).__name__}: {exc}"
        except Exception:  # noqa: BLE001 - an exception whose __str__ raises
            text = type(exc).__name__
        self._log.warning("middleware %s failed in %s() (#%d; the reply stands): %s", name, hook, n,
                          text[:500], exc_info=exc if n == 1 else None)


async def _maybe(value: Any) -> Any:
    """Awaits what an async hook returned; a sync hook's value is taken as it is."""
    if inspect.isawaitable(value):
        return await value
    return value
