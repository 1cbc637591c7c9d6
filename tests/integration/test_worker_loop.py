"""The worker's I/O loop against a broker played by the test (a ROUTER socket in this process).

Most tests give the worker a clock that only moves when told: its deadlines (heartbeats,
expiry, reconnects) then never arrive on their own, so whatever the worker does must be
caused by a message or a wake-up. A reply that waits for a poll timeout never comes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

import zrpc
from zrpc._core._frames import (
    WORKER,
    Disconnect,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_call, unpack_error, unpack_result
from zrpc.testing import FakeClock, free_port, wait_until

LONG = 3600.0  # seconds: a heartbeat interval that never comes due in a test
WAIT = 20_000  # ms the test waits for a message that is caused at once (a failure, not a pace)

svc = zrpc.Service("w")
release = threading.Event()


@svc.method
def add(a: int, b: int) -> int:
    return a + b


@svc.method
def surrogate() -> None:
    raise ValueError(os.fsdecode(b"caf\xe9"))


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@svc.method
def unprintable() -> None:
    raise Unprintable()


@svc.method
def bad_result() -> object:
    return {"name": os.fsdecode(b"caf\xe9")}


@svc.method
def unpackable() -> object:
    return object()


@svc.method
def blocked() -> str:
    release.wait(60)
    return "released"


@svc.method(idempotent=False)
def charge(n: int) -> int:
    return n


CLOCKS: list[FakeClock] = []  # the running worker's clock, for handlers that pretend to be slow


@svc.method(inline=True)
def where(seconds: float = 0.0) -> str:
    """The thread it ran on; `seconds` moves the worker's fake clock, as a slow handler would."""
    if seconds:
        CLOCKS[0].advance(seconds)
    return threading.current_thread().name


@svc.method
async def aadd(a: int, b: int) -> int:
    await asyncio.sleep(0)  # noqa: sleep (a real suspension point, as an async handler has)
    return a + b


@svc.method
async def asurrogate() -> None:
    await asyncio.sleep(0)  # noqa: sleep (a real suspension point, as an async handler has)
    raise ValueError(os.fsdecode(b"caf\xe9"))


@svc.method
async def aunprintable() -> None:
    raise Unprintable()


