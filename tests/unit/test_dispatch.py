"""Dispatcher rules on a fake clock: no sockets, no sleeps.

Every event and tick in these tests also runs the dispatcher's own bookkeeping check
(`Dispatcher._check`): counters never negative, queue gauges equal to what is queued.
"""

import inspect
import itertools
import random
import re

import pytest

import zrpc.broker._core._dispatch as dispatch_module
from zrpc._core._frames import ClientRequest, Ready, Status, WorkerReply
from zrpc._core._serial import unpack_error
from zrpc.broker._core._dispatch import (
    AckLeave,
    Activated,
    CallState,
    Deactivated,
    Dispatcher,
    Notice,
    ReplyArrived,
    ReplyToClient,
    RequestArrived,
    SendToWorker,
    WorkerLeaving,
    WorkerLost,
    WorkerReady,
)
from zrpc.testing import FakeClock

METHODS = {"calc": {"add": True, "charge": False}}
HORIZON = 10.0  # the default probe horizon: max(default_timeout, 10 s)


class Checked(Dispatcher):
    """A Dispatcher that checks its invariants after every event and tick."""

    def handle(self, event):
        out = super().handle(event)
        self._check()
        return out

    def tick(self):
        out = super().tick()
        self._check()
        return out


def make(checked=True, **kw):
    clock = FakeClock()
    kw.setdefault("service_grace", 1.0)
    d = (Checked if checked else Dispatcher)(clock, **kw)
    return d, clock


def ready(d, wid, capacity=2, services=None, weight=1.0):
    return d.handle(WorkerReady(wid, Ready(wid.decode(), services or METHODS, capacity, weight)))


def request(d, rid, method="add", service="calc", client=b"c1", body=b"body", **headers):
    headers.setdefault("budget_ms", 5000)
    return d.handle(RequestArrived(client, ClientRequest(rid, service, method, headers, body)))


def reply(d, wid, rid, client=b"c1", status=Status.OK):
    return d.handle(ReplyArrived(wid, WorkerReply(client, rid, status, b"res")))


def sends(actions):
    return [a for a in actions if isinstance(a, SendToWorker)]


def runs(actions):
    """Real dispatches, probes left out."""
    return [s for s in sends(actions) if not s.message.headers.get("probe")]


def probes(actions):
    return [s for s in sends(actions) if s.message.headers.get("probe")]


def replies(actions):
    return [a for a in actions if isinstance(a, ReplyToClient)]


def notices(actions, name):
    return [a for a in actions if isinstance(a, Notice) and a.name == name]


def message(r):
    return unpack_error(r.body)["message"]


def test_least_outstanding_spreads_and_ties_rotate():
    d, _ = make()
    for w in (b"w1", b"w2", b"w3"):
        ready(d, w, capacity=4)
    targets = [sends(request(d, i))[0].worker_id for i in range(6)]
    assert sorted(targets) == [b"w1", b"w1", b"w2", b"w2", b"w3", b"w3"]
    assert set(targets[:3]) == {b"w1", b"w2", b"w3"}


def test_least_outstanding_is_relative_to_capacity():
    d, _ = make()
    ready(d, b"big", capacity=8)
    ready(d, b"small", capacity=1)
    targets = [sends(request(d, i))[0].worker_id for i in range(9)]
    assert targets.count(b"small") == 1 and targets.count(b"big") == 8


def test_forwarded_request_carries_remaining_budget_and_flags():
    d, clock = make()
    ready(d, b"w1")
    clock.advance(0.1)
    (send,) = sends(request(d, 1, budget_ms=2000, trace_id="t"))
    m = send.message
    assert (m.client_id, m.request_id, m.service, m.method, m.body) == (b"c1", 1, "calc", "add", b"body")
    assert m.headers["budget_ms"] == 2000 and m.headers["idempotent"] is True
    assert m.headers["attempt"] == 0 and m.headers["trace_id"] == "t"


def test_full_workers_queue_then_drain_on_reply():
    d, clock = make()
    ready(d, b"w1", capacity=1)
    assert sends(request(d, 1))
    assert request(d, 2) == []  # queued
    clock.advance(0.01)
    out = reply(d, b"w1", 1)
    assert [r.request_id for r in replies(out)] == [1]
    assert [s.message.request_id for s in sends(out)] == [2]
    assert d.snapshot()["services"][0]["queued"] == 0


def test_full_queue_answers_overloaded_at_once():
    d, _ = make(queue_limit=2)
    ready(d, b"w1", capacity=1)
    request(d, 1)
    assert request(d, 2) == [] and request(d, 3) == []
    (r,) = replies(request(d, 4))
    assert r.status == Status.OVERLOADED and r.request_id == 4


def test_queued_call_times_out_at_its_deadline():
    d, clock = make()
    ready(d, b"w1", capacity=1)
    request(d, 1)
    request(d, 2, budget_ms=300)
    assert d.next_deadline() == pytest.approx(clock() + 0.3)
    clock.advance(0.299)
    assert d.tick() == []
    clock.advance(0.002)
    (r,) = replies(d.tick())
    assert (r.request_id, r.status) == (2, Status.TIMEOUT)
    # the expired call is not dispatched later
    assert sends(reply(d, b"w1", 1)) == []


def test_expired_budget_is_answered_timeout():
    d, _ = make()
    ready(d, b"w1")
    (r,) = replies(request(d, 1, budget_ms=0))
    assert r.status == Status.TIMEOUT


