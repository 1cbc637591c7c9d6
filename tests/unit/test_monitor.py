"""Alert rules and early-warning detectors, driven with synthetic arrivals and snapshots."""

from __future__ import annotations

import math
import random

import pytest

from zrpc.broker._core._bstar import PeerAlert
from zrpc.broker._core._dispatch import LATENCY_BUCKETS, Notice
from zrpc.broker._core._monitor import CATALOGUE, PHI_MAX, Alert, Eject, Monitor, PhiAccrual, Thresholds, quantile
from zrpc.testing import FakeClock


def worker(name, wid, services=("calc",), ewma_ms=1.0, served=100, outstanding=0, **kw):
    return {"id": wid.hex(), "name": name, "services": list(services), "capacity": 8,
            "outstanding": outstanding, "ewma_ms": ewma_ms, "served": served, "errors": 0,
            "leaving": False, "ejected": kw.get("ejected", False)}


def service(name="calc", workers=2, queued=0, max_workers=2, calls=0, errors=0, buckets=None):
    return {"name": name, "workers": workers, "outstanding": 0, "queued": queued,
            "max_workers": max_workers, "calls": calls, "errors": errors,
            "latency_buckets": buckets or [0] * len(LATENCY_BUCKETS)}


def snap(services, workers):
    return {"services": services, "workers": workers, "counters": {}}


def names(outputs, state=None):
    return [(o.name, o.state) for o in outputs if isinstance(o, Alert) and (state is None or o.state == state)]


# --- phi accrual ------------------------------------------------------------------------------


def test_phi_stays_low_on_regular_heartbeats_and_climbs_in_silence():
    d = PhiAccrual(0.25)
    t = 0.0
    for _ in range(50):
        d.heartbeat(t)
        t += 0.25
    last = t - 0.25
    assert d.phi(last + 0.3) < 1  # a beat 50 ms late is no news (acceptable pause)
    assert d.phi(last + 0.5) < 8  # nor 250 ms on a busy machine
    assert d.phi(last + 0.65) > 8  # 400 ms late on a 250 ms rhythm: very suspicious
    assert d.phi(last + 0.4) < d.phi(last + 0.5) < d.phi(last + 0.65)


def test_phi_tolerates_jitter_it_has_learned():
    d, regular = PhiAccrual(0.25), PhiAccrual(0.25)
    t = 0.0
    for i in range(100):
        d.heartbeat(t)
        regular.heartbeat(i * 0.25)
        last = t
        t += 0.25 + (0.08 if i % 2 else -0.08)
    assert d.phi(last + 0.5) < 8  # irregular worker: a late beat is less alarming
    assert d.phi(last + 0.55) < regular.phi(99 * 0.25 + 0.55)


def test_worker_suspect_rises_before_liveness_would_expire_and_resolves():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    w = worker("w1", b"\x01")
    for _ in range(20):
        m.worker_heartbeat(b"\x01")
        clock.advance(0.25)
        assert names(m.evaluate(snap([service(workers=1, max_workers=1)], [w]))) == []
    clock.advance(0.4)  # 650 ms of silence: liveness (750 ms) has not expired yet
    assert names(m.evaluate(snap([service(workers=1, max_workers=1)], [w]))) == [("worker_suspect", "raised")]
    assert names(m.evaluate(snap([service(workers=1, max_workers=1)], [w]))) == []  # deduplicated
    m.worker_heartbeat(b"\x01")
    assert names(m.evaluate(snap([service(workers=1, max_workers=1)], [w]))) == [("worker_suspect", "resolved")]


# --- outliers ---------------------------------------------------------------------------------


def test_degraded_worker_is_a_sustained_outlier_against_its_peers():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    ws = [worker("fast1", b"\x01", ewma_ms=2), worker("fast2", b"\x02", ewma_ms=3),
          worker("slow", b"\x03", ewma_ms=200)]
    s3 = [service(workers=3, max_workers=3)]
    assert names(m.evaluate(snap(s3, ws))) == []  # one look is not enough
    clock.advance(0.5)
    out = m.evaluate(snap(s3, ws))
    assert names(out) == [("worker_degraded", "raised")] and out[0].subject == "slow"
    ws[2]["ewma_ms"] = 60  # better, but not well below the limit: still degraded
    clock.advance(1)
    assert names(m.evaluate(snap(s3, ws))) == []
    ws[2]["ewma_ms"] = 3
    assert names(m.evaluate(snap(s3, ws))) == []
    clock.advance(0.5)
    assert names(m.evaluate(snap(s3, ws))) == [("worker_degraded", "resolved")]


