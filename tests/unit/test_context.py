"""The call context, nested deadlines and the middleware chain on a fake clock
(zrpc/_core/_context.py; its rules 1-4), and the built-in Timing middleware."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
from typing import Any

import pytest

import zrpc
from zrpc._core._clock import Clock
from zrpc._core._context import CallContext, Chain, entered, inherit, left
from zrpc._core._frames import WorkerRequest, encode
from zrpc._core._serial import pack_call
from zrpc._core._worker import RunHandler, WorkerCore
from zrpc.middleware import Timing
from zrpc.testing import FakeClock

log = logging.getLogger("test.context")


def a_call(clock: FakeClock, left_s: float | None = 2.0, trace: str | None = "t-1") -> CallContext:
    return CallContext("svc", "m", 7, 1, trace, None if left_s is None else clock() + left_s,
                       None, "server", clock)


# --- the context ---------------------------------------------------------------------------


def test_remaining_counts_down_on_the_context_s_clock() -> None:
    clock = FakeClock()
    ctx = a_call(clock, 2.0)
    assert ctx.remaining() == 2.0
    clock.advance(2.5)
    assert ctx.remaining() == -0.5
    assert a_call(clock, None).remaining() == math.inf  # no deadline known


def test_the_context_is_frozen_but_its_state_is_for_middleware() -> None:
    ctx = a_call(FakeClock())
    with pytest.raises(AttributeError):
        ctx.caller = "x"  # type: ignore[misc]  # the point: it cannot be set
    ctx.state["k"] = 1
    assert ctx == a_call(FakeClock())  # state (and the clock) take no part in equality


def test_current_call_is_none_outside_and_set_inside_then_reset() -> None:
    ctx = a_call(FakeClock())
    assert zrpc.current_call() is None
    token = entered(ctx)
    assert zrpc.current_call() is ctx
    left(token)
    assert zrpc.current_call() is None


def test_a_context_given_as_a_function_is_made_once_when_first_asked_for() -> None:
    clock = FakeClock()
    made: list[Clock] = []

    def make(c: Clock) -> CallContext:
        made.append(c)
        return a_call(c)

    token = entered(make, clock)
    assert made == []  # a handler that never asks costs no context
    first = zrpc.current_call()
    assert zrpc.current_call() is first and made == [clock]
    left(token)
    assert zrpc.current_call() is None


def test_each_thread_and_each_task_sees_only_its_own_call() -> None:
    clock = FakeClock()
    seen: dict[str, Any] = {}

    def handler(name: str) -> None:
        token = entered(CallContext("svc", name, 1, clock=clock))
        seen[name] = zrpc.current_call().method  # type: ignore[union-attr]
        left(token)

    threads = [threading.Thread(target=handler, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {f"t{i}": f"t{i}" for i in range(4)} and zrpc.current_call() is None

    async def task(name: str, gate: asyncio.Event) -> str:
        token = entered(CallContext("svc", name, 1, clock=clock))
        await gate.wait()  # both are inside their calls at once
        method = zrpc.current_call().method  # type: ignore[union-attr]
        left(token)
        return method

    async def both() -> list[str]:
        gate = asyncio.Event()
        tasks = [asyncio.create_task(task(n, gate)) for n in ("a", "b")]
        await asyncio.sleep(0)  # noqa: sleep (lets both tasks enter; not a wait for time)
        gate.set()
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(both()) == ["a", "b"]


def test_a_run_handler_s_context_comes_from_the_request_headers() -> None:
    clock = FakeClock()
    svc = zrpc.Service("svc")
    svc.method(lambda: 1, name="m")
    core = WorkerCore(clock, {"svc": svc}, ["tcp://b0"], rng=random.Random(1))
    core.start()
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    headers = {"budget_ms": 1500, "attempt": 2, "trace_id": "abc", "caller": key}
    (run,) = [a for a in core.frames_received(0, encode(WorkerRequest(b"c", 9, "svc", "m", headers,
                                                                      pack_call((), {}))))
              if isinstance(a, RunHandler)]
    ctx = run.context(clock)
    assert (ctx.service, ctx.method, ctx.request_id, ctx.attempt, ctx.trace_id, ctx.caller, ctx.kind) == (
        "svc", "m", 9, 2, "abc", key, "server")
    assert ctx.remaining() == 1.5
    clock.advance(1.0)
    assert ctx.remaining() == 0.5


def test_headers_of_the_wrong_type_are_left_out_of_the_context() -> None:
    req = WorkerRequest(b"c", 9, "svc", "m", {"attempt": "2", "trace_id": 5, "caller": [1]}, b"")
    svc = zrpc.Service("svc")
    svc.method(lambda: 1, name="m")
    ctx = RunHandler(0, req, svc.get("m"), deadline=None).context(FakeClock())  # type: ignore[arg-type]
    assert (ctx.attempt, ctx.trace_id, ctx.caller, ctx.deadline) == (0, None, None, None)


# --- nested calls ----------------------------------------------------------------------------


def test_without_an_outer_call_the_timeout_and_trace_are_as_given() -> None:
    assert inherit(10.0, None, None, None) == (None, None)
    assert inherit(10.0, 3.0, "x", None) == (3.0, "x")


def test_a_nested_call_never_outlives_the_outer_one() -> None:
    clock = FakeClock()
    outer = a_call(clock, 2.0)
    assert inherit(10.0, None, None, outer) == (2.0, "t-1")  # the default, capped
    assert inherit(10.0, 5.0, None, outer) == (2.0, "t-1")  # an explicit one too
    assert inherit(10.0, 0.5, "mine", outer) == (0.5, "mine")  # shorter ones and own traces stay
    clock.advance(1.5)
    assert inherit(10.0, None, None, outer) == (0.5, "t-1")


@pytest.mark.parametrize("past", [2.0, 3.0])
def test_a_nested_call_past_the_outer_deadline_fails_at_once(past: float) -> None:
    clock = FakeClock()
    outer = a_call(clock, 2.0)
    clock.advance(past)
    with pytest.raises(zrpc.Timeout, match=r"svc\.m\) is past its deadline"):
        inherit(10.0, None, None, outer)


def test_an_outer_call_without_deadline_or_trace_changes_nothing() -> None:
    outer = a_call(FakeClock(), None, None)
    assert inherit(10.0, None, None, outer) == (10.0, None)


# --- the middleware chain ---------------------------------------------------------------------


class Recorder(zrpc.Middleware):
    def __init__(self, name: str, events: list[str], fail: str = "") -> None:
        self.name, self.events, self.fail = name, events, fail

    def _hook(self, what: str) -> None:
        self.events.append(f"{self.name}.{what}")
        if self.fail == what:
            raise RuntimeError(f"{self.name} fails in {what}")

    def before(self, ctx: CallContext) -> None:
        self._hook("before")

    def after(self, ctx: CallContext, result: Any) -> None:
        self._hook("after")

    def on_error(self, ctx: CallContext, exc: BaseException) -> None:
        self._hook("on_error")


def test_befores_run_in_order_afters_and_errors_in_reverse() -> None:
    """Rule 1: the first middleware given wraps all the others."""
    events: list[str] = []
    chain = Chain([Recorder("a", events), Recorder("b", events)], log)
    ctx = a_call(FakeClock())
    chain.before(ctx)
    chain.after(ctx, 3)
    chain.on_error(ctx, ValueError())
    assert events == ["a.before", "b.before", "b.after", "a.after", "b.on_error", "a.on_error"]


def test_a_failing_before_fails_the_call_and_only_the_earlier_ones_hear_of_it() -> None:
    """Rule 2."""
    events: list[str] = []
    chain = Chain([Recorder("a", events), Recorder("b", events, fail="before"), Recorder("c", events)], log)
    with pytest.raises(RuntimeError, match="b fails in before"):
        chain.before(a_call(FakeClock()))
    assert events == ["a.before", "b.before", "a.on_error"]
    assert chain.errors == 0  # the call's failure, not a hook's


def test_a_failing_after_is_counted_and_logged_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    """Rule 3."""
    events: list[str] = []
    chain = Chain([Recorder("a", events), Recorder("b", events, fail="after"),
                   Recorder("c", events, fail="on_error")], log)
    ctx = a_call(FakeClock())
    with caplog.at_level(logging.WARNING, logger="test.context"):
        chain.after(ctx, 1)
        chain.on_error(ctx, ValueError())
    assert events == ["c.after", "b.after", "a.after", "c.on_error", "b.on_error", "a.on_error"]
    assert chain.errors == 2
    assert [r.getMessage() for r in caplog.records] == [
        "middleware Recorder failed in after() (#1; the reply stands): RuntimeError: b fails in after",
        "middleware Recorder failed in on_error() (#1; the reply stands): RuntimeError: c fails in on_error"]
    assert all(r.exc_info for r in caplog.records)  # the first failure shows its traceback


def test_a_hook_failing_again_and_again_does_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    chain = Chain([Recorder("a", [], fail="after")], log)
    with caplog.at_level(logging.WARNING, logger="test.context"):
        for _ in range(2000):
            chain.after(a_call(FakeClock()), 1)
    assert chain.errors == 2000
    assert len(caplog.records) == 10 + 2  # the first ten, then the 1000th and the 2000th
    assert sum(1 for r in caplog.records if r.exc_info) == 1


def test_any_object_with_a_hook_will_do_and_one_without_is_refused() -> None:
    seen: list[Any] = []

    class OnlyAfter:
        def after(self, ctx: CallContext, result: Any) -> None:
            seen.append(result)

    chain = Chain([OnlyAfter()], log)
    ctx = a_call(FakeClock())
    chain.before(ctx)
    chain.on_error(ctx, ValueError())
    chain.after(ctx, 42)
    assert seen == [42]
    with pytest.raises(TypeError, match="needs one or more of the methods"):
        Chain([object()], log)
    with pytest.raises(TypeError, match="needs one or more"):
        Chain([type("Odd", (), {"before": 3})()], log)
    assert not Chain(None, log) and len(Chain([OnlyAfter(), zrpc.Middleware()], log)) == 2


def test_async_hooks_are_awaited_on_async_calls_and_refused_on_sync_ones() -> None:
    """Rule 4."""
    events: list[str] = []

    class Async(zrpc.Middleware):
        async def before(self, ctx: CallContext) -> None:
            await asyncio.sleep(0)  # noqa: sleep (a real suspension point)
            events.append("async.before")

        async def after(self, ctx: CallContext, result: Any) -> None:
            events.append(f"async.after {result}")

        async def on_error(self, ctx: CallContext, exc: BaseException) -> None:
            events.append(f"async.on_error {type(exc).__name__}")

    chain = Chain([Recorder("sync", events), Async()], log)
    assert chain.has_async
    with pytest.raises(ValueError, match="async middleware hooks cannot run around sync handlers"):
        chain.check_sync("sync handlers")
    Chain([Recorder("sync", [])], log).check_sync("sync handlers")  # plain hooks run anywhere

    async def run() -> None:
        ctx = a_call(FakeClock())
        await chain.abefore(ctx)
        await chain.aafter(ctx, 5)
        await chain.aon_error(ctx, KeyError())

    asyncio.run(run())
    assert events == ["sync.before", "async.before", "async.after 5", "sync.after",
                      "async.on_error KeyError", "sync.on_error"]


def test_async_rules_2_and_3_hold_as_for_sync_calls() -> None:
    events: list[str] = []
    chain = Chain([Recorder("a", events), Recorder("b", events, fail="before")], log)
    failing_after = Chain([Recorder("a", events), Recorder("b", events, fail="after")], log)

    async def run() -> None:
        with pytest.raises(RuntimeError):
            await chain.abefore(a_call(FakeClock()))
        await failing_after.aafter(a_call(FakeClock()), 1)

    asyncio.run(run())
    assert events == ["a.before", "b.before", "a.on_error", "b.after", "a.after"]
    assert (chain.errors, failing_after.errors) == (0, 1)


# --- Timing ------------------------------------------------------------------------------------


def test_timing_counts_calls_errors_and_their_time_per_method() -> None:
    clock = FakeClock()
    timing = Timing(clock)
    for took, failed in ((0.25, False), (0.5, True), (0.125, False)):
        ctx = CallContext("calc", "add", 1, clock=clock)
        timing.before(ctx)
        clock.advance(took)
        if failed:
            timing.on_error(ctx, ValueError())
        else:
            timing.after(ctx, 3)
    timing.on_error(CallContext("calc", "div", 2, clock=clock), ZeroDivisionError())  # no before
    assert timing.snapshot() == {
        "calc.add": {"calls": 3, "errors": 1, "seconds": 0.875, "max": 0.5},
        "calc.div": {"calls": 1, "errors": 1, "seconds": 0.0, "max": 0.0}}
    assert repr(timing) == "<Timing methods=2 calls=4>"


# --- the examples (examples/middleware.py) -----------------------------------------------------


def test_the_logging_example_writes_one_line_per_call(caplog: pytest.LogCaptureFixture) -> None:
    from zrpc.examples.middleware import Logging

    clock = FakeClock()
    mw = Logging(log)
    ok = CallContext("calc", "add", 5, trace_id="t1", caller="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
                     clock=clock)
    with caplog.at_level(logging.INFO, logger="test.context"):
        mw.before(ok)
        clock.advance(0.0125)
        mw.after(ok, 3)
        mw.on_error(CallContext("calc", "div", 6, kind="client", clock=clock), ZeroDivisionError("by zero"))
    assert [r.getMessage() for r in caplog.records] == [
        "server calc.add #5 from rq:rM>}U... trace=t1 in 12.5 ms: ok",
        "client calc.div #6: failed: ZeroDivisionError: by zero"]


def test_the_auth_example_checks_the_caller_key_before_the_handler() -> None:
    from zrpc.examples.middleware import RequireCaller

    admin, user = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"
    events: list[str] = []
    chain = Chain([Recorder("log", events), RequireCaller(admin_only={"calc.reset": [admin]})], log)

    def call(method: str, caller: str | None, kind: Any = "server") -> str:
        try:
            chain.before(CallContext("calc", method, 1, caller=caller, kind=kind))
        except PermissionError as exc:
            return str(exc)
        return "runs"

    assert call("reset", admin) == "runs"
    assert call("reset", user) == f"calc.reset: caller {user} may not call it"
    assert call("reset", None) == "calc.reset needs a caller key (the broker runs without CURVE keys)"
    assert call("add", None) == call("add", user) == "runs"  # not limited, and no `keys`: open
    assert call("reset", None, "client") == "runs"  # a client has no caller to check
    assert events.count("log.on_error") == 2  # the middleware before it heard each refusal
    strict = RequireCaller(keys=[user])
    with pytest.raises(PermissionError):
        strict.before(CallContext("calc", "add", 1, caller=admin))
    strict.before(CallContext("calc", "add", 1, caller=user))


def test_the_spans_example_needs_opentelemetry() -> None:
    from zrpc.examples.middleware import Spans, default

    if Spans.available():
        pytest.skip("OpenTelemetry is installed here")
    with pytest.raises(RuntimeError, match="OpenTelemetry is not installed"):
        Spans()
    assert [type(m).__name__ for m in default()] == ["Logging"]


def test_the_spans_example_opens_and_ends_a_span_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a stand-in for the OpenTelemetry API (start_span, set_status, record_exception, end)."""
    import enum
    import importlib
    import sys
    import types

    spans: list[dict[str, Any]] = []

    class Span:
        def __init__(self, name: str, kind: Any, attributes: dict[str, Any]) -> None:
            self.d: dict[str, Any] = {"name": name, "kind": kind.name, "attributes": attributes}
            spans.append(self.d)

        def set_status(self, status: Any) -> None:
            self.d["status"] = status.code.name

        def record_exception(self, exc: BaseException) -> None:
            self.d["exception"] = type(exc).__name__

        def end(self) -> None:
            self.d["ended"] = True

    class Tracer:
        def start_span(self, name: str, kind: Any = None, attributes: Any = None) -> Span:
            return Span(name, kind, attributes)

    trace = types.ModuleType("opentelemetry.trace")
    trace.SpanKind = enum.Enum("SpanKind", "SERVER CLIENT")  # type: ignore[attr-defined]
    trace.StatusCode = enum.Enum("StatusCode", "OK ERROR")  # type: ignore[attr-defined]
    trace.Status = lambda code, description=None: types.SimpleNamespace(code=code)  # type: ignore[attr-defined]
    trace.get_tracer = lambda name: Tracer()  # type: ignore[attr-defined]
    otel = types.ModuleType("opentelemetry")
    otel.trace = trace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry", otel)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", trace)
    import zrpc.examples.middleware as example

    try:
        example = importlib.reload(example)
        chain = Chain(example.default(), log)
        ok = CallContext("calc", "add", 1, trace_id="t", kind="client")
        chain.before(ok)
        chain.after(ok, 3)
        bad = CallContext("calc", "div", 2, caller="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7")
        chain.before(bad)
        chain.on_error(bad, ZeroDivisionError())
    finally:
        monkeypatch.undo()
        importlib.reload(example)
    assert [(s["name"], s["kind"], s["status"], s.get("exception"), s["ended"]) for s in spans] == [
        ("calc/add", "CLIENT", "OK", None, True), ("calc/div", "SERVER", "ERROR", "ZeroDivisionError", True)]
    assert spans[0]["attributes"] == {"rpc.system": "zrpc", "rpc.service": "calc", "rpc.method": "add",
                                      "zrpc.request_id": 1, "zrpc.attempt": 0, "zrpc.trace_id": "t"}
    assert spans[1]["attributes"]["zrpc.caller"].startswith("rq:rM")
    assert chain.errors == 0