def test_unknown_service_waits_for_grace_then_unavailable():
    d, clock = make(service_grace=1.0)
    assert request(d, 1, service="late") == []  # broker just started: a worker may register
    clock.advance(1.0)
    (r,) = replies(d.tick())
    assert r.status == Status.SERVICE_UNAVAILABLE
    # long after start, an unknown service is answered at once
    (r,) = replies(request(d, 2, service="nope"))
    assert r.status == Status.SERVICE_UNAVAILABLE


def test_startup_grace_is_not_stretched_by_a_later_request():
    d, clock = make(service_grace=1.0)
    clock.advance(0.9)
    assert request(d, 1, service="late") == []
    clock.advance(0.1)  # one second after the broker started
    (r,) = replies(d.tick())
    assert (r.request_id, r.status) == (1, Status.SERVICE_UNAVAILABLE)


def test_worker_registering_during_grace_gets_the_queued_call():
    d, clock = make(service_grace=1.0)
    request(d, 1, service="late", method="go")
    clock.advance(0.5)
    out = ready(d, b"w1", services={"late": {"go": True}})
    assert [s.message.request_id for s in sends(out)] == [1]


def test_calls_queued_in_grace_wait_for_their_deadline_once_a_worker_serves():
    d, clock = make(service_grace=1.0)
    for i in range(3):
        request(d, i, service="late", method="go", budget_ms=5000)
    clock.advance(0.5)
    ready(d, b"w1", capacity=1, services={"late": {"go": True}})  # takes one, two wait
    clock.advance(1.0)  # the grace is over, the deadline is not
    assert replies(d.tick()) == []
    assert d.snapshot()["services"][0]["queued"] == 2
    clock.advance(3.6)
    assert sorted(r.status for r in replies(d.tick())) == [Status.TIMEOUT, Status.TIMEOUT]


def test_unknown_method_is_answered_by_the_broker():
    d, _ = make()
    ready(d, b"w1")
    (r,) = replies(request(d, 1, method="nope"))
    assert r.status == Status.METHOD_NOT_FOUND


def test_lost_worker_idempotent_calls_retry_elsewhere_with_next_attempt():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    ready(d, b"w2", capacity=1)
    first = sends(request(d, 1))[0].worker_id
    other = b"w2" if first == b"w1" else b"w1"
    out = d.handle(WorkerLost(first))
    assert any(isinstance(a, Notice) and a.name == "worker_lost" for a in out)
    (s,) = sends(out)
    assert s.worker_id == other and s.message.request_id == 1 and s.message.headers["attempt"] == 1
    assert replies(reply(d, other, 1))[0].status == Status.OK


def test_lost_worker_non_idempotent_call_is_state_unknown():
    d, _ = make()
    ready(d, b"w1")
    ready(d, b"w2")
    request(d, 1, method="charge")
    target = d.snapshot()["workers"]
    lost = next(bytes.fromhex(w["id"]) for w in target if w["outstanding"])
    (r,) = replies(d.handle(WorkerLost(lost)))
    assert r.status == Status.CALL_STATE_UNKNOWN


def test_retry_waits_in_queue_when_no_worker_is_free():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    request(d, 1)
    out = d.handle(WorkerLost(b"w1"))
    assert sends(out) == [] and replies(out) == []
    (s,) = sends(ready(d, b"w3"))
    assert s.message.request_id == 1 and s.message.headers["attempt"] == 1


def test_retry_budget_stops_a_retry_storm():
    d, _ = make(retry_tokens=1, retry_ratio=0.0)
    ready(d, b"w1", capacity=3)
    ready(d, b"spare", capacity=1, services={"other": {"x": True}})
    for i in range(3):
        request(d, i)
    out = d.handle(WorkerLost(b"w1"))
    statuses = sorted(r.status for r in replies(out))
    assert statuses == [Status.SERVICE_UNAVAILABLE, Status.SERVICE_UNAVAILABLE]
    assert d.counters["retries"] == 1


def test_attempts_are_bounded():
    d, _ = make(max_attempts=2)
    ready(d, b"w1")
    request(d, 1, attempt=1)
    (r,) = replies(d.handle(WorkerLost(b"w1")))
    assert r.status == Status.SERVICE_UNAVAILABLE


def test_leaving_worker_finishes_in_flight_and_gets_nothing_new():
    d, _ = make()
    ready(d, b"w1", capacity=2)
    ready(d, b"w2", capacity=2)
    request(d, 1)  # goes to one of them
    busy = next(bytes.fromhex(w["id"]) for w in d.snapshot()["workers"] if w["outstanding"])
    out = d.handle(WorkerLeaving(busy))
    assert AckLeave(busy) in out
    for i in range(2, 6):
        for s in sends(request(d, i)):
            assert s.worker_id != busy
    assert replies(reply(d, busy, 1))[0].request_id == 1
    assert not d.has_worker(busy)


def test_duplicate_request_is_ignored_and_late_reply_dropped():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    ready(d, b"w2", capacity=1)
    first = sends(request(d, 1))[0].worker_id
    assert request(d, 1) == []
    assert d.counters["duplicates"] == 1
    other = b"w2" if first == b"w1" else b"w1"
    d.handle(WorkerLost(first))
    assert replies(reply(d, other, 1))
    # the lost worker comes back (SIGCONT) and replies too: the client must not hear twice
    ready(d, first, capacity=1)
    assert replies(reply(d, first, 1)) == []
    assert d.counters["late_replies"] == 1
    assert d.counters["foreign_replies"] == 0  # it was given that call: late, not foreign