def test_fast_services_do_not_flag_small_absolute_differences():
    m = Monitor(FakeClock(), 0.25)
    ws = [worker("a", b"\x01", ewma_ms=0.5), worker("b", b"\x02", ewma_ms=4)]  # 8x, but 3.5 ms
    assert names(m.evaluate(snap([service()], ws))) == []


def test_ejection_never_takes_the_last_worker_and_readmits_later():
    clock = FakeClock()
    m = Monitor(clock, 0.25, Thresholds(eject=True, eject_time=5))
    ws = [worker("fast", b"\x01", ewma_ms=2), worker("slow", b"\x02", ewma_ms=300)]
    m.evaluate(snap([service()], ws))
    clock.advance(0.5)
    out = m.evaluate(snap([service()], ws))
    assert Eject(b"\x02", True) in out and ("worker_ejected", "raised") in names(out)
    assert repr(m) == "<Monitor alerts=[worker_degraded, worker_ejected] workers=0 ejected=1>"
    ws[1]["ejected"] = True
    clock.advance(5.1)
    out = m.evaluate(snap([service()], ws))
    assert Eject(b"\x02", False) in out and ("worker_ejected", "resolved") in names(out)
    # the only other worker is ejected already: the slow one is all the service has left
    m2 = Monitor(clock, 0.25, Thresholds(eject=True))
    ws2 = [worker("fast", b"\x01", ewma_ms=2, ejected=True), worker("slow", b"\x02", ewma_ms=300)]
    for _ in range(3):
        out = m2.evaluate(snap([service()], ws2))
        clock.advance(0.5)
        assert not [o for o in out if isinstance(o, Eject)]


# --- capacity and queues -----------------------------------------------------------------------


def test_redundancy_lost_then_service_unavailable_then_back():
    m = Monitor(FakeClock(), 0.25)
    assert names(m.evaluate(snap([service(workers=2)], []))) == []
    assert names(m.evaluate(snap([service(workers=1)], []))) == [("redundancy_lost", "raised")]
    assert names(m.evaluate(snap([service(workers=0)], []))) == [("service_unavailable", "raised")]
    assert sorted(names(m.evaluate(snap([service(workers=2)], [])))) == [
        ("redundancy_lost", "resolved"), ("service_unavailable", "resolved")]


def test_a_service_that_always_had_one_worker_is_not_redundancy_lost():
    m = Monitor(FakeClock(), 0.25)
    assert names(m.evaluate(snap([service(workers=1, max_workers=1)], []))) == []


def test_queue_backlog_with_hysteresis():
    m = Monitor(FakeClock(), 0.25, Thresholds(backlog=10))
    assert names(m.evaluate(snap([service(queued=10)], []))) == [("queue_backlog", "raised")]
    assert names(m.evaluate(snap([service(queued=7)], []))) == []
    assert names(m.evaluate(snap([service(queued=5)], []))) == [("queue_backlog", "resolved")]


# --- windowed latency and errors ---------------------------------------------------------------


def buckets_with(latency, n):
    b = [0] * len(LATENCY_BUCKETS)
    for i, upper in enumerate(LATENCY_BUCKETS):
        if latency <= upper:
            b[i] = n
            return b
    raise AssertionError


def test_latency_slo_and_error_rate_over_the_window():
    clock = FakeClock()
    m = Monitor(clock, 0.25, Thresholds(latency_slo=0.2, error_rate=0.1, min_calls=20))
    calls = errors = 0
    cum = [0] * len(LATENCY_BUCKETS)

    def second(latency, n, failed):
        nonlocal calls, errors, cum
        calls += n
        errors += failed
        cum = [a + b for a, b in zip(cum, buckets_with(latency, n))]
        clock.advance(1)
        return m.metrics(snap([service(calls=calls, errors=errors, buckets=list(cum))], []))

    metrics, out = second(0.003, 100, 0)
    assert names(out) == [] and metrics["services"]["calc"]["calls_s"] == pytest.approx(100)
    assert 2.5 <= metrics["services"]["calc"]["p99_ms"] <= 5
    _, out = second(0.4, 100, 30)
    assert sorted(names(out)) == [("error_rate", "raised"), ("latency_slo", "raised")]
    for _ in range(5):  # the window forgets the bad second
        _, out = second(0.003, 100, 0)
    assert sorted(names(out, "resolved")) == [("error_rate", "resolved"), ("latency_slo", "resolved")]


