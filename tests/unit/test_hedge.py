"""Hedged and redundant calls (the Dispatcher's rules 20-22) on a fake clock, and the client
options that ask for them (`with_options(hedge_after=..., max_attempts=...)`,
`with_options(redundant=...)`).

Every event and tick in the dispatcher tests runs the dispatcher's own bookkeeping check.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_dispatch import (
    make as _make,
)
from tests.unit.test_dispatch import (
    message,
    notices,
    ready,
    replies,
    request,
    runs,
    sends,
)
from zrpc._core._calls import H_HEDGE_MAX, CallTable
from zrpc._core._frames import H_HEDGE, H_REDUNDANT, Status, WorkerReply
from zrpc._core._proxy import MethodProxy
from zrpc.broker._core._dispatch import (
    Deactivated,
    ReplyArrived,
    WorkerLeaving,
    WorkerLost,
)
from zrpc.testing import FakeClock

HEDGE = {"hedge_after_ms": 50}


def make(**kw: Any) -> Any:
    kw.setdefault("inflight_grace", 1.0)
    return _make(**kw)


def answer(d: Any, wid: bytes, rid: int, status: int = Status.OK, body: bytes = b"res",
           client: bytes = b"c1") -> list[Any]:
    return d.handle(ReplyArrived(wid, WorkerReply(client, rid, status, body)))


def outstanding(d: Any) -> dict[bytes, int]:
    return {wid: w.outstanding for wid, w in d.workers.items()}


def two_workers(**kw: Any) -> Any:
    d, clock = make(**kw)
    ready(d, b"w1", capacity=2)
    ready(d, b"w2", capacity=2)
    return d, clock


# --- hedged calls (rules 20, 21) ---------------------------------------------------------------


def test_no_reply_by_hedge_after_sends_a_copy_elsewhere_and_the_first_reply_wins() -> None:
    d, clock = two_workers()
    (first,) = runs(request(d, 1, **HEDGE))
    clock.advance(0.049)
    assert d.tick() == []
    clock.advance(0.001)
    (copy,) = runs(d.tick())
    assert copy.worker_id != first.worker_id
    m = copy.message
    assert (m.request_id, m.headers["attempt"], m.body) == (1, 1, b"body")
    assert d.counters["hedges"] == 1
    (r,) = replies(answer(d, copy.worker_id, 1, body=b"fast"))
    assert (r.request_id, r.status, r.body) == (1, Status.OK, b"fast")
    assert outstanding(d) == {b"w1": 0, b"w2": 0}  # the slow copy's slot is freed at once
    assert answer(d, first.worker_id, 1, body=b"slow") == []  # cancelled: dropped
    assert d.counters["cancelled_replies"] == 1 and d.counters["late_replies"] == 0


def test_a_reply_before_hedge_after_sends_no_copy() -> None:
    d, clock = two_workers()
    (first,) = runs(request(d, 1, **HEDGE))
    clock.advance(0.02)
    assert [r.status for r in replies(answer(d, first.worker_id, 1))] == [Status.OK]
    clock.advance(1.0)
    assert d.tick() == [] and d.counters["hedges"] == 0


def test_the_original_copy_may_still_win() -> None:
    d, clock = two_workers()
    (first,) = runs(request(d, 1, **HEDGE))
    clock.advance(0.05)
    (copy,) = runs(d.tick())
    (r,) = replies(answer(d, first.worker_id, 1, body=b"first"))
    assert r.body == b"first"
    assert answer(d, copy.worker_id, 1) == [] and d.counters["cancelled_replies"] == 1


def test_a_non_idempotent_call_is_never_hedged() -> None:
    d, clock = two_workers()
    (s,) = runs(request(d, 1, method="charge", **HEDGE))
    assert s.message.headers["idempotent"] is False
    clock.advance(1.0)
    assert runs(d.tick()) == []
    assert d.counters["hedges_ignored"] == 1 and d.counters["hedges"] == 0
    (s,) = runs(request(d, 2, idempotent=False, **HEDGE))  # lowered by the client
    clock.advance(1.0)
    assert runs(d.tick()) == [] and d.counters["hedges_ignored"] == 2


def test_max_attempts_bounds_the_copies_each_hedge_after_the_last() -> None:
    d, clock = make()
    for w in (b"w1", b"w2", b"w3", b"w4"):
        ready(d, w, capacity=1)
    (first,) = runs(request(d, 1, max_attempts=3, **HEDGE))
    seen = [first.worker_id]
    for attempt in (1, 2):
        clock.advance(0.05)
        (copy,) = runs(d.tick())
        assert copy.message.headers["attempt"] == attempt and copy.worker_id not in seen
        seen.append(copy.worker_id)
    clock.advance(0.05)
    assert runs(d.tick()) == []  # three copies in all
    assert d.counters["hedges"] == 2
    (r,) = replies(answer(d, seen[1], 1))
    assert r.status == Status.OK
    assert [answer(d, w, 1) for w in (seen[0], seen[2])] == [[], []]
    assert d.counters["cancelled_replies"] == 2
    # without max_attempts: two copies
    (first,) = runs(request(d, 2, **HEDGE))
    clock.advance(0.05)
    assert len(runs(d.tick())) == 1
    clock.advance(0.05)
    assert runs(d.tick()) == []


def test_hedges_are_bounded_by_the_retry_budget() -> None:
    d, clock = two_workers(retry_tokens=1.0, retry_ratio=0.5)
    runs(request(d, 1, **HEDGE))  # the request adds 0.5 token, over the cap of 1
    runs(request(d, 2, **HEDGE))
    clock.advance(0.05)
    out = d.tick()
    assert len(runs(out)) == 1  # one token: one hedge
    assert d.counters["hedges"] == 1 and d.counters["hedges_skipped"] == 1


def test_with_no_free_worker_the_hedge_waits_for_one() -> None:
    d, clock = make()
    ready(d, b"w1", capacity=1)
    ready(d, b"w2", capacity=1)
    (a,) = runs(request(d, 1, **HEDGE))
    (b,) = runs(request(d, 2))  # the other worker is busy
    clock.advance(0.05)
    assert runs(d.tick()) == [] and d.counters["hedges_skipped"] == 1
    answer(d, b.worker_id, 2)  # room again
    clock.advance(0.05)
    assert runs(d.tick()) == []  # after a skip the hedge waits twice as long (rule 20)
    clock.advance(0.051)
    (copy,) = runs(d.tick())
    assert copy.worker_id == b.worker_id and copy.message.request_id == 1


def test_a_one_millisecond_hedge_that_finds_no_worker_backs_off() -> None:
    """A client asking for 1 ms must not make the broker look at the call 1,000 times a second."""
    d, clock = make()
    ready(d, b"w1", capacity=1)
    request(d, 1, hedge_after_ms=1)
    for _ in range(1000):  # one second in 1 ms steps
        clock.advance(0.001)
        d.tick()
    looks = d.counters["hedges_skipped"]
    assert 1 <= looks <= 10, looks


def test_a_lost_worker_with_a_copy_elsewhere_is_not_retried() -> None:
    d, clock = make()
    for w in (b"w1", b"w2", b"w3"):
        ready(d, w, capacity=1)
    (first,) = runs(request(d, 1, **HEDGE))
    clock.advance(0.05)
    (copy,) = runs(d.tick())
    out = d.handle(WorkerLost(first.worker_id))
    assert runs(out) == [] and replies(out) == [] and d.counters["retries"] == 0
    (r,) = replies(answer(d, copy.worker_id, 1))
    assert r.status == Status.OK
    # the last copy lost: retried as any call (rule 10)
    (first,) = runs(request(d, 2, **HEDGE))
    out = d.handle(WorkerLost(first.worker_id))
    (retry,) = runs(out)
    assert retry.message.headers["attempt"] == 1 and d.counters["retries"] == 1


def test_the_copy_lost_first_leaves_the_original_running() -> None:
    d, clock = two_workers()
    (first,) = runs(request(d, 1, **HEDGE))
    clock.advance(0.05)
    (copy,) = runs(d.tick())
    assert replies(d.handle(WorkerLost(copy.worker_id))) == []
    (r,) = replies(answer(d, first.worker_id, 1))
    assert r.status == Status.OK


def test_no_hedge_past_the_deadline_and_expiry_frees_every_copy() -> None:
    d, clock = two_workers()
    runs(request(d, 1, budget_ms=80, **HEDGE))
    clock.advance(0.05)
    assert len(runs(d.tick())) == 1
    clock.advance(0.05)
    assert runs(d.tick()) == []  # max_attempts 2, and past the deadline anyway
    clock.advance(1.0)
    (r,) = replies(d.tick())
    assert r.status == Status.TIMEOUT
    assert outstanding(d) == {b"w1": 0, b"w2": 0}


def test_a_hedge_after_longer_than_the_budget_never_fires() -> None:
    d, clock = two_workers()
    runs(request(d, 1, budget_ms=40, **HEDGE))
    clock.advance(0.05)
    assert runs(d.tick()) == [] and d.counters["hedges_skipped"] == 0


def test_nothing_is_hedged_while_deactivated() -> None:
    d, clock = two_workers()
    (first,) = runs(request(d, 1, **HEDGE))
    d.handle(Deactivated())
    clock.advance(0.05)
    assert sends(d.tick()) == []
    (r,) = replies(answer(d, first.worker_id, 1))  # in flight: still completes
    assert r.status == Status.OK


def test_a_freed_slot_takes_a_queued_call_at_once() -> None:
    """Rule 21: the cancelled copy's slot is free for dispatch as soon as the call is
    answered (the worker may run it a while longer)."""
    d, clock = make()
    ready(d, b"w1", capacity=1)
    ready(d, b"w2", capacity=1)
    (first,) = runs(request(d, 1, **HEDGE))
    clock.advance(0.05)
    (copy,) = runs(d.tick())
    assert request(d, 2) == []  # both slots taken: queued
    out = answer(d, copy.worker_id, 1)
    assert [r.request_id for r in replies(out)] == [1]
    assert sorted(s.message.request_id for s in runs(out)) == [2]


def test_a_leaving_worker_with_a_cancelled_copy_is_removed_with_the_answer() -> None:
    d, clock = two_workers()
    (first,) = runs(request(d, 1, **HEDGE))
    clock.advance(0.05)
    (copy,) = runs(d.tick())
    d.handle(WorkerLeaving(first.worker_id))
    answer(d, copy.worker_id, 1)
    assert first.worker_id not in d.workers
    assert answer(d, first.worker_id, 1) == [] and d.counters["cancelled_replies"] == 1


def test_a_retried_call_may_hedge_again_within_max_attempts() -> None:
    d, clock = make()
    for w in (b"w1", b"w2", b"w3"):
        ready(d, w, capacity=1)
    (first,) = runs(request(d, 1, max_attempts=3, **HEDGE))
    (retry,) = runs(d.handle(WorkerLost(first.worker_id)))
    clock.advance(0.05)
    (copy,) = runs(d.tick())
    assert copy.message.headers["attempt"] == 2 and copy.worker_id != retry.worker_id
    clock.advance(0.05)
    assert runs(d.tick()) == []  # three copies in all


# --- redundant calls (rules 21, 22) ------------------------------------------------------------


def test_a_redundant_call_runs_on_two_workers_and_the_first_reply_answers() -> None:
    d, clock = two_workers()
    out = request(d, 1, redundant=2)
    a, b = runs(out)
    assert {a.worker_id, b.worker_id} == {b"w1", b"w2"}
    assert [a.message.headers["attempt"], b.message.headers["attempt"]] == [0, 1]
    assert d.counters["redundant_copies"] == 1
    (r,) = replies(answer(d, b.worker_id, 1, body=b"3"))
    assert r.body == b"3"
    assert outstanding(d) == {b"w1": 0, b"w2": 0}
    assert answer(d, a.worker_id, 1, body=b"3") == []  # the same: nothing to say
    assert d.counters["cancelled_replies"] == 1 and d.counters["result_mismatches"] == 0


def test_a_different_result_raises_result_mismatch_naming_both_workers() -> None:
    d, clock = two_workers()
    a, b = runs(request(d, 7, redundant=2))
    answer(d, a.worker_id, 7, body=b"3")
    out = answer(d, b.worker_id, 7, body=b"4")
    (n,) = notices(out, "result_mismatch")
    assert replies(out) == []
    assert n.subject == "calc.add"
    assert n.detail == {"service": "calc", "method": "add",
                        "workers": [a.worker_id.decode(), b.worker_id.decode()], "request_id": 7}
    assert d.counters["result_mismatches"] == 1


@pytest.mark.parametrize(("first", "second", "mismatch"), [
    ((Status.OK, b"3"), (Status.ERROR, b"e"), True),
    ((Status.ERROR, b"e1"), (Status.OK, b"3"), True),
    ((Status.ERROR, b"trace 1"), (Status.ERROR, b"trace 2"), False),  # an error's text may differ
    ((Status.OK, b"3"), (Status.TIMEOUT, b"t"), False),  # the copy did not run it
    ((Status.NOT_ACTIVE, b"n"), (Status.OK, b"3"), False),
    ((Status.OK, b"3"), (Status.NOT_ACTIVE, b"n"), False),
])
def test_what_is_compared(first: tuple[int, bytes], second: tuple[int, bytes], mismatch: bool) -> None:
    d, clock = two_workers()
    a, b = runs(request(d, 1, redundant=2))
    (r,) = replies(answer(d, a.worker_id, 1, *first))
    assert r.status == first[0]
    assert bool(notices(answer(d, b.worker_id, 1, *second), "result_mismatch")) is mismatch


def test_every_later_copy_is_compared_with_the_first() -> None:
    d, clock = make()
    for w in (b"w1", b"w2", b"w3"):
        ready(d, w, capacity=1)
    a, b, c = runs(request(d, 1, redundant=3))
    answer(d, a.worker_id, 1, body=b"3")
    assert notices(answer(d, b.worker_id, 1, body=b"3"), "result_mismatch") == []
    (n,) = notices(answer(d, c.worker_id, 1, body=b"9"), "result_mismatch")
    assert n.detail["workers"] == [a.worker_id.decode(), c.worker_id.decode()]
    assert answer(d, c.worker_id, 1, body=b"9") == []  # once per copy
    assert d.counters["late_replies"] == 1


def test_a_redundant_non_idempotent_call_is_refused_and_never_runs() -> None:
    d, clock = two_workers()
    out = request(d, 1, method="charge", redundant=2)
    (r,) = replies(out)
    assert sends(out) == [] and r.status == Status.PROTOCOL_ERROR
    assert "not idempotent" in message(r) and "calc.charge" in message(r)
    out = request(d, 2, idempotent=False, redundant=2)
    assert sends(out) == [] and replies(out)[0].status == Status.PROTOCOL_ERROR
    assert d.counters["copies_refused"] == 2


def test_a_queued_redundant_call_is_judged_when_it_leaves_the_queue() -> None:
    d, clock = make()
    assert request(d, 1, method="charge", redundant=2) == []  # no worker yet: queued
    assert request(d, 2, redundant=2) == []
    out = ready(d, b"w1", capacity=2) + ready(d, b"w2", capacity=2)
    (r,) = replies(out)
    assert (r.request_id, r.status) == (1, Status.PROTOCOL_ERROR)
    assert [s.message.request_id for s in runs(out)] == [2]  # w2 was not there yet for a copy
    assert d.counters["redundant_short"] == 1


def test_fewer_workers_than_asked_run_as_many_as_there_are() -> None:
    d, clock = two_workers()
    assert len(runs(request(d, 1, redundant=3))) == 2
    assert d.counters["redundant_short"] == 1
    d, clock = make()
    ready(d, b"w1", capacity=4)
    (s,) = runs(request(d, 1, redundant=2))  # one worker, however many slots
    (r,) = replies(answer(d, s.worker_id, 1))
    assert r.status == Status.OK and d.counters["redundant_short"] == 1


def test_redundant_copies_are_bounded_by_the_retry_budget() -> None:
    d, clock = two_workers(retry_tokens=1.0, retry_ratio=0.0)
    assert len(runs(request(d, 1, redundant=2))) == 2
    assert len(runs(request(d, 2, redundant=2))) == 1  # no token left
    assert d.counters["redundant_short"] == 1


def test_redundant_wins_over_hedged() -> None:
    d, clock = make()
    for w in (b"w1", b"w2", b"w3"):
        ready(d, w, capacity=1)
    assert len(runs(request(d, 1, redundant=2, **HEDGE))) == 2
    clock.advance(0.05)
    assert runs(d.tick()) == [] and d.counters["hedges"] == 0


def test_a_lost_worker_of_a_redundant_call_leaves_the_other_copy() -> None:
    d, clock = two_workers()
    a, b = runs(request(d, 1, redundant=2))
    assert replies(d.handle(WorkerLost(a.worker_id))) == []
    (r,) = replies(answer(d, b.worker_id, 1))
    assert r.status == Status.OK


@pytest.mark.parametrize("headers", [
    {"redundant": "2"}, {"redundant": 9}, {"redundant": True}, {"redundant": 0},
    {"hedge_after_ms": 0}, {"hedge_after_ms": 0.5}, {"hedge_after_ms": -1},
    {"hedge_after_ms": 50, "max_attempts": 6}, {"hedge_after_ms": 50, "max_attempts": "2"},
])
def test_malformed_copy_headers_are_a_protocol_error(headers: dict[str, Any]) -> None:
    d, clock = two_workers()
    out = request(d, 1, **headers)
    (r,) = replies(out)
    assert sends(out) == [] and r.status == Status.PROTOCOL_ERROR
    assert d.counters["copies_refused"] == 1


def test_cancelled_copies_are_forgotten_at_the_deadline_and_bounded() -> None:
    d, clock = two_workers(recent_limit=3)
    a, b = runs(request(d, 1, redundant=2, budget_ms=100))
    answer(d, a.worker_id, 1)
    clock.advance(0.1 + 1.0)  # deadline and in-flight grace
    d.tick()
    assert d._copies_out == {}
    assert answer(d, b.worker_id, 1, body=b"other") == []  # a late reply now
    assert d.counters["late_replies"] == 1 and d.counters["result_mismatches"] == 0
    for rid in range(10, 20):
        a, b = runs(request(d, rid, redundant=2))
        answer(d, a.worker_id, rid)
    assert len(d._copies_out) == 3


def test_a_redundant_call_answered_not_active_by_a_worker() -> None:
    d, clock = two_workers()
    a, b = runs(request(d, 1, redundant=2))
    (r,) = replies(answer(d, a.worker_id, 1, Status.NOT_ACTIVE, b"n"))
    assert r.status == Status.NOT_ACTIVE and d.counters["not_active_calls"] == 1


# --- client options ----------------------------------------------------------------------------


class Recorder:
    """A client as a proxy sees it: it records what it is asked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def _invoke(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                **options: Any) -> Any:
        self.calls.append(options)
        return None

    def _submit(self, service: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None = None, idempotent: bool | None = None,
                trace_id: str | None = None, **options: Any) -> Any:
        self.calls.append(options)
        return None