class FakeBroker:
    """A ROUTER the test drives by hand."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        # a worker that reconnects within milliseconds (time is fake here) must not find its
        # routing id still held by the connection it just closed
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.sock.bind(self.endpoint)
        self.worker: bytes | None = None
        self.seen: list[Any] = []  # every message the worker sent, in order
        self._rid = 0

    def recv(self, timeout_ms: int = WAIT) -> Any:
        if not self.sock.poll(timeout_ms):
            raise TimeoutError("the worker sent nothing")
        frames = self.sock.recv_multipart()
        self.worker = frames[0]
        msg = decode_frames(frames[1:])
        self.seen.append(msg)
        return msg

    def expect(self, kind: type, timeout_ms: int = WAIT, skip: tuple[type, ...] = (Heartbeat,)) -> Any:
        while True:
            msg = self.recv(timeout_ms)
            if isinstance(msg, kind):
                return msg
            assert isinstance(msg, skip), f"expected {kind.__name__}, got {msg!r}"

    def send(self, msg: Any) -> None:
        assert self.worker is not None
        self.sock.send_multipart([self.worker, *encode(msg)])

    def send_raw(self, head: list[Any], body: bytes = b"") -> None:
        assert self.worker is not None
        self.sock.send_multipart([self.worker, msgpack.packb(head, use_bin_type=True), body])

    def call(self, method: str, *args: Any, **headers: Any) -> WorkerReply:
        self._rid += 1
        self.request(self._rid, method, *args, **headers)
        reply = self.expect(WorkerReply)
        assert reply.request_id == self._rid
        return reply

    def request(self, rid: int, method: str, *args: Any, client: bytes = b"client-1", **headers: Any) -> None:
        h = {"budget_ms": 30_000, "idempotent": True, "attempt": 0, **headers}
        self.send(WorkerRequest(client, rid, "w", method, h, pack_call(args, {})))

    def heartbeat(self, **info: Any) -> None:
        self.send(Heartbeat(WORKER, info))


HUNG: list[threading.Thread] = []  # workers that did not stop: their context is left alone


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    if not any(t.is_alive() for t in HUNG):
        c.term()  # would wait forever for a hung worker's sockets


class Running:
    def __init__(self, worker: zrpc.Worker, thread: threading.Thread) -> None:
        self.worker = worker
        self.thread = thread


def start(ctx: zmq.Context, brokers: list[FakeBroker], clock: Any = None, **kw: Any) -> Running:
    kw.setdefault("heartbeat_interval", LONG)
    w = zrpc.Worker([svc], [b.endpoint for b in brokers], context=ctx,
                    **({"clock": clock} if clock is not None else {}), **kw)
    t = threading.Thread(target=w.run, name="worker-under-test", daemon=True)
    t.start()
    for b in brokers:
        assert isinstance(b.expect(Ready), Ready)
    return Running(w, t)


@pytest.fixture
def run(ctx: zmq.Context) -> Iterator[Any]:
    made: list[tuple[Running, list[FakeBroker]]] = []
    brokers: list[FakeBroker] = []

    def make(n: int = 1, clock: Any = None, **kw: Any) -> tuple[Running, list[FakeBroker]]:
        bs = [FakeBroker(ctx) for _ in range(n)]
        brokers.extend(bs)
        r = start(ctx, bs, FakeClock() if clock is None else clock, **kw)
        made.append((r, bs))
        return r, bs

    yield make
    release.set()
    for r, _ in made:
        r.worker.stop(drain=False)
        r.thread.join(10)
    for b in brokers:
        b.sock.close(0)
    release.clear()
    hung = [r.thread for r, _ in made if r.thread.is_alive()]
    HUNG.extend(hung)
    assert not hung, "the worker did not stop"


# --- item: the loop sleeps, and a wake-up is enough --------------------------------------------


def test_replies_go_out_on_the_wake_up_not_on_a_poll_timeout(run):
    _, (b,) = run()  # frozen clock, hour-long interval: no deadline will wake the loop
    for i in range(50):
        reply = b.call("add", i, 1)
        assert (reply.status, unpack_result(reply.body)) == (Status.OK, i + 1)
    for i in range(20):
        reply = b.call("aadd", i, 2)
        assert (reply.status, unpack_result(reply.body)) == (Status.OK, i + 2)


def test_stop_wakes_a_sleeping_loop(run):
    r, (b,) = run()
    r.worker.stop()
    b.expect(Disconnect)
    b.send(Disconnect())  # acknowledged: nothing in flight, so it leaves
    r.thread.join(WAIT / 1000)
    assert not r.thread.is_alive()


# --- item: errors that cannot be encoded --------------------------------------------------------


@pytest.mark.parametrize("method", ["surrogate", "unprintable", "asurrogate", "aunprintable"])
@pytest.mark.parametrize("tracebacks", [True, False])
def test_an_error_that_cannot_be_encoded_is_still_answered(run, method, tracebacks):
    r, (b,) = run(concurrency=2, send_tracebacks=tracebacks)
    for _ in range(10):  # more than `concurrency`: no slot may be lost
        reply = b.call(method)
        assert reply.status == Status.ERROR
        err = unpack_error(reply.body)
        if "surrogate" in method:
            assert (err["type"], err["message"]) == ("ValueError", "caf\\udce9")
        else:
            assert err["type"] == "Unprintable" and "unprintable" in err["message"]
        assert (err["traceback"] is not None) == tracebacks
    assert unpack_result(b.call("add", 2, 3).body) == 5
    assert unpack_result(b.call("aadd", 2, 3).body) == 5
    assert r.worker.counters["internal_errors"] == 0


@pytest.mark.parametrize("method", ["bad_result", "unpackable"])
def test_a_result_that_cannot_be_packed_is_an_error_reply(run, method):
    _, (b,) = run(concurrency=1)
    for _ in range(3):
        reply = b.call(method)
        assert reply.status == Status.ERROR
        err = unpack_error(reply.body)
        assert err["type"] == "TypeError" and "msgpack" in err["message"]
    assert unpack_result(b.call("add", 1, 1).body) == 2


# --- item: the reply cache through the loop ----------------------------------------------------


def test_a_probe_for_a_call_whose_reply_is_gone_is_unknown_never_not_seen(run):
    r, (b,) = run()
    r.worker._core.cache.max_entries = 0  # every reply is evicted at once: tombstones only
    first = b.call("charge", 7, idempotent=False)
    assert unpack_result(first.body) == 7
    b.request(first.request_id, "charge", 7, idempotent=False, probe=True)
    assert b.expect(WorkerReply).status == Status.CALL_STATE_UNKNOWN
    b.request(first.request_id, "charge", 7, idempotent=False)  # a retry: not run again
    assert b.expect(WorkerReply).status == Status.CALL_STATE_UNKNOWN
    assert r.worker.counters["calls"] == 1
    b.request(first.request_id + 100, "charge", 7, idempotent=False, probe=True)
    assert b.expect(WorkerReply).status == Status.NOT_SEEN


def test_a_header_cannot_make_a_non_idempotent_method_forgettable(run):
    r, (b,) = run()
    r.worker._core.cache.max_entries = 0
    first = b.call("charge", 1, idempotent=True)  # the method says otherwise: it wins
    b.request(first.request_id, "charge", 1, probe=True)
    assert b.expect(WorkerReply).status == Status.CALL_STATE_UNKNOWN


# --- item: containment, heartbeat info ----------------------------------------------------------


def heartbeat_info(poke: FakeBroker, brokers: list[FakeBroker], clock: FakeClock) -> dict[str, Any]:
    """Moves time to the next heartbeat, wakes the loop through `poke` (after whatever was
    sent through it) and returns what the worker's heartbeats say (the same to every broker)."""
    clock.advance(1.0)
    poke.send(Disconnect())  # not a heartbeat (that would be a new announcement); ignored
    infos = [b.expect(Heartbeat, skip=()).info for b in brokers]
    assert all(i == infos[0] for i in infos)
    return infos[0]


