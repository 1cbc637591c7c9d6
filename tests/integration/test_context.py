"""The call context, nested deadlines, per-method allow= and middleware on real processes.

This module is also what the worker processes serve (`zrpc worker
tests.integration.test_context:ctx`), and, run as `python -m tests.integration.test_context
BROKER`, a worker with middleware. Handlers that call out use a client made on first use,
which finds the broker in $ZRPC_BROKERS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
from typing import Any

import pytest

import zrpc
from zrpc._tools._procs import TRACEBACK
from zrpc.testing import wait_until

# --- what the worker processes serve ------------------------------------------------------------

ctx = zrpc.Service("ctx")
inner = zrpc.Service("inner")
_clients: dict[str, Any] = {}
_lock = threading.Lock()
LAST: dict[str, Any] = {}  # what the latest nested call found, for ctx.last()


def _fields() -> dict[str, Any] | None:
    call = zrpc.current_call()
    if call is None:
        return None
    return {"service": call.service, "method": call.method, "request_id": call.request_id,
            "attempt": call.attempt, "trace_id": call.trace_id, "caller": call.caller,
            "kind": call.kind, "remaining": call.remaining(), "thread": threading.current_thread().name}


def _client() -> zrpc.Client:
    with _lock:
        if "sync" not in _clients:
            _clients["sync"] = zrpc.Client()  # default timeout: 10 s
        return _clients["sync"]


@ctx.method
def whoami() -> dict[str, Any] | None:
    return _fields()


@ctx.method
async def awhoami() -> dict[str, Any] | None:
    await asyncio.sleep(0)  # noqa: sleep (a real suspension point, other tasks run meanwhile)
    return _fields()


@ctx.method(inline=True)
def iwhoami() -> dict[str, Any] | None:
    return _fields()


@ctx.method
def elsewhere() -> Any:
    """A thread the handler starts is outside the call."""
    seen: list[Any] = []
    t = threading.Thread(target=lambda: seen.append(zrpc.current_call()))
    t.start()
    t.join()
    return seen[0]


@ctx.method
def nested(seconds: float) -> Any:
    """inner.slow(seconds) from inside this call; what became of it goes to LAST."""
    LAST.clear()
    started = time.monotonic()
    try:
        return _client().proxy("inner").slow(seconds)
    except zrpc.ZrpcError as exc:
        LAST["error"] = type(exc).__name__
        raise
    finally:
        LAST["waited"] = time.monotonic() - started


@ctx.method
async def anested(seconds: float) -> Any:
    """The same through an AsyncClient, from an async handler."""
    LAST.clear()
    started = time.monotonic()
    if "async" not in _clients:
        _clients["async"] = zrpc.AsyncClient()
    try:
        return await _clients["async"].proxy("inner").slow(seconds)
    except zrpc.ZrpcError as exc:
        LAST["error"] = type(exc).__name__
        raise
    finally:
        LAST["waited"] = time.monotonic() - started


@ctx.method
def nested_whoami() -> dict[str, Any]:
    """The outer call's fields, and those the inner call (to ctx.whoami) saw."""
    return {"outer": _fields(), "inner": _client().proxy("ctx").whoami()}


@ctx.method
def last() -> dict[str, Any]:
    return dict(LAST)


@inner.method
def slow(seconds: float) -> dict[str, Any] | None:
    LAST["inner"] = _fields()
    threading.Event().wait(seconds)  # noqa: sleep (a slow service, the time is the point)
    return _fields()


def _allowed_key() -> str:
    """The key ctx_guarded allows: $ZRPC_TEST_ALLOW names a `.key` file (a fixed key otherwise)."""
    path = os.environ.get("ZRPC_TEST_ALLOW")
    if not path:
        return "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    import zmq.auth

    return zmq.auth.load_certificate(path)[0].decode()


guarded = zrpc.Service("guarded")


@guarded.method(allow=[_allowed_key()])
def secret() -> dict[str, Any] | None:
    return _fields()


@guarded.method
def open_door() -> dict[str, Any] | None:
    return _fields()


# --- a worker with middleware (`python -m tests.integration.test_context BROKER`) ---------------

mw = zrpc.Service("mw")
EVENTS: list[str] = []