def test_reready_keeps_in_flight_and_updates_capacity():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    request(d, 1)
    ready(d, b"w1", capacity=3)
    assert len(sends(request(d, 2))) == 1
    assert replies(reply(d, b"w1", 1))


# --- strategies: each test holds only for the strategy it names -------------------------------


def targets_of(d, n, on_send=None):
    out = []
    for i in range(n):
        (s,) = sends(request(d, i, budget_ms=60_000))
        out.append(s.worker_id)
        if on_send is not None:
            on_send(s)
    return out


@pytest.mark.parametrize("lb", ["least-outstanding", "round-robin", "random", "weighted", "p2c-ewma"])
def test_every_strategy_dispatches_within_capacity(lb):
    d, _ = make(strategy=lb, queue_limit=100)
    ready(d, b"w1", capacity=2, weight=3.0)
    ready(d, b"w2", capacity=2, weight=1.0)
    sent = sum(len(sends(request(d, i))) for i in range(10))
    assert sent == 4
    assert d.snapshot()["services"][0]["queued"] == 6


def test_least_outstanding_follows_capacity_not_turns():
    # 30 and 10 slots: load relative to capacity gives 3:1, turns or weights would give 1:1
    d, _ = make(strategy="least-outstanding")
    ready(d, b"big", capacity=30)
    ready(d, b"small", capacity=10)
    t = targets_of(d, 20)
    assert (t.count(b"big"), t.count(b"small")) == (15, 5)


def test_round_robin_takes_turns_whatever_the_load():
    d, _ = make(strategy="round-robin")
    ready(d, b"big", capacity=30, weight=3.0)
    ready(d, b"small", capacity=10, weight=1.0)
    t = targets_of(d, 20)
    assert all(a != b for a, b in itertools.pairwise(t))  # strictly alternating
    assert (t.count(b"big"), t.count(b"small")) == (10, 10)


def test_weighted_follows_the_announced_weights():
    # every call answered at once: outstanding stays 0, so only the weights can tell them apart
    d, clock = make(strategy="weighted")
    ready(d, b"heavy", capacity=100, weight=3.0)
    ready(d, b"light", capacity=100, weight=1.0)

    def answer(s):
        clock.advance(0.001)
        reply(d, s.worker_id, s.message.request_id)

    t = targets_of(d, 100, answer)
    assert (t.count(b"heavy"), t.count(b"light")) == (75, 25)


def test_p2c_ewma_shuns_the_slow_worker():
    d, clock = make(strategy="p2c-ewma")
    ready(d, b"slow", capacity=100)
    ready(d, b"fast", capacity=100)

    def answer(s):
        clock.advance(0.2 if s.worker_id == b"slow" else 0.0001)
        reply(d, s.worker_id, s.message.request_id)

    t = targets_of(d, 40, answer)
    assert t[10:] == [b"fast"] * 30  # once measured, the fast one wins every draw of two


def test_random_strays_from_an_even_split():
    # every other strategy keeps two equal workers within one call of each other
    d, _ = make(strategy="random")
    ready(d, b"w1", capacity=1000)
    ready(d, b"w2", capacity=1000)
    t = targets_of(d, 200)
    gaps = [abs(t[:i].count(b"w1") - t[:i].count(b"w2")) for i in range(1, len(t) + 1)]
    assert max(gaps) > 2
    assert {b"w1", b"w2"} == set(t)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        Dispatcher(FakeClock(), strategy="nope")


# --- re-sent calls after a broker failover ----------------------------------------------------


def settled(**kw):
    """Two workers registered long enough ago that this broker's view of them is complete."""
    d, clock = make(**kw)
    ready(d, b"w1")
    ready(d, b"w2")
    clock.advance(HORIZON + 0.5)
    return d, clock


def test_resent_non_idempotent_call_probes_every_worker_first():
    d, _ = settled()
    out = request(d, 7, method="charge", resent=True)
    ps = probes(out)
    assert sorted(s.worker_id for s in ps) == [b"w1", b"w2"] and runs(out) == []
    assert reply(d, b"w1", 7, status=Status.NOT_SEEN) == []
    (run,) = runs(reply(d, b"w2", 7, status=Status.NOT_SEEN))  # nobody ran it: run it once
    assert run.message.body == b"body"
    assert replies(reply(d, run.worker_id, 7))[0].status == Status.OK


def test_a_cluster_member_never_runs_a_resent_call_on_not_seen_alone():
    """The member the client left may be up, holding the call in its queue: at most once."""
    d, _ = settled(run_unseen=False)
    out = request(d, 7, method="charge", resent=True)
    assert len(probes(out)) == 2 and runs(out) == []
    assert reply(d, b"w1", 7, status=Status.NOT_SEEN) == []
    out = reply(d, b"w2", 7, status=Status.NOT_SEEN)
    (r,) = replies(out)
    assert runs(out) == [] and r.status == Status.CALL_STATE_UNKNOWN and d.inflight == 0
    out = request(d, 8, method="charge", resent=True)  # one that ran somewhere: its answer
    (r,) = replies(reply(d, b"w1", 8, status=Status.OK))
    assert r.status == Status.OK


def test_probes_carry_no_body():
    d, _ = settled()
    out = request(d, 7, method="charge", resent=True, body=b"x" * 100_000)
    assert len(probes(out)) == 2 and all(s.message.body == b"" for s in probes(out))