def proxy() -> tuple[Recorder, MethodProxy]:
    rec = Recorder()
    return rec, MethodProxy(rec, "calc", "add")


def test_with_options_passes_hedging_and_redundancy_to_the_client() -> None:
    rec, p = proxy()
    p.with_options(hedge_after=0.05, max_attempts=3)(1, 2)
    p.with_options(redundant=2).future(1, 2)
    p.with_options(timeout=1.0).with_options(hedge_after=0.1)(1)
    assert rec.calls == [{"hedge_after": 0.05, "max_attempts": 3}, {"redundant": 2},
                         {"timeout": 1.0, "hedge_after": 0.1}]
    p.with_options(redundant=2).with_options(hedge_after=0.1)()  # the later one replaces
    p.with_options(hedge_after=0.1, max_attempts=2).with_options(redundant=3)()
    assert rec.calls[3:] == [{"hedge_after": 0.1}, {"redundant": 3}]


@pytest.mark.parametrize(("options", "match"), [
    ({"hedge_after": 0}, "positive"),
    ({"hedge_after": -0.1}, "positive"),
    ({"hedge_after": True}, "positive"),
    ({"hedge_after": "0.05"}, "positive"),
    ({"hedge_after": 0.5, "timeout": 0.5}, "less than the call's timeout"),
    ({"hedge_after": 0.05, "max_attempts": 1}, "2 to 5"),
    ({"hedge_after": 0.05, "max_attempts": 6}, "2 to 5"),
    ({"hedge_after": 0.05, "max_attempts": 2.0}, "2 to 5"),
    ({"max_attempts": 2}, "needs hedge_after"),
    ({"redundant": 1}, "2 to 5"),
    ({"redundant": 6}, "2 to 5"),
])
def test_with_options_checks_hedging_and_redundancy(options: dict[str, Any], match: str) -> None:
    _, p = proxy()
    with pytest.raises(ValueError, match=match):
        p.with_options(**options)