def test_quantile_from_buckets():
    assert quantile([0] * len(LATENCY_BUCKETS), 0.5) is None
    b = buckets_with(0.004, 10)
    assert 0.0025 < quantile(b, 0.5) <= 0.005


# --- events ------------------------------------------------------------------------------------


def test_worker_lost_is_resolved_when_a_worker_of_its_service_joins():
    m = Monitor(FakeClock(), 0.25)
    out = m.notice(Notice("worker_lost", "w1", {"services": ["calc"], "reason": "silent"}))
    assert names(out) == [("worker_lost", "raised")]
    assert [a.name for a in m.active] == ["worker_lost"]
    out = m.notice(Notice("worker_joined", "w9", {"services": ["calc"], "capacity": 8}))
    assert names(out) == [("worker_joined", "event"), ("worker_lost", "resolved")]
    assert m.active == []


def test_repr_shows_the_raised_alerts_and_the_workers_watched():
    m = Monitor(FakeClock(), 0.25)
    assert repr(m) == "<Monitor alerts=[] workers=0>"
    ws = [worker("a", b"\x01"), worker("b", b"\x02"), worker("c", b"\x03")]
    for w in ws:
        m.worker_heartbeat(bytes.fromhex(w["id"]))
    m.notice(Notice("worker_lost", "w1", {"services": ["calc"]}))
    m.notice(Notice("worker_lost", "w2", {"services": ["calc"]}))  # one name for both
    m.evaluate(snap([service(workers=1)], ws))
    assert repr(m) == "<Monitor alerts=[worker_lost, redundancy_lost] workers=3>"
    m.notice(Notice("worker_joined", "w9", {"services": ["calc"]}))
    assert repr(m) == "<Monitor alerts=[redundancy_lost] workers=3>"


def test_pair_events():
    m = Monitor(FakeClock(), 0.25)
    assert names(m.peer(PeerAlert("peer_lost", "warning"))) == [("peer_lost", "raised")]
    assert names(m.peer(PeerAlert("failover", "critical"))) == [("failover", "raised")]
    assert names(m.peer(PeerAlert("peer_lost", "warning", resolved=True))) == [("peer_lost", "resolved")]
    assert names(m.peer(PeerAlert("peer_back", "info"))) == [("peer_back", "event"), ("failover", "resolved")]
    assert names(m.peer(PeerAlert("split_brain", "critical"))) == [("split_brain", "raised")]
    assert names(m.peer(PeerAlert("split_brain", "critical", resolved=True))) == [("split_brain", "resolved")]


def test_every_alert_name_is_in_the_catalogue():
    for name in ("worker_joined", "worker_lost", "worker_suspect", "worker_degraded", "worker_ejected",
                 "service_unavailable", "redundancy_lost", "queue_backlog", "latency_slo", "error_rate",
                 "failover", "split_brain", "peer_lost", "peer_back"):
        assert name in CATALOGUE


def test_worker_leaving_is_an_event_and_dual_passive_raises_and_resolves():
    m = Monitor(FakeClock(), 0.25)
    assert names(m.notice(Notice("worker_leaving", "w1", {"outstanding": 2}))) == [("worker_leaving", "event")]
    assert names(m.peer(PeerAlert("dual_passive", "warning"))) == [("dual_passive", "raised")]
    assert names(m.peer(PeerAlert("dual_passive", "warning", resolved=True))) == [("dual_passive", "resolved")]


def test_unauthorized_is_rate_limited_per_address():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    n = Notice("unauthorized", "10.0.0.9", {"reason": "Unknown key"})
    assert names(m.notice(n)) == [("unauthorized", "event")]
    assert names(m.notice(n)) == []
    assert names(m.notice(Notice("unauthorized", "10.0.0.8", {}))) == [("unauthorized", "event")]
    clock.advance(61)
    assert names(m.notice(n)) == [("unauthorized", "event")]