def test_resent_call_that_already_ran_is_answered_from_the_worker_cache():
    d, _ = make()
    ready(d, b"w1")
    ready(d, b"w2")
    request(d, 7, method="charge", resent=True)
    (r,) = replies(reply(d, b"w2", 7, status=Status.OK))
    assert r.status == Status.OK
    assert replies(reply(d, b"w1", 7, status=Status.NOT_SEEN)) == []
    assert d.inflight == 0


def test_probed_worker_lost_makes_the_call_state_unknown():
    d, _ = settled()
    request(d, 7, method="charge", resent=True)
    reply(d, b"w1", 7, status=Status.NOT_SEEN)
    (r,) = replies(d.handle(WorkerLost(b"w2")))
    assert r.status == Status.CALL_STATE_UNKNOWN


def test_probe_times_out_at_the_deadline():
    d, clock = make()
    ready(d, b"w1")
    request(d, 7, method="charge", resent=True, budget_ms=200)
    clock.advance(0.3)
    (r,) = replies(d.tick())
    assert r.status == Status.TIMEOUT


def test_resent_idempotent_call_is_simply_dispatched():
    d, _ = make()
    ready(d, b"w1")
    (s,) = sends(request(d, 7, resent=True))
    assert not s.message.headers.get("probe")


def test_resent_call_in_the_grace_of_a_restarted_broker_is_probed_not_run():
    # a lone broker restarted: no worker yet, the call re-sent by a client that lost the
    # broker it first sent it to. The first worker to register may be the one that ran it.
    d, clock = make(service_grace=1.0)
    assert request(d, 7, method="charge", resent=True) == []  # waits for a worker
    clock.advance(0.3)
    out = ready(d, b"w1")
    assert runs(out) == [] and [s.worker_id for s in probes(out)] == [b"w1"]
    (r,) = replies(reply(d, b"w1", 7, status=Status.NOT_SEEN))
    # the broker has just started: a worker still reconnecting could have run it
    assert r.status == Status.CALL_STATE_UNKNOWN
    assert "cannot tell whether it already ran" in message(r)


def test_resent_call_in_grace_still_answered_from_a_worker_cache():
    d, clock = make(service_grace=1.0)
    request(d, 7, method="charge", resent=True)
    clock.advance(0.3)
    ready(d, b"w1")
    (r,) = replies(reply(d, b"w1", 7, status=Status.OK))
    assert r.status == Status.OK and r.body == b"res"


def test_probe_right_after_start_cannot_decide():
    d, _ = make()
    ready(d, b"w1")
    ready(d, b"w2")
    request(d, 7, method="charge", resent=True)
    reply(d, b"w1", 7, status=Status.NOT_SEEN)
    (r,) = replies(reply(d, b"w2", 7, status=Status.NOT_SEEN))
    assert r.status == Status.CALL_STATE_UNKNOWN
    assert d.counters["state_unknown"] == 1


def test_probe_soon_after_a_worker_was_lost_cannot_decide():
    # the lost worker may be reconnecting (backoff up to 8 s) with the call in its cache
    d, clock = settled()
    ready(d, b"w3")
    clock.advance(HORIZON + 0.5)
    d.handle(WorkerLost(b"w3"))
    clock.advance(5.0)
    request(d, 7, method="charge", resent=True)
    reply(d, b"w1", 7, status=Status.NOT_SEEN)
    (r,) = replies(reply(d, b"w2", 7, status=Status.NOT_SEEN))
    assert r.status == Status.CALL_STATE_UNKNOWN
    clock.advance(HORIZON)  # long after the loss, the view is whole again
    request(d, 8, method="charge", resent=True)
    reply(d, b"w1", 8, status=Status.NOT_SEEN)
    assert len(runs(reply(d, b"w2", 8, status=Status.NOT_SEEN))) == 1


def test_probe_soon_after_a_worker_joined_cannot_decide():
    d, clock = settled()
    clock.advance(1.0)
    ready(d, b"w3")  # just registered: it may have run the call for the other broker
    clock.advance(1.0)
    request(d, 7, method="charge", resent=True)
    for w in (b"w1", b"w2"):
        out = reply(d, w, 7, status=Status.NOT_SEEN)
    (r,) = replies(reply(d, b"w3", 7, status=Status.NOT_SEEN))
    assert r.status == Status.CALL_STATE_UNKNOWN and runs(out) == []


def test_worker_joining_mid_probe_is_asked_too_and_makes_it_undecidable():
    d, _ = settled()
    request(d, 7, method="charge", resent=True)
    out = ready(d, b"w3")
    assert [s.worker_id for s in probes(out)] == [b"w3"]
    reply(d, b"w1", 7, status=Status.NOT_SEEN)
    reply(d, b"w2", 7, status=Status.NOT_SEEN)
    (r,) = replies(reply(d, b"w3", 7, status=Status.NOT_SEEN))
    assert r.status == Status.CALL_STATE_UNKNOWN


def test_worker_joining_mid_probe_can_still_answer_from_its_cache():
    d, _ = settled()
    request(d, 7, method="charge", resent=True)
    ready(d, b"w3")
    reply(d, b"w1", 7, status=Status.NOT_SEEN)
    (r,) = replies(reply(d, b"w3", 7, status=Status.OK))
    assert r.status == Status.OK


