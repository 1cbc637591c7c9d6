"""WorkerCore on a fake clock: admission and the reply cache, probes, draining, the broker's
settings, liveness and reconnects, malformed input (zrpc/_core/_worker.py, rules 1-9)."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import zrpc
from zrpc._core._frames import (
    WORKER,
    ClientReply,
    Disconnect,
    Heartbeat,
    Message,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_call, pack_result, unpack_error
from zrpc._core._worker import (
    Action,
    CallFinished,
    CloseLink,
    Exit,
    HandshakeEnded,
    InlineRan,
    Log,
    MessageArrived,
    OpenFailed,
    OpenLink,
    Phase,
    RunHandler,
    Send,
    SendReply,
    StopRequested,
    WorkerCore,
)
from zrpc.testing import FakeClock

svc = zrpc.Service("w")


@svc.method
def add(a: int, b: int) -> int:
    return a + b


@svc.method(idempotent=False)
def charge(n: int) -> int:
    return n


@svc.method
async def aadd(a: int, b: int) -> int:
    return a + b


fast = zrpc.Service("w")  # the same names, add and charge declared inline
fast.method(name="add", inline=True)(add)
fast.method(name="charge", idempotent=False, inline=True)(charge)
fast.method(name="slow")(add)


class Harness:
    """A core on a fake clock, with links named b0, b1, ... and a fixed backoff jitter."""

    def __init__(self, links: int = 1, service: zrpc.Service = svc, **kw: Any) -> None:
        self.clock = FakeClock()
        kw.setdefault("heartbeat_interval", 1.0)
        self.core = WorkerCore(self.clock, {"w": service}, [f"tcp://b{i}" for i in range(links)],
                               name="w1", rng=random.Random(7), **kw)
        self.started = self.core.start()

    def request(self, rid: int, method: str = "add", *args: Any, link: int = 0,
                client: bytes = b"c1", **headers: Any) -> list[Action]:
        h = {"budget_ms": 30_000, "idempotent": True, "attempt": 0, **headers}
        body = b"" if h.get("probe") else pack_call(args or (1, 2), {})
        return self.core.frames_received(link, encode(WorkerRequest(client, rid, "w", method, h, body)))

    def probe(self, rid: int, method: str = "charge", link: int = 0, client: bytes = b"c1") -> list[Action]:
        return self.request(rid, method, link=link, client=client, probe=True, idempotent=False)

    def finish(self, call: RunHandler, status: int = Status.OK, body: bytes | None = None) -> list[Action]:
        return self.core.handle(CallFinished(call, status, pack_result(3) if body is None else body))

    def heartbeat(self, link: int = 0, **info: Any) -> list[Action]:
        return self.core.frames_received(link, encode(Heartbeat(WORKER, info)))

    def advance(self, seconds: float) -> list[Action]:
        self.clock.advance(seconds)
        return self.core.tick()

    def reach(self, when: float | None) -> list[Action]:
        """Moves the clock to `when` exactly or just past it (float sums may fall short), then ticks."""
        assert when is not None
        self.clock.advance(max(0.0, when - self.clock()))
        while self.clock() < when:
            self.clock.advance(1e-9)
        return self.core.tick()


def runs(actions: list[Action]) -> list[RunHandler]:
    return [a for a in actions if isinstance(a, RunHandler)]


def replies(actions: list[Action]) -> list[tuple[tuple[int, ...], WorkerReply]]:
    out = []
    for a in actions:
        if isinstance(a, SendReply):
            msg = decode_frames(a.frames)
            assert isinstance(msg, WorkerReply)
            out.append((a.links, msg))
    return out


def statuses(actions: list[Action]) -> list[int]:
    return [r.status for _, r in replies(actions)]


def sent(actions: list[Action], link: int | None = None) -> list[Message]:
    return [decode_frames(a.frames) for a in actions
            if isinstance(a, Send) and (link is None or a.link == link)]


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


# --- start and state ----------------------------------------------------------------------------


def test_start_opens_every_link_and_says_ready_on_each() -> None:
    h = Harness(links=2, concurrency=4)
    assert kinds(h.started) == [OpenLink, Send, OpenLink, Send]
    for link in (0, 1):
        (ready,) = sent(h.started, link)
        assert isinstance(ready, Ready)
        assert (ready.worker_id, ready.capacity, ready.services) == (
            "w1", 4, {"w": {"add": True, "charge": False, "aadd": True}})


def test_repr_shows_phase_inflight_and_links() -> None:
    h = Harness(links=2, concurrency=8)
    h.heartbeat(0, state="active", epoch=3)
    h.request(1)
    assert repr(h.core) == "<WorkerCore RUNNING inflight=1/8 links=[ACTIVE, open]>"
    h.advance(3.0)  # both silent (interval 1 s x 3): closed, to be reopened later
    assert repr(h.core) == "<WorkerCore RUNNING inflight=1/8 links=[silent, silent]>"


# --- admission ----------------------------------------------------------------------------------


def test_a_call_runs_and_its_reply_goes_to_the_broker_it_came_from() -> None:
    h = Harness(links=2)
    (call,) = runs(h.request(1, "add", 2, 3, link=1))
    assert (call.link, call.request.request_id, call.method.name) == (1, 1, "add")
    ((links, reply),) = replies(h.finish(call))
    assert links == (1, 0)  # the other one only if that one cannot take it
    assert (reply.client_id, reply.request_id, reply.status) == (b"c1", 1, Status.OK)
    assert (h.core.calls, h.core.errors, h.core.inflight) == (1, 0, 0)


def test_capacity_full_sync_calls_wait_for_a_thread_in_arrival_order() -> None:
    h = Harness(concurrency=2)
    started = [c for rid in (1, 2, 3, 4) for c in runs(h.request(rid))]
    assert [c.request.request_id for c in started] == [1, 2]
    assert h.core.inflight == 4
    out = h.finish(started[1])
    assert [c.request.request_id for c in runs(out)] == [3]  # the freed thread takes the next
    assert statuses(out) == [Status.OK]
    assert [c.request.request_id for c in runs(h.finish(started[0]))] == [4]
    assert h.core.inflight == 2


def test_async_calls_start_at_once_whatever_the_thread_count() -> None:
    h = Harness(concurrency=1)
    assert len(runs(h.request(1))) == 1
    assert len(runs(h.request(2))) == 0  # sync: waits for the one thread
    assert [c.request.request_id for rid in (3, 4, 5) for c in runs(h.request(rid, "aadd"))] == [3, 4, 5]
    assert h.core.inflight == 5


def test_a_duplicate_of_a_running_call_joins_it_and_both_brokers_get_the_reply() -> None:
    h = Harness(links=2)
    (call,) = runs(h.request(1, "charge", 5, link=0, idempotent=False))
    assert h.request(1, "charge", 5, link=1, idempotent=False) == []  # not run twice
    out = h.finish(call)
    assert [links[0] for links, _ in replies(out)] == [0, 1]
    assert h.core.calls == 1 and h.core.cache.hits == 1


def test_a_retry_of_a_finished_call_is_answered_from_the_cache_not_run() -> None:
    h = Harness()
    (call,) = runs(h.request(1, "charge", 5, idempotent=False))
    h.finish(call, body=pack_result(5))
    out = h.request(1, "charge", 5, idempotent=False, attempt=1)
    assert runs(out) == []
    ((_, reply),) = replies(out)
    assert (reply.status, reply.body) == (Status.OK, pack_result(5))
    assert h.core.calls == 1


def test_a_resent_call_whose_reply_is_gone_is_unknown_never_run_again() -> None:
    h = Harness()
    h.core.cache.max_entries = 0  # every reply evicted at once: tombstones only
    (call,) = runs(h.request(1, "charge", 5, idempotent=False))
    h.finish(call)
    out = h.request(1, "charge", 5, idempotent=False, resent=True)
    assert runs(out) == [] and statuses(out) == [Status.CALL_STATE_UNKNOWN]
    assert unpack_error(replies(out)[0][1].body)["type"] == "CallStateUnknown"


def test_a_header_cannot_make_a_non_idempotent_method_forgettable() -> None:
    h = Harness()
    h.core.cache.max_entries = 0
    (call,) = runs(h.request(1, "charge", 5, idempotent=True))  # the method says otherwise
    h.finish(call)
    assert statuses(h.probe(1)) == [Status.CALL_STATE_UNKNOWN]


def test_an_idempotent_call_whose_reply_is_gone_may_run_again() -> None:
    h = Harness()
    h.core.cache.max_entries = 0
    (call,) = runs(h.request(1, "add", idempotent=True))
    h.finish(call)
    assert len(runs(h.request(1, "add", idempotent=True))) == 1


@pytest.mark.parametrize("method, headers, status", [
    ("nope", {}, Status.METHOD_NOT_FOUND),
    ("add", {"budget_ms": 0}, Status.TIMEOUT),
])
def test_calls_that_cannot_run_are_answered_at_once(method: str, headers: dict[str, Any], status: int) -> None:
    h = Harness()
    out = h.request(1, method, **headers)
    assert runs(out) == [] and statuses(out) == [status]
    assert h.core.calls == 0 and h.core.inflight == 0


def test_an_unknown_service_is_method_not_found() -> None:
    h = Harness()
    out = h.core.frames_received(0, encode(WorkerRequest(b"c", 1, "other", "add", {}, pack_call((), {}))))
    assert statuses(out) == [Status.METHOD_NOT_FOUND]


def test_handler_errors_are_counted_and_answered() -> None:
    h = Harness()
    (call,) = runs(h.request(1))
    assert statuses(h.finish(call, Status.ERROR, b"")) == [Status.ERROR]
    assert h.core.errors == 1


def test_a_reply_goes_through_another_link_when_its_own_is_closed() -> None:
    h = Harness(links=2)
    (call,) = runs(h.request(1, link=0))
    h.advance(2.0)
    h.heartbeat(1)  # only link 1 speaks
    assert CloseLink(0) in h.advance(1.0)
    ((links, _),) = replies(h.finish(call))
    assert links == (1,)


def test_a_reply_with_no_open_link_goes_nowhere() -> None:
    h = Harness()
    (call,) = runs(h.request(1))
    h.advance(3.0)
    ((links, _),) = replies(h.finish(call))
    assert links == ()  # the loop counts it lost


# --- probes -------------------------------------------------------------------------------------


def test_a_probe_for_an_unknown_call_is_not_seen_and_records_nothing() -> None:
    h = Harness()
    out = h.probe(1)
    assert runs(out) == [] and statuses(out) == [Status.NOT_SEEN]
    assert replies(out)[0][1].body == b""
    assert len(h.core.cache) == 0
    assert len(runs(h.request(1, "charge", idempotent=False))) == 1  # it may still run


def test_a_probe_for_a_running_call_waits_and_gets_its_reply() -> None:
    h = Harness(links=2)
    (call,) = runs(h.request(1, "charge", 5, link=0, idempotent=False))
    assert h.probe(1, link=1) == []
    out = h.finish(call)
    assert [(links[0], r.status) for links, r in replies(out)] == [(0, Status.OK), (1, Status.OK)]


def test_a_probe_for_a_finished_call_gets_the_cached_reply() -> None:
    h = Harness()
    (call,) = runs(h.request(1, "charge", 5, idempotent=False))
    h.finish(call, body=pack_result(5))
    ((_, reply),) = replies(h.probe(1))
    assert (reply.status, reply.body) == (Status.OK, pack_result(5))


def test_a_probe_for_a_tombstone_is_unknown_never_not_seen() -> None:
    h = Harness()
    h.core.cache.max_entries = 0
    (call,) = runs(h.request(1, "charge", 5, idempotent=False))
    h.finish(call)
    assert statuses(h.probe(1)) == [Status.CALL_STATE_UNKNOWN]
    assert statuses(h.probe(2)) == [Status.NOT_SEEN]
    assert h.core.calls == 1


# --- draining -----------------------------------------------------------------------------------


def test_stop_says_disconnect_finishes_calls_in_flight_then_leaves() -> None:
    h = Harness(links=2)
    (call,) = runs(h.request(1))
    out = h.core.handle(StopRequested())
    assert h.core.phase is Phase.DRAINING
    assert [type(m) for m in sent(out)] == [Disconnect, Disconnect]
    assert any(isinstance(a, Log) and "draining 1 in-flight" in a.text for a in out)
    (late,) = runs(h.request(2, link=1))  # sent before the broker read our DISCONNECT: it runs
    for link in (0, 1):
        assert h.core.frames_received(link, encode(Disconnect())) == []
    assert Exit() not in h.core.tick()  # acknowledged, but calls still run
    out = h.finish(call)
    assert statuses(out) == [Status.OK] and Exit() not in out  # the reply still goes out
    out = h.finish(late)
    assert statuses(out) == [Status.OK] and out[-1] == Exit()
    assert repr(h.core).startswith("<WorkerCore STOPPED inflight=0/8")


def test_a_drained_worker_waits_for_acknowledgements_at_most_its_grace() -> None:
    h = Harness()
    h.heartbeat(interval_ms=125, liveness=100)  # grace: max(1 s, 4 intervals) = 1 s
    assert Exit() not in h.core.handle(StopRequested())
    assert h.core.next_deadline() == h.clock() + 0.125  # the next heartbeat
    h.advance(0.5)
    h.heartbeat()
    h.advance(0.25)
    assert Exit() not in h.advance(0.125)
    assert h.advance(0.125)[-1] == Exit()


def test_the_drain_timeout_leaves_with_calls_unfinished() -> None:
    h = Harness(drain_timeout=5.0, liveness=100)
    runs(h.request(1))
    h.core.handle(StopRequested())
    h.core.frames_received(0, encode(Disconnect()))
    for _ in range(4):
        assert Exit() not in h.advance(1.0)
    assert h.core.next_deadline() == h.clock() + 1.0
    out = h.advance(1.0)
    assert out[-1] == Exit(at_once=False)
    assert any(isinstance(a, Log) and a.level == logging.WARNING and "1 call(s) unfinished" in a.text
               for a in out)


def test_a_second_stop_leaves_at_once() -> None:
    h = Harness()
    runs(h.request(1))
    assert Exit() not in h.core.handle(StopRequested())
    assert h.core.handle(StopRequested()) == [Exit(at_once=True)]
    assert h.core.handle(StopRequested()) == []  # gone already
    assert h.core.tick() == [] and h.core.next_deadline() is None


def test_a_stop_without_drain_leaves_at_once_saying_nothing() -> None:
    h = Harness()
    runs(h.request(1))
    assert h.core.handle(StopRequested(drain=False)) == [Exit(at_once=True)]


def test_a_leaving_worker_ignores_register_asks_a_running_one_obeys() -> None:
    h = Harness()
    assert [type(m) for m in sent(h.heartbeat(register=True))] == [Ready]
    h.core.handle(StopRequested())
    assert sent(h.heartbeat(register=True)) == []


def test_a_disconnect_from_a_broker_means_nothing_unless_leaving() -> None:
    h = Harness()
    h.core.frames_received(0, encode(Disconnect()))
    assert not h.core.links[0].acked
    h.core.handle(StopRequested())
    assert h.core.frames_received(0, encode(Disconnect())) == []
    assert h.core.tick()[-1] == Exit()


# --- following the broker, heartbeats -----------------------------------------------------------


def test_heartbeats_every_interval_per_link_busy_or_not() -> None:
    h = Harness(links=2, heartbeat_interval=0.5, liveness=100)
    assert h.core.next_deadline() == h.clock() + 0.5
    assert h.advance(0.25) == []
    beats = sent(h.advance(0.25))
    assert beats == [Heartbeat(WORKER, {"internal_errors": 0, "active_epoch": 0})] * 2


def test_the_broker_heartbeat_settings_are_followed() -> None:
    h = Harness(heartbeat_interval=0.25, liveness=3)
    out = h.heartbeat(interval_ms=1000, liveness=5)
    assert any(isinstance(a, Log) and "1000 ms x 5" in a.text for a in out)
    assert (h.core.interval, h.core.tracker.liveness) == (1.0, 5)
    assert h.heartbeat(interval_ms=1000, liveness=5) == []  # once: nothing new
    assert sent(h.advance(0.5)) == []
    assert len(sent(h.advance(0.5))) == 1
    h.heartbeat()
    assert CloseLink(0) not in h.advance(4.5)  # the old 0.75 s of silence is no death now
    assert CloseLink(0) in h.advance(0.5)  # 5 x 1 s is


@pytest.mark.parametrize("info", [
    {"interval_ms": "250", "liveness": 3}, {"interval_ms": 9, "liveness": 3},
    {"interval_ms": 60_001, "liveness": 3}, {"interval_ms": 250, "liveness": 0},
    {"interval_ms": 250, "liveness": 101}, {"interval_ms": True, "liveness": True},
    {"interval_ms": 250.0, "liveness": 3}, {"interval_ms": 250},
])
def test_settings_out_of_range_or_of_the_wrong_type_are_ignored(info: dict[str, Any]) -> None:
    h = Harness(heartbeat_interval=1.0, liveness=3)
    assert h.heartbeat(**info) == []
    assert (h.core.interval, h.core.tracker.liveness) == (1.0, 3)


def test_active_epoch_is_the_highest_among_brokers_announcing_active() -> None:
    h = Harness(links=2, liveness=100)

    def said() -> int:
        (beat, *_) = sent(h.advance(1.0))
        assert isinstance(beat, Heartbeat)
        return int(beat.info["active_epoch"])

    assert said() == 0
    h.heartbeat(1, state="passive", epoch=5)
    assert said() == 0
    h.heartbeat(0, state="active", epoch=3)
    h.heartbeat(1, state="active", epoch=7)
    assert said() == 7
    h.heartbeat(1, state="passive", epoch=7)  # stepped down: its 7 no longer counts
    assert said() == 3
    h.heartbeat(0, state="active", epoch="x")
    assert said() == 0


def test_heartbeats_carry_the_loops_internal_error_count() -> None:
    errors = {"n": 0}
    h = Harness(internal_errors=lambda: errors["n"])
    errors["n"] = 4
    (beat,) = sent(h.advance(1.0))
    assert isinstance(beat, Heartbeat) and beat.info["internal_errors"] == 4


# --- liveness -----------------------------------------------------------------------------------


def test_a_silent_link_is_closed_and_reopened_after_a_backoff_saying_ready() -> None:
    h = Harness(liveness=3)
    h.advance(2.5)
    h.heartbeat()  # any traffic counts
    out = h.advance(2.5)
    assert CloseLink(0) not in out
    out = h.advance(0.5)
    assert CloseLink(0) in out and h.core.links[0].state == "silent"
    at = h.core.links[0].reconnect_at
    assert at is not None and 0.2 <= at - h.clock() <= 0.3  # 250 ms, jittered by 20 %
    assert h.core.next_deadline() == at
    out = h.reach(at)
    assert OpenLink(0) in out and [type(m) for m in sent(out)] == [Ready]


def test_the_backoff_doubles_while_a_broker_stays_silent_and_resets_when_heard() -> None:
    h = Harness(liveness=1)
    delays = []
    for _ in range(4):
        h.advance(1.0)  # silent: closed
        at = h.core.links[0].reconnect_at
        assert at is not None
        delays.append(at - h.clock())
        assert OpenLink(0) in h.reach(at)
    for delay, base in zip(delays, [0.25, 0.5, 1.0, 2.0]):
        assert 0.8 * base <= delay <= 1.2 * base  # jittered by 20 %
    h.heartbeat()
    h.advance(1.0)
    at = h.core.links[0].reconnect_at
    assert at is not None and at - h.clock() <= 0.3


def test_a_leaving_worker_does_not_reopen_a_link_that_let_it_go() -> None:
    h = Harness(links=2, liveness=3)
    runs(h.request(1, link=1))
    h.core.handle(StopRequested())
    h.core.frames_received(0, encode(Disconnect()))  # 0 lets it go, then says nothing more
    for _ in range(10):
        h.heartbeat(1)
        out = h.advance(1.0)
        assert OpenLink(0) not in out
    assert h.core.links[0].state == "gone" and h.core.next_deadline() is not None


def test_a_leaving_worker_that_reopens_a_link_says_disconnect_not_ready() -> None:
    h = Harness(links=1, liveness=3)
    runs(h.request(1))
    h.core.handle(StopRequested())  # never acknowledged: the broker is gone
    h.advance(3.0)
    out = h.reach(h.core.links[0].reconnect_at)
    assert OpenLink(0) in out and [type(m) for m in sent(out)] == [Disconnect]


def test_a_link_that_cannot_be_opened_is_tried_again_later() -> None:
    h = Harness()
    h.advance(3.0)
    assert OpenLink(0) in h.reach(h.core.links[0].reconnect_at)
    assert h.core.handle(OpenFailed(0)) == [CloseLink(0)]
    later = h.core.links[0].reconnect_at
    assert later is not None and later > h.clock()
    assert h.core.tick() == []


def test_handshake_refusals_are_logged_once_and_recovery_too() -> None:
    h = Harness()
    (log1,) = h.core.handle(HandshakeEnded(0, "the broker refused this key"))
    assert isinstance(log1, Log) and log1.level == logging.ERROR
    assert h.core.handle(HandshakeEnded(0, "again")) == []
    assert repr(h.core).endswith("links=[refused]>")
    (log2,) = h.core.handle(HandshakeEnded(0, None))
    assert isinstance(log2, Log) and log2.level == logging.INFO


def test_an_idle_worker_sleeps_until_its_next_heartbeat() -> None:
    h = Harness(heartbeat_interval=3600.0)
    assert h.core.next_deadline() == h.clock() + 3600.0


# --- malformed input ----------------------------------------------------------------------------


def test_undecodable_frames_are_counted_logged_a_few_times_and_count_as_life() -> None:
    h = Harness(liveness=3)
    h.advance(2.5)
    logged = 0
    for _ in range(12):
        out = h.core.frames_received(0, [b"\xc1garbage", b""])
        logged += sum(isinstance(a, Log) for a in out)
        assert runs(out) == [] and replies(out) == []
    assert (h.core.malformed.count, logged) == (12, 10)
    assert CloseLink(0) not in h.advance(2.5)  # the garbage was a sign of life


@pytest.mark.parametrize("msg", [
    Ready("w", {"x": {"y": True}}, 1), WorkerReply(b"c", 1, 0, b""), ClientReply(1, 0, b""),
])
def test_messages_a_broker_never_sends_a_worker_are_counted(msg: Message) -> None:
    h = Harness()
    out = h.core.frames_received(0, encode(msg))
    assert runs(out) == [] and replies(out) == []
    assert h.core.malformed.count == 1


def test_decoded_messages_may_be_handed_in_as_events() -> None:
    h = Harness()
    req = WorkerRequest(b"c", 1, "w", "add", {"idempotent": True}, pack_call((1, 2), {}))
    (call,) = runs(h.core.handle(MessageArrived(0, req)))
    assert call.request == req
    with pytest.raises(TypeError):
        h.core.handle("not an event")  # type: ignore[arg-type]  # deliberately wrong: a caller's bug


# --- at most once, over random event orders ------------------------------------------------------


class AtMostOnce(RuleBasedStateMachine):
    """Requests, retries, re-sends and probes from two brokers in any order, handlers finishing
    in any order, time passing, replies evicted: a non-idempotent call never runs twice, and a
    probe never says NOT_SEEN for a call that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(links=2, concurrency=2, liveness=100)
        self.h.core.cache.max_entries = 2  # evictions, hence tombstones, happen often
        self.running: list[RunHandler] = []
        self.ran: dict[int, int] = {}

    def _take(self, out: list[Action]) -> None:
        for a in out:
            if isinstance(a, RunHandler):
                self.running.append(a)
                rid = a.request.request_id
                self.ran[rid] = self.ran.get(rid, 0) + 1
        for _, r in replies(out):
            if r.status == Status.NOT_SEEN:
                assert r.request_id not in self.ran, f"NOT_SEEN for call {r.request_id}, which ran"

    @rule(rid=st.integers(1, 6), link=st.integers(0, 1), header=st.booleans(),
          resent=st.booleans(), attempt=st.integers(0, 2))
    def request(self, rid: int, link: int, header: bool, resent: bool, attempt: int) -> None:
        self._take(self.h.request(rid, "charge", rid, link=link, idempotent=header,
                                  resent=resent, attempt=attempt))

    @rule(rid=st.integers(1, 6), link=st.integers(0, 1))
    def probe(self, rid: int, link: int) -> None:
        self._take(self.h.probe(rid, link=link))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), ok=st.booleans())
    def finish(self, i: int, ok: bool) -> None:
        call = self.running.pop(i % len(self.running))
        self._take(self.h.finish(call, Status.OK if ok else Status.ERROR, b"r"))

    @rule(seconds=st.floats(0.0, 5.0))
    def advance(self, seconds: float) -> None:  # 40 steps stay within the tombstones' 300 s
        self.h.clock.advance(seconds)
        self._take(self.h.core.tick())

    @invariant()
    def never_twice(self) -> None:
        assert all(n == 1 for n in self.ran.values()), self.ran

    @invariant()
    def inflight_is_what_has_not_finished(self) -> None:
        assert self.h.core.inflight >= len(self.running)