class Recorder(zrpc.Middleware):
    """Writes down each hook it hears, with the call's method and the context it ran in."""

    def __init__(self, name: str) -> None:
        self.name = name

    def before(self, ctx: zrpc.CallContext) -> None:
        if ctx.method != "events":
            assert zrpc.current_call() is ctx or ctx.kind == "client"
            EVENTS.append(f"{self.name}.before {ctx.method}")

    def after(self, ctx: zrpc.CallContext, result: Any) -> None:
        if ctx.method != "events":
            EVENTS.append(f"{self.name}.after {ctx.method}")
        if self.name == "b" and ctx.method == "bad_after":
            raise RuntimeError("after() is broken")

    def on_error(self, ctx: zrpc.CallContext, exc: BaseException) -> None:
        EVENTS.append(f"{self.name}.on_error {ctx.method} {type(exc).__name__}")


class Gate(zrpc.Middleware):
    """Refuses the method `refused` before it runs."""

    def before(self, ctx: zrpc.CallContext) -> None:
        if ctx.method == "refused":
            raise PermissionError("the gate says no")


TIMING = zrpc.middleware.Timing()
WORKER: list[zrpc.Worker] = []


@mw.method
def add(a: int, b: int) -> int:
    EVENTS.append("handler add")
    return a + b


@mw.method
async def aadd(a: int, b: int) -> int:
    EVENTS.append("handler aadd")
    return a + b


@mw.method(inline=True)
def iadd(a: int, b: int) -> int:
    EVENTS.append("handler iadd")
    return a + b


@mw.method
def fails() -> None:
    EVENTS.append("handler fails")
    raise KeyError("nope")


@mw.method
def refused() -> None:
    EVENTS.append("handler refused")  # never: the gate stops it


@mw.method
def bad_after() -> str:
    return "it stands"


@mw.method
def events() -> dict[str, Any]:
    """The hooks heard so far (then forgotten), the worker's counters and the timings."""
    out = list(EVENTS)
    EVENTS.clear()
    return {"events": out, "counters": WORKER[0].counters if WORKER else {},
            "timing": TIMING.snapshot()}


MIDDLEWARE = [TIMING, Recorder("a"), Recorder("b"), Gate()]