def test_probe_horizon_is_a_parameter_and_follows_the_default_timeout():
    d, clock = make(probe_horizon=30.0)
    ready(d, b"w1")
    clock.advance(HORIZON + 0.5)
    request(d, 7, method="charge", resent=True)
    assert replies(reply(d, b"w1", 7, status=Status.NOT_SEEN))[0].status == Status.CALL_STATE_UNKNOWN
    clock.advance(20.0)
    request(d, 8, method="charge", resent=True)
    assert len(runs(reply(d, b"w1", 8, status=Status.NOT_SEEN))) == 1

    d, clock = make(default_timeout=20.0)  # calls may live 20 s: so must the view
    ready(d, b"w1")
    clock.advance(15.0)
    request(d, 7, method="charge", resent=True)
    assert replies(reply(d, b"w1", 7, status=Status.NOT_SEEN))[0].status == Status.CALL_STATE_UNKNOWN


def test_reenqueue_refused_after_probing_answers_once():
    d, clock = make(queue_limit=1)
    ready(d, b"w1", capacity=1)
    clock.advance(HORIZON + 0.5)
    request(d, 1, budget_ms=60_000)  # runs
    request(d, 2, budget_ms=60_000)  # fills the queue
    request(d, 3, method="charge", resent=True, budget_ms=1000)
    (r,) = replies(reply(d, b"w1", 3, status=Status.NOT_SEEN))  # never ran: but no room
    assert r.status == Status.OVERLOADED
    clock.advance(1.5)
    assert replies(d.tick()) == []  # answered once, not again at its deadline
    snap = d.snapshot()
    assert snap["services"][0]["queued"] == 1 and snap["queued_bytes"] == len(b"body")


def test_non_idempotent_duplicate_of_an_answered_call_is_not_rerun():
    d, _ = make()
    ready(d, b"w1")
    request(d, 7, method="charge")
    reply(d, b"w1", 7)
    (r,) = replies(request(d, 7, method="charge"))
    assert r.status == Status.CALL_STATE_UNKNOWN
    # an idempotent one is simply run again
    request(d, 8)
    reply(d, b"w1", 8)
    assert sends(request(d, 8))


def test_non_idempotent_duplicate_queued_in_grace_is_not_rerun():
    d, _ = make(service_grace=1.0)
    ready(d, b"w1")
    request(d, 7, method="charge")
    reply(d, b"w1", 7)
    d.handle(WorkerLost(b"w1"))  # the service is empty: calls wait for a worker
    assert replies(request(d, 7, method="charge"))[0].status == Status.CALL_STATE_UNKNOWN


# --- idempotency: the worker's word, which a client may only lower -----------------------------


def test_client_cannot_make_a_non_idempotent_method_idempotent():
    d, _ = make()
    ready(d, b"w1")
    ready(d, b"w2")
    (s,) = sends(request(d, 1, method="charge", idempotent=True))
    assert s.message.headers["idempotent"] is False
    (r,) = replies(d.handle(WorkerLost(s.worker_id)))  # not retried elsewhere
    assert r.status == Status.CALL_STATE_UNKNOWN


def test_client_can_make_an_idempotent_method_non_idempotent():
    d, _ = make()
    ready(d, b"w1")
    ready(d, b"w2")
    (s,) = sends(request(d, 1, method="add", idempotent=False))
    assert s.message.headers["idempotent"] is False
    (r,) = replies(d.handle(WorkerLost(s.worker_id)))
    assert r.status == Status.CALL_STATE_UNKNOWN


def test_resent_call_claiming_idempotency_is_still_probed():
    d, _ = settled()
    out = request(d, 1, method="charge", idempotent=True, resent=True)
    assert runs(out) == [] and len(probes(out)) == 2


def test_one_worker_saying_non_idempotent_is_enough():
    d, _ = make()
    ready(d, b"w1", services={"calc": {"add": True}})
    ready(d, b"w2", services={"calc": {"add": False}})
    ready(d, b"w1", services={"calc": {"add": True}})  # re-announced: still not idempotent
    (s,) = sends(request(d, 1))
    assert s.message.headers["idempotent"] is False


def test_method_unknown_when_queued_takes_the_flag_announced_later():
    d, _ = make(service_grace=1.0)
    request(d, 1, method="charge", idempotent=True)  # no worker yet: not known
    request(d, 2, method="add")
    out = ready(d, b"w1", capacity=4)
    flags = {s.message.request_id: s.message.headers["idempotent"] for s in sends(out)}
    assert flags == {1: False, 2: True}


# --- replies ------------------------------------------------------------------------------------


def test_reply_for_unknown_call_is_dropped_and_counted():
    d, _ = make()
    ready(d, b"w1")
    assert replies(reply(d, b"w1", 99, client=b"cX")) == []
    assert d.counters["orphan_replies"] == 1 and d.counters["foreign_replies"] == 1


def test_a_worker_cannot_answer_a_call_it_was_not_given():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    ready(d, b"w2", capacity=1)
    (s,) = sends(request(d, 1))
    other = b"w2" if s.worker_id == b"w1" else b"w1"
    assert replies(reply(d, other, 1)) == []
    assert replies(reply(d, b"stranger", 1)) == []  # not even registered
    assert d.counters["foreign_replies"] == 2
    (r,) = replies(reply(d, s.worker_id, 1))
    assert r.status == Status.OK
    assert replies(reply(d, other, 1)) == []  # answered: still not its call
    assert d.counters["foreign_replies"] == 3 and d.counters["late_replies"] == 0


def test_a_worker_not_probed_cannot_settle_a_probe():
    d, _ = settled()
    ready(d, b"other", services={"misc": {"x": True}})
    request(d, 7, method="charge", resent=True)
    assert replies(reply(d, b"other", 7)) == []
    assert d.counters["foreign_replies"] == 1
    reply(d, b"w1", 7, status=Status.NOT_SEEN)
    assert len(runs(reply(d, b"w2", 7, status=Status.NOT_SEEN))) == 1