AtMostOnce.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_a_non_idempotent_call_never_runs_twice = AtMostOnce.TestCase


# --- prefetch, waiting calls' deadlines, inline handlers -----------------------------------------


def test_ready_announces_concurrency_plus_prefetch_and_prefetched_calls_wait_for_a_thread() -> None:
    h = Harness(concurrency=2, prefetch=3)
    (ready,) = sent(h.started)
    assert isinstance(ready, Ready) and ready.capacity == 5
    started = [c for rid in range(1, 6) for c in runs(h.request(rid))]
    assert [c.request.request_id for c in started] == [1, 2]  # threads are still 2
    assert h.core.inflight == 5


def test_a_call_whose_budget_ran_out_while_waiting_is_answered_timeout_never_run() -> None:
    h = Harness(concurrency=1, prefetch=2)
    (first,) = runs(h.request(1))
    assert runs(h.request(2, "charge", 5, budget_ms=500, idempotent=False)) == []
    assert runs(h.request(3, budget_ms=5_000)) == []
    h.clock.advance(1.0)  # call 2's budget is gone, call 3's is not
    out = h.finish(first)
    assert [c.request.request_id for c in runs(out)] == [3]
    assert [(r.request_id, r.status) for _, r in replies(out)] == [(2, Status.TIMEOUT), (1, Status.OK)]
    assert unpack_error(replies(out)[0][1].body)["type"] == "Timeout"
    # a retry of the expired call is answered from the cache: it never runs, here or later
    assert runs(h.request(2, "charge", 5, idempotent=False, attempt=1)) == []
    assert h.core.inflight == 1 and h.core.calls == 3


