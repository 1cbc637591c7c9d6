"""Dispatcher rules on a fake clock: no sockets, no sleeps."""

import pytest

from broker._dispatch import (
    AckLeave,
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
from zrpc._frames import ClientRequest, Ready, Status, WorkerReply
from zrpc.testing import FakeClock

METHODS = {"calc": {"add": True, "charge": False}}


def make(**kw):
    clock = FakeClock()
    kw.setdefault("service_grace", 1.0)
    d = Dispatcher(clock, **kw)
    return d, clock


def ready(d, wid, capacity=2, services=None, weight=1.0):
    return d.handle(WorkerReady(wid, Ready(wid.decode(), services or METHODS, capacity, weight)))


def request(d, rid, method="add", service="calc", client=b"c1", **headers):
    headers.setdefault("budget_ms", 5000)
    return d.handle(RequestArrived(client, ClientRequest(rid, service, method, headers, b"body")))


def reply(d, wid, rid, client=b"c1", status=Status.OK):
    return d.handle(ReplyArrived(wid, WorkerReply(client, rid, status, b"res")))


def sends(actions):
    return [a for a in actions if isinstance(a, SendToWorker)]


def replies(actions):
    return [a for a in actions if isinstance(a, ReplyToClient)]


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


def test_worker_registering_during_grace_gets_the_queued_call():
    d, clock = make(service_grace=1.0)
    request(d, 1, service="late", method="go")
    clock.advance(0.5)
    out = ready(d, b"w1", services={"late": {"go": True}})
    assert [s.message.request_id for s in sends(out)] == [1]


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


def test_reply_for_unknown_call_is_passed_to_the_client():
    d, _ = make()
    ready(d, b"w1")
    (r,) = replies(reply(d, b"w1", 99, client=b"cX"))
    assert (r.client_id, r.request_id) == (b"cX", 99)
    assert d.counters["orphan_replies"] == 1


def test_reready_keeps_in_flight_and_updates_capacity():
    d, _ = make()
    ready(d, b"w1", capacity=1)
    request(d, 1)
    ready(d, b"w1", capacity=3)
    assert len(sends(request(d, 2))) == 1
    assert replies(reply(d, b"w1", 1))


@pytest.mark.parametrize("lb", ["least-outstanding", "round-robin", "random", "weighted", "p2c-ewma"])
def test_every_strategy_dispatches_within_capacity(lb):
    d, _ = make(strategy=lb, queue_limit=100)
    ready(d, b"w1", capacity=2, weight=3.0)
    ready(d, b"w2", capacity=2, weight=1.0)
    sent = sum(len(sends(request(d, i))) for i in range(10))
    assert sent == 4
    assert d.snapshot()["services"][0]["queued"] == 6


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        Dispatcher(FakeClock(), strategy="nope")


# --- re-sent calls after a broker failover ----------------------------------------------------


def test_resent_non_idempotent_call_probes_every_worker_first():
    d, _ = make()
    ready(d, b"w1")
    ready(d, b"w2")
    out = request(d, 7, method="charge", resent=True)
    probes = sends(out)
    assert sorted(s.worker_id for s in probes) == [b"w1", b"w2"]
    assert all(s.message.headers["probe"] for s in probes)
    assert reply(d, b"w1", 7, status=Status.NOT_SEEN) == []
    (run,) = sends(reply(d, b"w2", 7, status=Status.NOT_SEEN))  # nobody ran it: run it once
    assert "probe" not in run.message.headers or not run.message.headers["probe"]
    assert replies(reply(d, run.worker_id, 7))[0].status == Status.OK


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
    d, _ = make()
    ready(d, b"w1")
    ready(d, b"w2")
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