# --- phi: no overflow, no false alarm ----------------------------------------------------------


def beats(m, clock, wid, gaps, snapshot, step=0.1, lags=None):
    """Heartbeats sent `gaps` apart (each read `lags[i]` late, as a stalled broker reads them),
    evaluated every `step` seconds as the loop does and just before each beat is read (the
    worst moment); returns every alert raised."""
    raised = []
    due = clock()
    for i, gap in enumerate(gaps):
        due += gap
        arrival = due + (lags[i] if lags else 0.0)
        while clock() + step < arrival:
            clock.advance(step)
            raised += names(m.evaluate(snapshot), "raised")
        clock.advance(max(0.0, arrival - clock()))
        raised += names(m.evaluate(snapshot), "raised")
        m.worker_heartbeat(wid)
    return raised


def one_worker():
    return snap([service(workers=1, max_workers=1)], [worker("w1", b"\x01")])


def test_phi_after_a_tiny_first_gap_neither_overflows_nor_alarms():
    d = PhiAccrual(0.25)
    d.heartbeat(0.0)
    d.heartbeat(0.001)  # a worker started with its broker: two beats 1 ms apart
    for i in range(1, 400):
        p = d.phi(0.001 + i / 1000)
        assert 0.0 <= p <= PHI_MAX
    assert d.phi(0.101) < 1  # 100 ms after joining: a healthy worker is no suspect
    assert d.phi(0.301) < 1  # nor when its next beat, 250 ms on, is a little late: the seed's rhythm


def test_two_beats_1ms_apart_then_regular_beats_raise_no_alarm():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    s = one_worker()
    m.worker_heartbeat(b"\x01")
    assert beats(m, clock, b"\x01", [0.001] + [0.25] * 400, s, step=0.01) == []


def test_a_healthy_worker_with_jitter_and_stalls_is_never_suspect_for_minutes():
    for seed in range(5):
        rng = random.Random(seed)
        clock = FakeClock()
        m = Monitor(clock, 0.25)
        s = one_worker()
        m.worker_heartbeat(b"\x01")
        # +-40 % jitter, and one beat in ten held up by a ~100 ms stall of a busy 2-core machine
        gaps = [0.25 * rng.uniform(0.6, 1.4) + (0.1 if rng.random() < 0.1 else 0.0)
                for _ in range(1200)]  # five minutes
        # and one in ten read ~100 ms late by a broker that is itself stalled
        lags = [0.1 if rng.random() < 0.1 else 0.0 for _ in gaps]
        assert beats(m, clock, b"\x01", gaps, s, lags=lags) == [], seed


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_a_worker_that_stops_is_suspect_before_liveness_expires(jitter):
    rng = random.Random(7)
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    s = one_worker()
    m.worker_heartbeat(b"\x01")
    gaps = [0.25 * rng.uniform(1 - jitter, 1 + jitter) + (0.1 if jitter and rng.random() < 0.1 else 0.0)
            for _ in range(400)]
    assert beats(m, clock, b"\x01", gaps, s) == []
    last = clock()
    while ("worker_suspect", "raised") not in names(m.evaluate(s)):
        clock.advance(0.01)
        assert clock() - last < 0.25 * 3, "liveness (interval x 3) would expire first"


def test_a_new_worker_is_not_judged_before_enough_samples():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    s = one_worker()
    m.worker_heartbeat(b"\x01")
    clock.advance(0.25)
    m.worker_heartbeat(b"\x01")
    clock.advance(2.0)  # silent at once: liveness reports it; one gap says nothing of its rhythm
    assert names(m.evaluate(s)) == []
    assert m.phi(b"\x01") > Thresholds().phi  # phi itself is still shown


def test_became_active_resets_what_a_passive_broker_saw():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    s = one_worker()
    for _ in range(40):  # passive: heartbeats recorded, nothing judged
        m.worker_heartbeat(b"\x01")
        clock.advance(0.25)
    clock.advance(0.5)  # the worker's link to this broker was reconnecting meanwhile
    assert m.became_active() == []
    assert names(m.evaluate(s)) == []  # the old rhythm is not held against it
    assert m.phi(b"\x01") == 0.0
    m.worker_heartbeat(b"\x01")
    assert beats(m, clock, b"\x01", [0.001] + [0.25] * 40, s) == []
    last = clock()
    while ("worker_suspect", "raised") not in names(m.evaluate(s)):  # still a working detector
        clock.advance(0.01)
        assert clock() - last < 0.75