def test_a_call_without_a_budget_waits_as_long_as_it_takes() -> None:
    h = Harness(concurrency=1)
    (first,) = runs(h.request(1))
    h.core.frames_received(0, encode(WorkerRequest(b"c1", 2, "w", "add", {}, pack_call((1, 2), {}))))
    h.clock.advance(1_000.0)
    assert [c.request.request_id for c in runs(h.finish(first))] == [2]


def test_inline_calls_run_at_once_on_the_loop_and_take_no_thread() -> None:
    h = Harness(service=fast, concurrency=1)
    (pooled,) = runs(h.request(1, "slow"))
    assert not pooled.inline
    inline = [c for rid in (2, 3) for c in runs(h.request(rid, "add"))]
    assert [(c.request.request_id, c.inline) for c in inline] == [(2, True), (3, True)]
    assert h.core.inflight == 3
    out = h.finish(inline[0])
    assert runs(out) == [] and statuses(out) == [Status.OK]  # no thread was freed or taken
    assert runs(h.request(4, "slow")) == []  # the one thread is still the first call's
    assert [c.request.request_id for c in runs(h.finish(pooled))] == [4]


def test_an_inline_method_that_was_slow_once_runs_in_the_pool_from_then_on() -> None:
    h = Harness(service=fast, concurrency=1)
    (call,) = runs(h.request(1, "add"))
    assert h.core.handle(InlineRan(call, 0.001)) == []  # reported fast: nothing changes
    out = h.core.handle(InlineRan(call, 0.2))
    assert [a.level for a in out if isinstance(a, Log)] == [logging.WARNING]
    assert "w.add" in out[0].text and "200 ms" in out[0].text
    assert h.core.handle(InlineRan(call, 0.3)) == []  # said once
    h.finish(call)
    (later,) = runs(h.request(2, "add"))
    assert not later.inline
    assert runs(h.request(3, "add")) == []  # it waits for the pool's one thread now
    (other,) = runs(h.request(4, "charge", 5, idempotent=False))
    assert other.inline  # only the slow method moved