def test_undefined_status_from_a_worker_is_answered_protocol_error():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    request(d, 1)
    request(d, 2)  # queued behind it
    out = reply(d, b"w1", 1, status=42)
    (r,) = replies(out)
    assert r.status == Status.PROTOCOL_ERROR
    assert message(r) == "worker sent undefined status 42"
    assert [s.message.request_id for s in sends(out)] == [2]  # its slot is free again


def test_not_seen_for_a_call_that_was_sent_to_run_is_a_protocol_error():
    d, _ = make()
    ready(d, b"w1")
    request(d, 1)
    (r,) = replies(reply(d, b"w1", 1, status=Status.NOT_SEEN))
    assert r.status == Status.PROTOCOL_ERROR


def test_undefined_status_answering_a_probe_settles_it_as_protocol_error():
    d, _ = settled()
    request(d, 7, method="charge", resent=True)
    (r,) = replies(reply(d, b"w1", 7, status=200))
    assert r.status == Status.PROTOCOL_ERROR
    assert runs(reply(d, b"w2", 7, status=Status.NOT_SEEN)) == []


# --- in-flight calls expire too ------------------------------------------------------------------


def test_inflight_call_expires_after_its_deadline_and_frees_the_slot():
    # the reply may never come: too large for the socket, dropped by a full pipe or the worker
    d, clock = make(inflight_grace=2.0)
    ready(d, b"w1", capacity=1)
    request(d, 1, budget_ms=1000)
    request(d, 2, budget_ms=60_000)  # waits for the slot
    assert d.next_deadline() == pytest.approx(clock() + 3.0)
    clock.advance(2.99)
    assert d.tick() == []  # the client timed out already; the worker may still answer
    clock.advance(0.02)
    out = d.tick()
    (r,) = replies(out)
    assert (r.request_id, r.status) == (1, Status.TIMEOUT)
    assert [s.message.request_id for s in sends(out)] == [2]
    assert replies(reply(d, b"w1", 1)) == []  # the reply after all: too late
    assert d.counters["late_replies"] == 1
    assert replies(reply(d, b"w1", 2))[0].request_id == 2


def test_inflight_non_idempotent_call_expires_as_state_unknown():
    d, clock = make()
    ready(d, b"w1", capacity=1)
    request(d, 1, method="charge", budget_ms=1000)
    clock.advance(3.1)  # the default grace is 2 s
    (r,) = replies(d.tick())
    assert r.status == Status.CALL_STATE_UNKNOWN
    assert d.snapshot()["workers"][0]["outstanding"] == 0


def test_leaving_worker_whose_last_call_expires_is_forgotten():
    d, clock = make()
    ready(d, b"w1", capacity=1)
    request(d, 1, budget_ms=1000)
    d.handle(WorkerLeaving(b"w1"))
    clock.advance(3.1)
    d.tick()
    assert not d.has_worker(b"w1")


# --- a broker that leaves ACTIVE -------------------------------------------------------------


def test_deactivated_answers_queued_calls_not_active_and_dispatches_nothing():
    d, clock = make()
    ready(d, b"w1", capacity=1)
    request(d, 1)  # running
    request(d, 2)
    request(d, 3)
    out = d.handle(Deactivated())
    assert sorted((r.request_id, r.status) for r in replies(out)) == [
        (2, Status.NOT_ACTIVE), (3, Status.NOT_ACTIVE)]
    out = reply(d, b"w1", 1)  # the running call still reaches its client
    assert [(r.request_id, r.status) for r in replies(out)] == [(1, Status.OK)] and sends(out) == []
    assert runs(ready(d, b"w2")) == []
    (r,) = replies(request(d, 4))
    assert r.status == Status.NOT_ACTIVE
    clock.advance(10.0)
    assert replies(d.tick()) == []  # nothing left to answer twice


def test_deactivated_answers_probing_calls_not_active():
    d, _ = settled()
    request(d, 7, method="charge", resent=True)
    (r,) = replies(d.handle(Deactivated()))
    assert (r.request_id, r.status) == (7, Status.NOT_ACTIVE)
    reply(d, b"w1", 7, status=Status.NOT_SEEN)
    assert runs(reply(d, b"w2", 7, status=Status.NOT_SEEN)) == []


def test_deactivated_does_not_retry_a_lost_workers_calls():
    d, _ = make()
    ready(d, b"w1", capacity=2)
    ready(d, b"w2", capacity=2, services={"calc": {"add": True, "charge": False}})
    for i, m in ((1, "add"), (2, "charge"), (3, "add"), (4, "charge")):
        request(d, i, method=m)
    d.handle(Deactivated())
    out = d.handle(WorkerLost(b"w1"))
    assert sends(out) == []
    got = {r.request_id: r.status for r in replies(out)}
    assert set(got.values()) <= {Status.NOT_ACTIVE, Status.CALL_STATE_UNKNOWN}
    assert all(got[i] == Status.NOT_ACTIVE for i in (1, 3) if i in got)
    assert all(got[i] == Status.CALL_STATE_UNKNOWN for i in (2, 4) if i in got)
    assert len(got) == 2


def test_activated_again_dispatches():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    d.handle(Deactivated())
    assert replies(request(d, 1))[0].status == Status.NOT_ACTIVE
    d.handle(Activated())
    assert len(runs(request(d, 2))) == 1
    assert request(d, 3) == []  # queued behind it
    assert [s.message.request_id for s in sends(reply(d, b"w1", 2))] == [3]