def test_became_active_resolves_a_suspect_left_from_an_earlier_term():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    s = one_worker()
    assert beats(m, clock, b"\x01", [0.25] * 20, s) == []
    clock.advance(1.0)
    assert names(m.evaluate(s)) == [("worker_suspect", "raised")]
    # this broker steps down, later takes over again
    assert names(m.became_active()) == [("worker_suspect", "resolved")]
    assert m.active == []


# --- bounded memory ----------------------------------------------------------------------------


def sizes(m):
    return {k: len(getattr(m, k)) for k in ("_phi", "_since", "_lost_services", "_prev",
                                             "_windows", "_raised", "_ejected", "_eject_next", "_subjects")}


def test_a_passive_broker_forgets_workers_that_left():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    for i in range(3000):
        wid = i.to_bytes(4, "big")
        for _ in range(3):
            m.worker_heartbeat(wid)
            clock.advance(0.001)
        if i % 2:
            m.forget(wid)  # WorkerLost or a clean leave
        if i % 100 == 0:  # every second the loop takes metrics, active or not
            m.metrics(snap([], [worker("last", wid)]))
            assert len(m._phi) <= 1
    m.metrics(snap([], []))
    assert max(sizes(m).values()) <= 1


def test_thousands_of_workers_and_services_come_and_go_in_bounded_memory():
    clock = FakeClock()
    m = Monitor(clock, 0.25, Thresholds(eject=True))
    biggest = {}
    for i in range(Monitor.LOST_MAX + 500):
        wid = i.to_bytes(4, "big")
        svc = f"svc{i}"  # services come and go with their workers
        fast = worker(f"fast{i}", b"f" + wid, services=[svc], ewma_ms=1)
        slow = worker(f"slow{i}", b"s" + wid, services=[svc], ewma_ms=300)  # an outlier, not yet sustained
        m.notice(Notice("worker_joined", slow["name"], {"services": [svc]}))
        for _ in range(3):
            m.worker_heartbeat(b"s" + wid)
            m.worker_heartbeat(b"f" + wid)
        calls = [0] * len(LATENCY_BUCKETS)
        calls[3] = 50
        s1 = snap([service(svc, workers=2, calls=50, errors=40, buckets=calls, queued=500)], [fast, slow])
        m.evaluate(s1)
        m.metrics(s1)
        clock.advance(0.2)
        m.notice(Notice("worker_lost", slow["name"], {"services": [svc], "reason": "silent"}))
        m.forget(b"s" + wid)
        m.evaluate(snap([service(svc, workers=1, max_workers=2)], [fast]))
        if i % 3 == 0:
            m.notice(Notice("worker_leaving", fast["name"], {}))
        m.forget(b"f" + wid)
        m.evaluate(snap([], []))
        m.metrics(snap([], []))
        for k, v in sizes(m).items():
            biggest[k] = max(biggest.get(k, 0), v)
    clock.advance(601)
    m.evaluate(snap([], []))
    assert biggest["_lost_services"] <= Monitor.LOST_MAX
    assert max(v for k, v in biggest.items() if k not in ("_lost_services", "_raised")) <= 12
    assert biggest["_raised"] <= Monitor.LOST_MAX + 12
    after = sizes(m)
    assert after == dict.fromkeys(after, 0), after  # lost workers not replaced in 10 min are let go


def test_a_lost_worker_never_replaced_is_let_go_after_ten_minutes():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    assert names(m.notice(Notice("worker_lost", "w1", {"services": ["calc"]}))) == [("worker_lost", "raised")]
    clock.advance(599)
    assert names(m.evaluate(snap([], []))) == []
    clock.advance(2)
    out = m.evaluate(snap([], []))
    assert names(out) == [("worker_lost", "resolved")] and "forgotten" in out[0].detail["reason"]
    assert m.active == []