def test_inline_is_for_sync_handlers() -> None:
    s = zrpc.Service("x")

    async def f() -> None: ...

    with pytest.raises(ValueError, match="inline is for sync handlers"):
        s.method(inline=True)(f)


# --- rule 10: fencing by epoch (--elect) --------------------------------------------------------


def test_a_call_stamped_with_an_older_epoch_than_one_seen_is_refused_never_run_nor_cached() -> None:
    h = Harness(links=2)
    assert runs(h.request(1, "charge", 1, epoch=7, idempotent=False))
    assert h.core.highest_epoch == 7
    out = h.request(2, "charge", 1, link=1, epoch=5, idempotent=False)
    assert runs(out) == [] and statuses(out) == [Status.NOT_ACTIVE]
    (links, reply), = replies(out)
    assert links[0] == 1 and unpack_error(reply.body)["type"] == "NotActive"
    assert h.core.epoch_refused == 1
    # not cached: the broker that holds the role now may run it, once
    assert runs(h.request(2, "charge", 1, epoch=7, idempotent=False))


def test_a_heartbeat_saying_active_with_a_newer_epoch_fences_the_older_broker_at_once() -> None:
    h = Harness(links=2)
    h.heartbeat(1, state="active", epoch=12)
    assert h.core.highest_epoch == 12
    assert statuses(h.request(1, epoch=11)) == [Status.NOT_ACTIVE]
    assert runs(h.request(2, link=1, epoch=12))
    h.heartbeat(0, state="passive", epoch=40)  # a passive broker's epoch fences nobody
    assert h.core.highest_epoch == 12