# --- bounds ------------------------------------------------------------------------------------


def test_one_client_cannot_hold_more_than_its_share():
    d, _ = make(max_inflight_per_client=3)
    ready(d, b"w1", capacity=1)
    for i in range(3):
        assert replies(request(d, i)) == []  # one running, two queued
    (r,) = replies(request(d, 3))
    assert r.status == Status.OVERLOADED
    assert replies(request(d, 4, client=b"other")) == []  # another client is not starved
    reply(d, b"w1", 0)
    assert replies(request(d, 5)) == []  # a slot freed up


def test_queues_are_bounded_in_bytes_too():
    d, _ = make(queue_bytes=10)
    ready(d, b"w1", capacity=1)
    request(d, 1)  # runs
    assert request(d, 2) == []  # 4 bytes of body queued
    assert request(d, 3) == []  # 8
    (r,) = replies(request(d, 4))  # 12 > 10
    assert r.status == Status.OVERLOADED
    reply(d, b"w1", 1)  # call 2 leaves the queue: room again
    assert replies(request(d, 5)) == []


def test_services_of_departed_workers_are_forgotten():
    d, clock = make(checked=False)
    rng = random.Random(5)
    for i in range(1000):
        wid = b"w%d" % i
        names = {"".join(rng.choices("abcdefghij", k=8)) for _ in range(rng.randrange(1, 4))}
        ready(d, wid, services={n: {"m": True} for n in names})
    assert len(d._services) > 1000
    for i in range(1000):
        d.handle(WorkerLeaving(b"w%d" % i) if i % 2 else WorkerLost(b"w%d" % i))
    d._check()
    clock.advance(1.0)  # the grace: a worker of theirs may still register
    d.tick()
    assert len(d._services) == 0
    d._check()


def test_service_made_by_a_request_is_forgotten_after_its_grace():
    d, clock = make()
    for i in range(50):
        request(d, i, service=f"s{i}")
    clock.advance(1.0)
    assert len(replies(d.tick())) == 50
    assert len(d._services) == 0


def test_service_with_queued_calls_is_kept_until_they_are_answered():
    d, clock = make()
    ready(d, b"w1", capacity=1)
    request(d, 1, budget_ms=60_000)
    request(d, 2, budget_ms=60_000)
    d.handle(WorkerLost(b"w1"))  # 1 is retried: both wait for a worker for the grace
    clock.advance(0.5)
    d.tick()
    assert "calc" in d._services
    clock.advance(0.5)
    assert sorted(r.request_id for r in replies(d.tick())) == [1, 2]
    assert "calc" not in d._services


def test_ready_beyond_the_service_limit_is_refused():
    d, _ = make(max_services=10)
    ready(d, b"w1", services={f"s{i}": {"m": True} for i in range(8)})
    out = ready(d, b"w2", services={f"t{i}": {"m": True} for i in range(3)})
    (n,) = notices(out, "worker_refused")
    assert n.subject == "w2" and not d.has_worker(b"w2") and not notices(out, "worker_joined")
    assert len(d._services) == 8
    assert not d.wants_register(b"w2")  # asking it again would only repeat this
    ready(d, b"w3", services={"s1": {"m": True}, "t0": {"m": True}})  # one new: fits
    assert d.has_worker(b"w3")


def test_request_for_a_new_service_beyond_the_limit_is_unavailable():
    d, _ = make(max_services=2)
    request(d, 1, service="a")
    request(d, 2, service="b")
    (r,) = replies(request(d, 3, service="c"))
    assert r.status == Status.SERVICE_UNAVAILABLE


def test_recent_answers_are_bounded():
    d, _ = make(recent_limit=100)
    ready(d, b"w1", capacity=1)
    for i in range(1000):
        request(d, i)
        reply(d, b"w1", i)
    assert len(d._recent) == 100 and d._per_client == {}


def test_timer_heap_holds_no_more_dead_entries_than_it_must():
    d, _ = make(checked=False)
    ready(d, b"w1", capacity=1)
    request(d, 0, budget_ms=60_000)
    for i in range(1, 5001):
        request(d, i, budget_ms=60_000)  # queued, then sent, then answered
        reply(d, b"w1", i - 1)
    assert d.inflight == 1
    assert len(d._timers) <= 2 * d.inflight + 1024
    d._check()


def test_queue_of_expired_calls_behind_a_live_one_is_compacted():
    d, clock = make(checked=False, queue_limit=10_000)
    ready(d, b"w1", capacity=1)
    request(d, 0, budget_ms=3_600_000)  # runs for an hour
    request(d, 1, budget_ms=3_600_000)  # waits at the head of the queue
    for i in range(2, 5002):
        request(d, i, budget_ms=100)
    clock.advance(0.2)
    assert len(replies(d.tick())) == 5000
    assert len(d._services["calc"].queue) <= 2 * 1 + 64
    d._check()


# --- a worker that left ------------------------------------------------------------------------


def test_worker_that_left_cleanly_is_not_asked_to_register_for_a_minute():
    d, clock = make()
    ready(d, b"w1")
    assert not d.wants_register(b"w1")  # known
    assert d.wants_register(b"new")  # unknown: this broker restarted, or declared it dead
    d.handle(WorkerLeaving(b"w1"))
    assert not d.has_worker(b"w1") and not d.wants_register(b"w1")
    clock.advance(59.0)
    assert not d.wants_register(b"w1")
    clock.advance(1.5)
    assert d.wants_register(b"w1")