def test_alerts_of_a_worker_that_left_cleanly_are_resolved():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    ws = [worker("fast1", b"\x01", ewma_ms=2), worker("fast2", b"\x02", ewma_ms=3),
          worker("slow", b"\x03", ewma_ms=200)]
    s3 = [service(workers=3, max_workers=3)]
    m.evaluate(snap(s3, ws))
    clock.advance(0.5)
    assert names(m.evaluate(snap(s3, ws))) == [("worker_degraded", "raised")]
    m.notice(Notice("worker_leaving", "slow", {"outstanding": 0}))  # it left: no worker_lost
    out = m.evaluate(snap([service(workers=2, max_workers=3)], ws[:2]))
    assert names(out) == [("worker_degraded", "resolved")]
    assert m.active == [] and m._since == {}


def test_alerts_of_a_service_that_is_gone_are_resolved():
    m = Monitor(FakeClock(), 0.25, Thresholds(backlog=10))
    assert names(m.evaluate(snap([service("s1", workers=0, queued=20)], []))) == [
        ("service_unavailable", "raised"), ("queue_backlog", "raised")]
    out = m.evaluate(snap([], []))  # the broker forgot the service
    assert sorted(names(out)) == [("queue_backlog", "resolved"), ("service_unavailable", "resolved")]


def test_a_counter_reset_is_not_a_negative_rate():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    b = buckets_with(0.003, 1000)
    m.metrics(snap([service(calls=1000, errors=0, buckets=b)], []))
    clock.advance(1)
    metrics, out = m.metrics(snap([service(calls=10, errors=0, buckets=buckets_with(0.003, 10))], []))
    calc = metrics["services"]["calc"]
    assert calc["calls_s"] == 10 and calc["errors_s"] == 0 and 2.5 <= calc["p99_ms"] <= 5
    assert out == []


# --- unauthorized ------------------------------------------------------------------------------


def test_unauthorized_alerts_once_per_address_and_key_and_counts_repeats():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    a = Notice("unauthorized", "10.0.0.9", {"reason": "Unknown key", "key": "aaaa"})
    b = Notice("unauthorized", "10.0.0.9", {"reason": "Unknown key", "key": "bbbb"})
    assert names(m.notice(a)) == [("unauthorized", "event")]
    assert names(m.notice(b)) == [("unauthorized", "event")]  # another key, same host
    assert names(m.notice(a)) == [] and names(m.notice(a)) == []
    assert m.unauthorized_repeats == 2
    clock.advance(61)
    out = m.notice(a)
    assert names(out) == [("unauthorized", "event")] and out[0].detail["repeats"] == 2
    assert out[0].detail["key"] == "aaaa"
    out = m.notice(b)
    assert names(out) == [("unauthorized", "event")] and "repeats" not in out[0].detail


def test_unauthorized_memory_is_bounded():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    for i in range(30_000):
        assert len(m.notice(Notice("unauthorized", "10.0.0.9", {"key": f"k{i}"}))) == 1
    assert len(m._refused) <= 10_000


# --- new alerts --------------------------------------------------------------------------------


def test_new_alert_names_are_catalogued_with_their_severity():
    assert CATALOGUE["internal_error"][0] == "critical"
    assert CATALOGUE["broker_restarted"][0] == "warning"
    assert CATALOGUE["role_conflict"][0] == "critical"
    assert CATALOGUE["peer_unreachable"][0] == "warning"


def test_internal_error_is_rate_limited_per_subject_and_counted():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    out = m.internal_error("frontend", {"error": "KeyError: 'x'"})
    assert names(out) == [("internal_error", "event")] and out[0].detail["count"] == 1
    assert out[0].severity == "critical" and out[0].detail["error"] == "KeyError: 'x'"
    assert m.internal_error("frontend", {}) == [] and m.internal_error("frontend", {}) == []
    assert names(m.internal_error("timer", {})) == [("internal_error", "event")]
    clock.advance(10)
    out = m.notice(Notice("internal_error", "frontend", {"error": "again"}))  # the same through a Notice
    assert names(out) == [("internal_error", "event")]
    assert out[0].detail["count"] == 3 and out[0].detail["total"] == 4
    for i in range(5000):
        m.internal_error(f"site{i}", {})
    assert len(m._internal) <= 1000