def test_a_probe_with_an_older_epoch_is_refused_too() -> None:
    h = Harness()
    h.request(1, epoch=9)
    out = h.request(5, "charge", probe=True, idempotent=False, epoch=3)
    assert statuses(out) == [Status.NOT_ACTIVE]


def test_calls_without_an_epoch_are_never_fenced() -> None:
    """Binary Star and a lone broker stamp nothing: their calls run as they always have."""
    h = Harness()
    h.heartbeat(0, state="active", epoch=50)
    assert runs(h.request(1))
    assert h.core.epoch_refused == 0


@pytest.mark.parametrize("stamped, refused", [("7", True), (None, False), (True, True), (6.9, True),
                                              (float("nan"), True), (-1, True), (8.0, False)])
def test_an_epoch_that_is_not_a_number_counts_as_zero(stamped: Any, refused: bool) -> None:
    h = Harness()
    h.request(1, epoch=7)
    headers = {} if stamped is None else {"epoch": stamped}
    assert (statuses(h.request(2, **headers)) == [Status.NOT_ACTIVE]) is refused


def test_epochs_seen_only_grow() -> None:
    h = Harness()
    for e in (3, 9, 4, 9, 10):
        h.request(e, epoch=e)
    assert h.core.highest_epoch == 10


# --- rule 11: cluster mode ------------------------------------------------------------------