def test_prepare_sends_them_as_headers() -> None:
    t = CallTable(FakeClock(), 10.0)
    h = t.prepare("calc", "add", (), {}, None, hedge_after=0.05, max_attempts=3).headers
    assert (h[H_HEDGE], h[H_HEDGE_MAX]) == (50, 3) and H_REDUNDANT not in h
    h = t.prepare("calc", "add", (), {}, None, hedge_after=0.0001).headers
    assert h[H_HEDGE] == 1 and H_HEDGE_MAX not in h  # at least a millisecond; 2 copies
    h = t.prepare("calc", "add", (), {}, None, redundant=2).headers
    assert h[H_REDUNDANT] == 2 and H_HEDGE not in h
    h = t.prepare("calc", "add", (), {}, None).headers
    assert not {H_HEDGE, H_HEDGE_MAX, H_REDUNDANT} & set(h)


def test_prepare_checks_the_hedge_against_the_clients_timeout() -> None:
    t = CallTable(FakeClock(), 0.05)
    with pytest.raises(ValueError, match="less than the call's timeout"):
        t.prepare("calc", "add", (), {}, None, hedge_after=0.05)
    with pytest.raises(ValueError, match="exclude each other"):
        t.prepare("calc", "add", (), {}, None, timeout=1.0, hedge_after=0.05, redundant=2)
    # a shorter deadline (inherited from an outer call): the hedge could never go; dropped
    h = t.prepare("calc", "add", (), {}, None, timeout=0.01, hedge_after=0.02, max_attempts=3).headers
    assert not {H_HEDGE, H_HEDGE_MAX} & set(h)