def test_malformed_broker_heartbeats_never_hurt(run):
    clock = FakeClock()
    r, (b,) = run(clock=clock, heartbeat_interval=1.0, liveness=1000)
    bad: list[dict[str, Any]] = [
        {"interval_ms": "250"}, {"interval_ms": 1e308, "liveness": 3}, {"interval_ms": 2**63, "liveness": 2**63},
        {"interval_ms": -1, "liveness": -1}, {"interval_ms": True, "liveness": True},
        {"interval_ms": [250], "liveness": {"a": 1}},
        {"state": "active", "epoch": "x"}, {"state": "active", "epoch": float("inf")},
        {"state": "active", "epoch": float("nan")}, {"state": "active", "epoch": [1]},
        {"state": "active", "epoch": -5}, {"state": "active", "epoch": True},
        {"state": ["active"], "epoch": 3}, {"state": b"active", "epoch": 3}, {"state": None},
        {"register": "yes"}, {"register": [1]}, {"register": 1},
        {"epoch": 2**64 - 1},
    ]
    for info in bad:
        b.heartbeat(**info)
    b.send_raw([WORKER, 4, "not a map"])
    b.send_raw([WORKER, 4, {1: 2}])
    b.send_raw([WORKER, 99])
    b.send_raw(["ZRPC1W", 1, b"c", 1, "w", "add", {"budget_ms": "x"}], pack_call((1, 2), {}))
    b.sock.send_multipart([b.worker, b"\xc1garbage", b"", b"extra"])
    assert unpack_result(b.call("add", 1, 2).body) == 3
    info = heartbeat_info(b, [b], clock)
    assert info == {"internal_errors": 0, "active_epoch": 0}
    assert r.worker._core.interval == 1.0  # none of them was a setting to follow
    assert [m for m in b.seen if isinstance(m, Ready)] == [b.seen[0]]  # no register ask obeyed
    assert r.worker.counters["internal_errors"] == 0


def settled_info(poke: FakeBroker, brokers: list[FakeBroker], clock: FakeClock,
                 expected: dict[str, Any]) -> dict[str, Any]:
    """The worker's heartbeat info once it says `expected`, within a few heartbeats: a beat
    may leave just before the announcement that changes it has been read (the loop's poll
    runs on real time, the test's clock is fake)."""
    info: dict[str, Any] = {}
    for _ in range(5):
        info = heartbeat_info(poke, brokers, clock)
        if info == expected:
            break
    return info