def readies(actions: list[Action]) -> dict[int, int]:
    """The capacity each READY in `actions` announces, by link."""
    return {a.link: m.capacity for a in actions if isinstance(a, Send)
            for m in [decode_frames(a.frames)] if isinstance(m, Ready)}


@pytest.mark.parametrize("concurrency,prefetch,brokers", [(8, 0, 3), (8, 2, 4), (1, 0, 3), (16, 0, 1), (9, 0, 2)])
def test_cluster_shares_never_promise_more_than_the_capacity(concurrency, prefetch, brokers):
    h = Harness(0, concurrency=concurrency, prefetch=prefetch, split=True)
    told: dict[int, int] = {}
    for i in range(brokers):
        _, out = h.core.add_broker(f"tcp://b{i}")
        told.update(readies(out))
    total = concurrency + prefetch
    assert sorted(told) == list(range(brokers))
    assert sum(told.values()) == max(total, brokers)  # at least one each
    assert max(told.values()) - min(told.values()) <= 1


def test_a_joining_broker_gets_a_link_and_the_others_a_smaller_share():
    h = Harness(0, concurrency=8, split=True)
    index, out = h.core.add_broker("tcp://b0")
    assert index == 0 and OpenLink(0) in out and readies(out) == {0: 8}
    index, out = h.core.add_broker("tcp://b1")
    assert index == 1 and OpenLink(1) in out and readies(out) == {0: 4, 1: 4}