def test_broker_restarted_role_conflict_and_peer_unreachable():
    m = Monitor(FakeClock(), 0.25)
    out = m.notice(Notice("broker_restarted", "tcp://127.0.0.1:5555", {"restarts": 2}))
    assert names(out) == [("broker_restarted", "raised")] and out[0].severity == "warning"
    assert out[0].subject == "tcp://127.0.0.1:5555" and out[0].detail == {"restarts": 2}
    assert [a.name for a in m.active] == ["broker_restarted"]  # in force: status shows it
    out = m.notice(Notice("broker_restarted", "tcp://127.0.0.1:5555", {"restarts": 2, "resolved": True}))
    assert names(out) == [("broker_restarted", "resolved")] and m.active == []
    for name, severity in (("role_conflict", "critical"), ("peer_unreachable", "warning")):
        out = m.peer(PeerAlert(name, severity, {"peer_role": "primary"}))
        assert names(out) == [(name, "raised")] and out[0].subject == "pair" and out[0].severity == severity
        assert m.peer(PeerAlert(name, severity)) == []  # deduplicated
        assert names(m.peer(PeerAlert(name, severity, resolved=True))) == [(name, "resolved")]
        out = m.notice(Notice(name, "anything", {"peer_role": "primary"}))
        assert names(out) == [(name, "raised")] and out[0].subject == "pair"
        out = m.notice(Notice(name, "anything", {"resolved": True}))
        assert names(out) == [(name, "resolved")] and "resolved" not in out[0].detail
    out = m.peer(PeerAlert("internal_error", "critical", {"subject": "state link"}))
    assert names(out) == [("internal_error", "event")] and out[0].subject == "state link"
    out = m.peer(PeerAlert("broker_restarted", "warning", {"restarts": 1}))
    assert names(out) == [("broker_restarted", "event")]


def test_unknown_alert_names_and_odd_details_never_raise():
    m = Monitor(FakeClock(), 0.25)
    out = m.peer(PeerAlert("something_new", "critical"))
    assert names(out) == [("something_new", "raised")] and out[0].severity == "critical"
    out = m.notice(Notice("worker_joined", "w1", {"services": ["calc"], "name": "w1", "subject": "x"}))
    assert names(out) == [("worker_joined", "event")] and out[0].detail["subject"] == "x"
    assert m.notice(Notice("call_retried", "calc", {})) == []


# --- Prometheus ------------------------------------------------------------------------------


class _FakeBroker:
    def __init__(self, status):
        self.last_status = status


def scrape(status):
    from prometheus_client import CollectorRegistry, generate_latest

    from zrpc.broker._metrics import BrokerCollector

    registry = CollectorRegistry()
    registry.register(BrokerCollector(_FakeBroker(status)))
    return generate_latest(registry).decode()


def test_prometheus_latency_sum_and_phi_as_scraped():
    svc = service(calls=4, buckets=buckets_with(0.3, 4))
    svc["latency_sum"] = 1.25
    old = service("old", calls=2, buckets=buckets_with(0.3, 2))  # from a dispatcher without sums
    ws = [dict(worker("w1", b"\x01"), phi=-0.0), dict(worker("w2", b"\x02"), phi=3.5),
          dict(worker("w3", b"\x03"), phi=float("nan"))]
    text = scrape({"broker": {"role": "primary", "state": "active"}, "services": [svc, old],
                   "workers": ws, "alerts": []})
    lines = text.splitlines()
    assert 'zrpc_call_latency_seconds_sum{service="calc"} 1.25' in lines
    assert 'zrpc_call_latency_seconds_count{service="calc"} 4.0' in lines
    assert 'zrpc_call_latency_seconds_sum{service="old"} 0.0' in lines
    assert 'zrpc_worker_phi{worker="w1"} 0.0' in lines
    assert 'zrpc_worker_phi{worker="w2"} 3.5' in lines
    assert 'zrpc_worker_phi{worker="w3"} 0.0' in lines
    assert "-0.0" not in text and "NaN" not in text


def test_prometheus_phi_from_the_monitor_is_never_negative_zero():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    s = one_worker()
    assert beats(m, clock, b"\x01", [0.25] * 50, s) == []
    clock.advance(0.001)
    m.evaluate(s)
    metrics, _ = m.metrics(s)
    phi = metrics["workers"]["w1"]["phi"]
    assert phi == 0.0 and math.copysign(1.0, phi) == 1.0