def main(broker: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    worker = zrpc.Worker([mw], [broker], middleware=MIDDLEWARE)
    WORKER.append(worker)
    worker.run()


# --- the tests ----------------------------------------------------------------------------------

SPEC = "tests.integration.test_context"


@pytest.fixture
def served(cluster):
    """A broker and a worker serving ctx and inner; the worker's handlers reach the broker."""
    ep = cluster.broker()
    cluster.worker(ep, f"{SPEC}:inner", spec=f"{SPEC}:ctx", env={"ZRPC_BROKERS": ep})
    return ep


@pytest.mark.parametrize("method, thread", [("whoami", "zrpc-handler-"), ("awhoami", "zrpc-async"),
                                            ("iwhoami", "MainThread")])
def test_a_handler_sees_its_call_wherever_it_runs(served, client_factory, method, thread):
    c = client_factory([served], timeout=5)
    f = getattr(c.proxy("ctx"), method).with_options(timeout=3.0, trace_id="trace-1")()
    assert (f["service"], f["method"], f["attempt"], f["trace_id"], f["caller"], f["kind"]) == (
        "ctx", method, 0, "trace-1", None, "server")  # no keys: the broker names no caller
    assert isinstance(f["request_id"], int) and 2.0 < f["remaining"] <= 3.0
    assert f["thread"].startswith(thread)
    g = getattr(c.proxy("ctx"), method)()  # each call its own: no trace id given, none seen
    assert g["trace_id"] is None and g["request_id"] != f["request_id"] and 4.0 < g["remaining"] <= 5.0


def test_outside_the_handler_s_own_thread_there_is_no_call(served, client_factory):
    assert client_factory([served], timeout=5).proxy("ctx").elsewhere() is None


@pytest.mark.parametrize("method", ["nested", "anested"])
def test_a_nested_call_ends_at_the_outer_deadline_not_at_the_client_default(served, client_factory, method):
    """The inner service takes 5 s and the handler's client waits 10 s by default, but the outer
    call has 1 s: the inner call is given at most what is left, and ends with it."""
    c = client_factory([served], timeout=5)
    started = time.monotonic()
    with pytest.raises(zrpc.Timeout):
        getattr(c.proxy("ctx"), method).with_options(timeout=1.0)(5.0)
    assert time.monotonic() - started < 2.0
    found = wait_until(lambda: (lambda r: r if "waited" in r else None)(c.proxy("ctx").last()), 5,
                       what="the nested call ended")
    assert found["error"] == "Timeout" and found["waited"] < 1.5  # not the 10 s default
    assert 0 < found["inner"]["remaining"] <= 1.0  # the inner worker was given what was left


def test_a_nested_call_inherits_the_trace_id_and_a_deadline_within_the_outer_one(served, client_factory):
    c = client_factory([served], timeout=5)
    r = c.proxy("ctx").nested_whoami.with_options(timeout=4.0, trace_id="trace-42")()
    assert r["outer"]["trace_id"] == r["inner"]["trace_id"] == "trace-42"
    assert r["inner"]["remaining"] < r["outer"]["remaining"] <= 4.0
    assert r["inner"]["request_id"] != r["outer"]["request_id"]


def test_without_an_outer_call_the_client_default_applies(served, client_factory):
    c = client_factory([served], timeout=2.0)
    assert 1.0 < c.proxy("ctx").whoami()["remaining"] <= 2.0


# --- allow= ------------------------------------------------------------------------------------


def test_allow_refuses_every_caller_when_the_broker_runs_without_keys(cluster, client_factory):
    ep = cluster.broker()
    cluster.worker(ep, spec=f"{SPEC}:guarded")
    c = client_factory([ep], timeout=5)
    with pytest.raises(zrpc.Unauthorized, match=r"guarded\.secret refused this call: the broker "
                                                r"named no caller \(it runs without CURVE keys\)"):
        c.proxy("guarded").secret()
    assert c.proxy("guarded").open_door()["caller"] is None  # a method without allow= takes anyone


@pytest.fixture
def keys(tmp_path):
    from zrpc._io._security import keygen

    k = {name: keygen(tmp_path / name, name) for name in ("broker", "client", "worker", "other")}
    auth = tmp_path / "authorized"
    auth.mkdir()
    for name in ("client", "worker", "other"):
        (auth / f"{name}.key").write_bytes(k[name][0].read_bytes())
    k["authorized"] = auth
    return k


def test_allow_runs_the_allowed_key_and_refuses_another_with_real_keys(cluster, keys, monkeypatch):
    def curve(who: str) -> dict[str, str]:
        return {"curve_server_key": str(keys["broker"][0]), "curve_secret": str(keys[who][1])}

    def status(ep, timeout=0.5):
        try:
            with zrpc.Client([ep], timeout=timeout, **curve("client")) as c:
                return c.call("zrpc", "status")
        except zrpc.ZrpcError:
            return None

    monkeypatch.setattr("tests.conftest.broker_status", status)
    ep = cluster.broker("--curve-secret", str(keys["broker"][1]), "--curve-authorized", str(keys["authorized"]))
    cluster.worker(ep, "--curve-server-key", str(keys["broker"][0]), "--curve-secret", str(keys["worker"][1]),
                   spec=f"{SPEC}:guarded", env={"ZRPC_TEST_ALLOW": str(keys["client"][0])})
    import zmq.auth

    client_key = zmq.auth.load_certificate(str(keys["client"][0]))[0].decode()
    other_key = zmq.auth.load_certificate(str(keys["other"][0]))[0].decode()
    with zrpc.Client([ep], timeout=5, **curve("client")) as c:
        assert c.proxy("guarded").secret()["caller"] == client_key
    with zrpc.Client([ep], timeout=5, **curve("other")) as c:
        with pytest.raises(zrpc.Unauthorized, match=re.escape(f"caller {other_key} is not among the keys it allows")):
            c.proxy("guarded").secret()
        assert c.proxy("guarded").open_door()["caller"] == other_key


# --- middleware on a worker ----------------------------------------------------------------------


@pytest.fixture
def mw_worker(cluster, procs):
    """A broker, and a worker process with MIDDLEWARE (Timing, Recorder a, Recorder b, Gate)."""
    ep = cluster.broker()
    p = procs.spawn([sys.executable, "-m", SPEC, ep], name="mw-worker")
    procs.expect_in_log(p, TRACEBACK, times=1)  # the first failure of b.after shows its traceback
    cluster.wait_workers(ep, 1)
    return ep


def heard(c: zrpc.Client) -> dict[str, Any]:
    return c.proxy("mw").events()


@pytest.mark.parametrize("method", ["add", "aadd", "iadd"])
def test_worker_middleware_wraps_each_handler_in_order(mw_worker, client_factory, method):
    c = client_factory([mw_worker], timeout=5)
    heard(c)
    assert getattr(c.proxy("mw"), method)(1, 2) == 3
    assert heard(c)["events"] == [f"a.before {method}", f"b.before {method}", f"handler {method}",
                                  f"b.after {method}", f"a.after {method}"]


def test_worker_middleware_hears_a_handler_s_error_in_reverse_order(mw_worker, client_factory):
    c = client_factory([mw_worker], timeout=5)
    heard(c)
    with pytest.raises(zrpc.RemoteError, match="KeyError"):
        c.proxy("mw").fails()
    assert heard(c)["events"] == ["a.before fails", "b.before fails", "handler fails",
                                  "b.on_error fails KeyError", "a.on_error fails KeyError"]


def test_a_worker_middleware_s_failing_before_answers_the_call_and_the_handler_never_runs(
        mw_worker, client_factory):
    c = client_factory([mw_worker], timeout=5)
    heard(c)
    with pytest.raises(zrpc.RemoteError) as err:
        c.proxy("mw").refused()
    assert (err.value.remote_type, err.value.message) == ("PermissionError", "the gate says no")
    assert heard(c)["events"] == ["a.before refused", "b.before refused",
                                  "b.on_error refused PermissionError", "a.on_error refused PermissionError"]


def test_a_worker_middleware_s_failing_after_is_counted_and_the_reply_stands(mw_worker, client_factory):
    c = client_factory([mw_worker], timeout=5)
    heard(c)
    assert c.proxy("mw").bad_after() == "it stands"
    assert c.proxy("mw").bad_after() == "it stands"
    h = heard(c)
    assert h["events"] == ["a.before bad_after", "b.before bad_after", "b.after bad_after", "a.after bad_after"] * 2
    assert h["counters"]["middleware_errors"] == 2 and h["counters"]["internal_errors"] == 0
    assert h["timing"]["mw.bad_after"]["calls"] == 2


def test_timing_counts_the_worker_s_calls(mw_worker, client_factory):
    c = client_factory([mw_worker], timeout=5)
    for i in range(3):
        c.proxy("mw").add(i, i)
    with pytest.raises(zrpc.RemoteError):
        c.proxy("mw").fails()
    t = heard(c)["timing"]
    assert (t["mw.add"]["calls"], t["mw.add"]["errors"], t["mw.fails"]["errors"]) == (3, 0, 1)
    assert 0 <= t["mw.add"]["max"] <= t["mw.add"]["seconds"]


def test_async_hooks_are_refused_for_a_worker_with_sync_handlers():
    class Async(zrpc.Middleware):
        async def before(self, ctx: zrpc.CallContext) -> None: ...

    with pytest.raises(ValueError, match="async middleware hooks cannot run around sync handlers"):
        zrpc.Worker([mw], ["tcp://127.0.0.1:1"], middleware=[Async()])
    with pytest.raises(TypeError, match="needs one or more of the methods"):
        zrpc.Worker([mw], ["tcp://127.0.0.1:1"], middleware=[object()])


def test_zrpc_worker_middleware_option_loads_module_obj(cluster, client_factory):
    ep = cluster.broker()
    cluster.worker(ep, "--middleware", f"{SPEC}:TIMING", "--middleware", f"{SPEC}:RECORDER_A", spec=f"{SPEC}:mw")
    c = client_factory([ep], timeout=5)
    heard(c)
    assert c.proxy("mw").add(1, 2) == 3
    h = heard(c)
    assert h["events"] == ["a.before add", "handler add", "a.after add"] and h["timing"]["mw.add"]["calls"] == 1


RECORDER_A = Recorder("a")

# --- middleware on clients -----------------------------------------------------------------------


class ClientRecorder(zrpc.Middleware):
    def __init__(self, name: str, seen: list[str], fail: str = "") -> None:
        self.name, self.seen, self.fail = name, seen, fail

    def before(self, ctx: zrpc.CallContext) -> None:
        assert ctx.kind == "client" and ctx.caller is None and 0 < ctx.remaining() <= 5
        self.seen.append(f"{self.name}.before {ctx.method} {ctx.trace_id}")
        if self.fail == "before":
            raise PermissionError(f"{self.name} refuses")

    def after(self, ctx: zrpc.CallContext, result: Any) -> None:
        self.seen.append(f"{self.name}.after {ctx.method} {result}")
        if self.fail == "after":
            raise RuntimeError("broken after")

    def on_error(self, ctx: zrpc.CallContext, exc: BaseException) -> None:
        self.seen.append(f"{self.name}.on_error {ctx.method} {type(exc).__name__}")


def test_client_middleware_runs_in_order_around_call_and_future(mw_worker, client_factory):
    seen: list[str] = []
    c = client_factory([mw_worker], timeout=5, middleware=[ClientRecorder("a", seen), ClientRecorder("b", seen)])
    assert c.proxy("mw").add.with_options(trace_id="t9")(1, 2) == 3
    assert seen == ["a.before add t9", "b.before add t9", "b.after add 3", "a.after add 3"]
    seen.clear()
    with pytest.raises(zrpc.RemoteError):
        c.proxy("mw").fails()
    assert seen == ["a.before fails None", "b.before fails None", "b.on_error fails RemoteError",
                    "a.on_error fails RemoteError"]
    seen.clear()
    assert c.proxy("mw").add.future(2, 2).result(5) == 4
    wait_until(lambda: len(seen) == 4, 5, what="the future's after hooks")  # on the callback thread
    assert seen == ["a.before add None", "b.before add None", "b.after add 4", "a.after add 4"]


def test_a_client_middleware_s_failing_before_fails_the_call_unsent(mw_worker, client_factory):
    seen: list[str] = []
    plain = client_factory([mw_worker], timeout=5)
    heard(plain)
    c = client_factory([mw_worker], timeout=5,
                       middleware=[ClientRecorder("a", seen), ClientRecorder("b", seen, fail="before")])
    with pytest.raises(PermissionError, match="b refuses"):
        c.proxy("mw").add(1, 2)
    with pytest.raises(PermissionError):
        c.proxy("mw").add.future(1, 2).result(5)
    assert seen == ["a.before add None", "b.before add None", "a.on_error add PermissionError"] * 2
    assert heard(plain)["events"] == []  # nothing reached the worker


def test_a_client_middleware_s_failing_after_is_counted_and_the_result_stands(mw_worker, client_factory):
    seen: list[str] = []
    c = client_factory([mw_worker], timeout=5, middleware=[ClientRecorder("a", seen, fail="after")])
    assert c.proxy("mw").add(1, 2) == 3
    assert c.middleware_errors == 1 and seen == ["a.before add None", "a.after add 3"]


def test_a_client_refuses_async_hooks():
    class Async(zrpc.Middleware):
        async def after(self, ctx: zrpc.CallContext, result: Any) -> None: ...

    with pytest.raises(ValueError, match="async middleware hooks cannot run around a Client's calls"):
        zrpc.Client(["tcp://127.0.0.1:1"], middleware=[Async()])


def test_async_client_awaits_async_hooks_in_order(mw_worker):
    seen: list[str] = []

    class Async(zrpc.Middleware):
        async def before(self, ctx: zrpc.CallContext) -> None:
            await asyncio.sleep(0)  # noqa: sleep (a real suspension point)
            seen.append(f"async.before {ctx.method}")
            if ctx.method == "refused":
                raise PermissionError("not from here")

        async def after(self, ctx: zrpc.CallContext, result: Any) -> None:
            seen.append(f"async.after {ctx.method} {result}")

        async def on_error(self, ctx: zrpc.CallContext, exc: BaseException) -> None:
            seen.append(f"async.on_error {ctx.method} {type(exc).__name__}")

    async def run() -> None:
        async with zrpc.AsyncClient([mw_worker], timeout=5,
                                    middleware=[ClientRecorder("sync", seen), Async()]) as c:
            assert await c.proxy("mw").add(1, 2) == 3
            assert await c.proxy("mw").add.future(2, 3) == 5  # a task: done once the hooks ran
            with pytest.raises(PermissionError):
                await c.proxy("mw").refused()
            with pytest.raises(zrpc.RemoteError):
                await c.proxy("mw").fails()

    asyncio.run(run())
    assert seen == ["sync.before add None", "async.before add", "async.after add 3", "sync.after add 3",
                    "sync.before add None", "async.before add", "async.after add 5", "sync.after add 5",
                    "sync.before refused None", "async.before refused", "sync.on_error refused PermissionError",
                    "sync.before fails None", "async.before fails", "async.on_error fails RemoteError",
                    "sync.on_error fails RemoteError"]


if __name__ == "__main__":
    main(sys.argv[1])