def test_active_epoch_is_the_current_announcement_of_active_brokers(run):
    clock = FakeClock()
    _, (a, b) = run(2, clock=clock, heartbeat_interval=1.0, liveness=1000)
    both = [a, b]

    def says(epoch: int) -> dict[str, Any]:
        return {"internal_errors": 0, "active_epoch": epoch}

    assert heartbeat_info(a, both, clock) == says(0)
    b.heartbeat(state="passive", epoch=5)
    assert settled_info(b, both, clock, says(0)) == says(0)
    a.heartbeat(state="active", epoch=3)
    assert settled_info(a, both, clock, says(3)) == says(3)
    b.heartbeat(state="active", epoch=7)
    assert settled_info(b, both, clock, says(7)) == says(7)
    b.heartbeat(state="passive", epoch=7)  # stepped down: its 7 no longer counts
    assert settled_info(b, both, clock, says(3)) == says(3)
    a.heartbeat(state="active", epoch="x")  # an announcement that cannot be read is none
    assert settled_info(a, both, clock, says(0)) == says(0)


def test_a_bug_in_handling_one_message_costs_that_message_only(run, monkeypatch, caplog):
    r, (b,) = run()
    real = r.worker._core._follow
    calls = {"n": 0}

    def broken(info: dict[str, Any]) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return real(info)

    monkeypatch.setattr(r.worker._core, "_follow", broken)
    b.heartbeat()
    assert unpack_result(b.call("add", 4, 4).body) == 8  # the loop lived through it
    assert r.worker.counters["internal_errors"] == 1
    assert any("internal error" in rec.getMessage() for rec in caplog.records)


# --- items: a leaving worker stays gone, and does not spin while it drains ----------------------


def test_a_leaving_worker_ignores_register_asks(run):
    r, (b,) = run()
    b.request(1, "blocked")  # keeps it draining
    r.worker.stop()
    b.expect(Disconnect)
    b.heartbeat(register=True)
    b.send(Disconnect())
    release.set()
    assert b.expect(WorkerReply).request_id == 1
    r.thread.join(WAIT / 1000)
    assert not r.thread.is_alive()
    assert not [m for m in b.seen[1:] if isinstance(m, Ready)]


def test_a_leaving_worker_does_not_register_again_when_a_broker_that_let_it_go_falls_silent(run):
    clock = FakeClock()
    r, (a, b) = run(2, clock=clock, heartbeat_interval=1.0, liveness=3)
    b.request(1, "blocked")  # b still has a call running on it
    r.worker.stop()
    a.expect(Disconnect)
    b.expect(Disconnect)
    a.send(Disconnect())  # a lets it go and, knowing it no more, sends nothing from now on
    b.send(Disconnect())
    for _ in range(20):  # 20 s: past a's expiry (3 s) and its first reconnect backoff
        clock.advance(1.0)
        b.heartbeat()  # b still watches it; this also wakes the loop
        b.expect(Heartbeat, skip=())
    link_a = r.worker._core.links[0]
    assert link_a.state == "gone" and r.worker._socks[0] is None  # it stays gone from a
    release.set()
    assert b.expect(WorkerReply).request_id == 1
    r.thread.join(WAIT / 1000)
    assert not r.thread.is_alive()
    while a.sock.poll(500):  # anything still on its way
        a.recv()
    assert not [m for m in a.seen[1:] if isinstance(m, Ready)]


def test_a_leaving_worker_that_reconnects_says_disconnect_not_ready(run):
    clock = FakeClock()
    r, (a, b) = run(2, clock=clock, heartbeat_interval=1.0, liveness=3)
    b.request(1, "blocked")
    r.worker.stop()
    a.expect(Disconnect)
    b.expect(Disconnect)
    b.send(Disconnect())  # a never answers: it is gone, and will come back knowing nothing
    for _ in range(5):  # past a's expiry (3 s) and the first backoff (0.3 s at most), then hold
        clock.advance(1.0)
        b.heartbeat()
        b.expect(Heartbeat, skip=())
    reconnect = a.expect(Disconnect)  # after the reconnect: still leaving
    assert isinstance(reconnect, Disconnect)
    assert not [m for m in a.seen[1:] if isinstance(m, Ready)]
    release.set()
    assert b.expect(WorkerReply).request_id == 1