def test_lost_worker_is_asked_to_register():
    d, _ = make()
    ready(d, b"w1")
    d.handle(WorkerLost(b"w1"))
    assert d.wants_register(b"w1")


def test_worker_that_left_and_registers_again_is_welcome():
    d, _ = make()
    ready(d, b"w1")
    d.handle(WorkerLeaving(b"w1"))
    ready(d, b"w1")
    assert d.has_worker(b"w1")
    d.handle(WorkerLost(b"w1"))
    assert d.wants_register(b"w1")


def test_memory_of_departed_workers_is_bounded():
    d, clock = make(checked=False)
    for i in range(30_000):
        d.handle(WorkerLeaving(b"w%d" % i))
    assert len(d._left) <= 10_000
    clock.advance(61.0)
    d.handle(WorkerLeaving(b"last"))
    assert len(d._left) == 1


# --- the grace after a service loses its last worker --------------------------------------------


def test_calls_queued_when_the_last_worker_leaves_get_unavailable_after_the_grace():
    d, clock = make(service_grace=1.0)
    ready(d, b"w1", capacity=1)
    request(d, 1, budget_ms=60_000)  # running
    request(d, 2, budget_ms=60_000)  # waits for the slot
    d.handle(WorkerLeaving(b"w1"))  # no worker takes new calls from now on
    request(d, 3, budget_ms=60_000)
    clock.advance(0.5)
    assert replies(reply(d, b"w1", 1))[0].request_id == 1  # in-flight calls still complete
    clock.advance(0.5)
    out = d.tick()
    assert sorted((r.request_id, r.status) for r in replies(out)) == [
        (2, Status.SERVICE_UNAVAILABLE), (3, Status.SERVICE_UNAVAILABLE)]


def test_calls_queued_before_the_last_worker_is_lost_get_unavailable_after_the_grace():
    d, clock = make(service_grace=1.0)
    ready(d, b"w1", capacity=1)
    request(d, 1, budget_ms=60_000, method="charge")
    request(d, 2, budget_ms=60_000)
    clock.advance(5.0)
    d.handle(WorkerLost(b"w1"))
    clock.advance(1.0)
    (r,) = replies(d.tick())
    assert (r.request_id, r.status) == (2, Status.SERVICE_UNAVAILABLE)


def test_next_deadline_wakes_the_loop_to_forget_a_service():
    d, clock = make()
    ready(d, b"w1")
    assert d.next_deadline() is None  # served: nothing to do until something happens
    d.handle(WorkerLost(b"w1"))
    assert d.next_deadline() == pytest.approx(clock() + 1.0)
    clock.advance(1.0)
    d.tick()
    assert d._services == {} and d.next_deadline() is None


def test_resent_call_with_no_worker_is_unknown_not_unavailable():
    """It may have run through the broker the client lost: "no worker" would say it did not."""
    d, clock = make()
    clock.advance(2.0)  # past the start-up grace, no worker ever came
    (r,) = replies(request(d, 1, method="charge", resent=True))
    assert r.status == Status.CALL_STATE_UNKNOWN
    (r,) = replies(request(d, 2, method="charge"))
    assert r.status == Status.SERVICE_UNAVAILABLE


def test_a_client_cannot_ask_a_worker_for_a_probe():
    d, _ = make()
    ready(d, b"w1")
    (s,) = sends(request(d, 1, probe=True))
    assert "probe" not in s.message.headers


def test_repr_shows_activity_workers_and_where_calls_are():
    d, clock = make()
    assert repr(d) == "<Dispatcher ACTIVE workers=0 inflight=0 queued=0>"
    ready(d, b"w1", capacity=1)
    ready(d, b"w2", capacity=1)
    for rid in range(3):
        request(d, rid)
    assert repr(d) == "<Dispatcher ACTIVE workers=2 inflight=2 queued=1>"
    clock.advance(HORIZON)
    request(d, 9, method="charge", resent=True)  # probed at both workers
    assert repr(d) == "<Dispatcher ACTIVE workers=2 inflight=2 queued=1 probing=1>"
    d.handle(Deactivated())  # the queued and the probing call are answered NotActive
    assert repr(d) == "<Dispatcher INACTIVE workers=2 inflight=2 queued=0>"


def test_every_call_state_kept_while_held_is_a_call_state():
    """Rule 1: a held call is QUEUED, PROBING or INFLIGHT; an answered one is DONE."""
    d, clock = make()
    ready(d, b"w1", capacity=1)
    request(d, 1)
    request(d, 2)
    clock.advance(HORIZON)
    ready(d, b"w2", capacity=1)
    states = {key[1]: c.state for key, c in d._calls.items()}
    assert states == {1: CallState.INFLIGHT, 2: CallState.INFLIGHT}
    call = d._calls[(b"c1", 1)]
    reply(d, b"w1", 1)
    assert call.state is CallState.DONE and call.body == b""


def test_every_rule_of_the_dispatcher_is_enforced_somewhere():
    """The numbered rules at the top of the module are each cited where the code enforces
    them, and the code cites no rule that is not written down."""
    source = inspect.getsource(dispatch_module)
    head, code = source.split("\nfrom __future__", 1)
    written = {int(n) for n in re.findall(r"^# Rule (\d+):", head, re.M)}
    assert written == set(range(1, len(written) + 1))
    cited = {int(n) for group in re.findall(r"[Rr]ules? (\d+(?:, \d+)*)", code)
             for n in group.split(", ")}
    assert cited == written