def test_a_broker_that_leaves_is_closed_for_good_and_its_share_goes_back():
    h = Harness(0, concurrency=8, split=True)
    for i in range(3):
        h.core.add_broker(f"tcp://b{i}")
    out = h.core.remove_broker(1)
    assert CloseLink(1) in out and readies(out) == {0: 4, 2: 4}
    assert h.core.remove_broker(1) == []  # once
    for _ in range(40):  # never reopened, never heartbeated
        out = h.advance(0.5)
        assert OpenLink(1) not in out and not [a for a in out if isinstance(a, Send) and a.link == 1]
    (run,) = runs(h.request(1, link=0))
    (links, _), = replies(h.finish(run))
    assert 1 not in links


def test_a_removed_broker_s_call_replies_through_another_link():
    h = Harness(0, concurrency=8, split=True)
    for i in range(2):
        h.core.add_broker(f"tcp://b{i}")
    (run,) = runs(h.request(1, link=1))
    h.core.remove_broker(1)
    (links, reply), = replies(h.finish(run))
    assert links == (0,) and reply.status == Status.OK


def test_without_split_every_broker_hears_the_whole_capacity():
    h = Harness(2, concurrency=8)
    assert readies(h.started) == {0: 8, 1: 8}
    _, out = h.core.add_broker("tcp://b2")
    assert readies(out) == {2: 8}