# --- the loop sleeps: counted wake-ups ------------------------------------------------------------


class CountingPoller:
    """Wraps the worker's poller to count how often its loop polls."""

    def __init__(self, inner: zmq.Poller) -> None:
        self.inner = inner
        self.polls = 0

    def poll(self, timeout: int | None = None) -> Any:
        self.polls += 1
        return self.inner.poll(timeout)

    def register(self, *args: Any) -> Any:
        return self.inner.register(*args)

    def unregister(self, sock: Any) -> Any:
        return self.inner.unregister(sock)


def polls_during(worker: zrpc.Worker, seconds: float) -> int:
    """How many times the loop polled in `seconds`: a loop that sleeps until its next deadline
    polls about once here (no deadline of a frozen clock comes due); one that spins, hundreds."""
    counter = CountingPoller(worker._poller)
    worker._poller = counter  # type: ignore[assignment]
    time.sleep(seconds)  # noqa: sleep (a measurement window, not a synchronisation)
    worker._poller = counter.inner
    return counter.polls


def test_an_idle_worker_sleeps(run):
    r, (b,) = run()
    assert unpack_result(b.call("add", 1, 1).body) == 2
    assert polls_during(r.worker, 0.5) <= 3


def test_a_draining_worker_sleeps_until_its_call_ends(run):
    clock = FakeClock()
    r, (b,) = run(clock=clock, heartbeat_interval=1.0, liveness=1000)  # drain grace: 4 s
    b.request(1, "blocked")
    wait_until(lambda: r.worker._core.inflight == 1, 10, what="the call running")
    r.worker.stop()
    b.expect(Disconnect)
    b.send(Disconnect())  # acknowledged, but a call is still running: it drains
    clock.advance(5.0)  # past the grace: only the running call keeps it here now
    b.send(Disconnect())  # wakes the loop (an answer it already has)
    b.expect(Heartbeat, skip=())  # one was due: the loop ran at the new time
    assert polls_during(r.worker, 0.5) <= 3
    release.set()
    assert b.expect(WorkerReply).request_id == 1
    r.thread.join(WAIT / 1000)
    assert not r.thread.is_alive()


# --- item: inline handlers and waiting calls' deadlines ----------------------------------------


def test_inline_calls_run_on_the_loop_and_reply_on_the_wake_up(run):
    r, (b,) = run(concurrency=1)
    b.request(1000, "blocked")  # the pool's one thread is busy: inline calls do not wait for it
    for _ in range(20):
        reply = b.call("where")
        assert (reply.status, unpack_result(reply.body)) == (Status.OK, "worker-under-test")
    release.set()
    assert unpack_result(b.expect(WorkerReply).body) == "released"
    assert r.worker.counters["internal_errors"] == 0


def test_a_slow_inline_method_is_moved_to_the_pool_with_a_warning(run, caplog):
    clock = FakeClock()
    CLOCKS[:] = [clock]
    r, (b,) = run(clock=clock, concurrency=1)
    with caplog.at_level(logging.WARNING, logger="zrpc.worker"):
        assert unpack_result(b.call("where", 0.001).body) == "worker-under-test"  # fast enough
        assert unpack_result(b.call("where", 0.5).body) == "worker-under-test"  # answered, then moved
        assert unpack_result(b.call("where").body) == "zrpc-handler-0"
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "w.where is declared inline but took 500 ms" in warnings[0]
    assert r.worker.counters["internal_errors"] == 0


def test_a_call_whose_deadline_passed_while_it_waited_is_answered_timeout_not_run(run):
    clock = FakeClock()
    r, (b,) = run(clock=clock, concurrency=1, prefetch=1)
    b.request(1000, "blocked")
    b.request(1001, "charge", 5, idempotent=False, budget_ms=200)
    wait_until(lambda: r.worker._core.inflight == 2, 10, what="both calls taken")
    clock.advance(1.0)
    release.set()
    replies = {m.request_id: m for m in (b.expect(WorkerReply), b.expect(WorkerReply))}
    assert replies[1000].status == Status.OK and replies[1001].status == Status.TIMEOUT
    assert unpack_error(replies[1001].body)["type"] == "Timeout"
    assert r.worker.counters["calls"] == 2  # both taken; the charge never ran