def test_a_leaving_worker_tells_a_new_broker_it_is_leaving():
    h = Harness(1, concurrency=8, split=True)
    h.core.handle(StopRequested(drain=True))
    _, out = h.core.add_broker("tcp://b1")
    assert readies(out) == {} and any(isinstance(m, Disconnect) for m in sent(out, 1))


# --- per-method authorization (rule 12) -----------------------------------------------------

ADMIN = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # Z85 public keys (the zguide's examples)
OTHER = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"

guarded = zrpc.Service("w")
guarded.method(name="add")(add)
guarded.method(name="reset", allow=[ADMIN])(add)
guarded.method(name="areset", allow=[ADMIN])(aadd)


def test_an_allowed_caller_s_call_runs_and_says_who_called() -> None:
    h = Harness(service=guarded)
    (run,) = runs(h.request(1, "reset", caller=ADMIN))
    assert run.context(h.clock).caller == ADMIN
    assert statuses(h.finish(run)) == [Status.OK] and h.core.unauthorized == 0


@pytest.mark.parametrize("caller, why", [
    (OTHER, f"caller {OTHER} is not among the keys it allows"),
    (None, "the broker named no caller (it runs without CURVE keys)"),
    (["not", "a", "key"], "the broker named no caller"),  # a header of the wrong type names nobody
])
def test_another_caller_or_none_is_answered_unauthorized_never_run(caller: Any, why: str) -> None:
    h = Harness(service=guarded)
    headers = {} if caller is None else {"caller": caller}
    for method in ("reset", "areset"):  # sync and async alike
        out = h.request(1 if method == "reset" else 2, method, **headers)
        assert runs(out) == [] and statuses(out) == [Status.UNAUTHORIZED]
        err = unpack_error(replies(out)[0][1].body)
        assert err["type"] == "Unauthorized" and f"w.{method} refused this call" in err["message"]
        assert why in err["message"]
    assert (h.core.unauthorized, h.core.calls, h.core.inflight) == (2, 0, 0)


def test_a_refused_call_is_never_cached_a_probe_finds_it_never_ran() -> None:
    h = Harness(service=guarded)
    assert statuses(h.request(1, "reset", caller=OTHER)) == [Status.UNAUTHORIZED]
    assert statuses(h.probe(1, "reset")) == [Status.NOT_SEEN]
    assert len(h.core.cache) == 0


def test_a_method_without_allow_takes_every_caller() -> None:
    h = Harness(service=guarded)
    assert len(runs(h.request(1, "add"))) == 1
    assert len(runs(h.request(2, "add", caller=OTHER))) == 1
    assert h.core.unauthorized == 0


def test_a_refused_worker_says_why_once_per_reason():
    h = Harness(1)
    out = h.heartbeat(0, state="active", refused="key worker1 may not serve w")
    assert [a.text for a in out if isinstance(a, Log) and a.level == logging.ERROR] == [
        "broker tcp://b0 refused this worker: key worker1 may not serve w"]
    assert not [a for a in h.heartbeat(0, state="active", refused="key worker1 may not serve w")
                if isinstance(a, Log) and a.level == logging.ERROR]
    h.heartbeat(0, state="active")  # accepted again: a new refusal is said again
    assert [a for a in h.heartbeat(0, state="active", refused="again")
            if isinstance(a, Log) and a.level == logging.ERROR]
