"""Alert rules and early-warning detectors, driven with synthetic arrivals and snapshots."""

from __future__ import annotations

import pytest

from broker._bstar import PeerAlert
from broker._dispatch import LATENCY_BUCKETS, Notice
from broker._monitor import CATALOGUE, Alert, Eject, Monitor, PhiAccrual, Thresholds, quantile
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
    assert d.phi(last + 0.4) < 8  # nor 150 ms on a busy machine
    assert d.phi(last + 0.5) > 8  # 250 ms late on a 250 ms rhythm: very suspicious
    assert d.phi(last + 0.4) < d.phi(last + 0.45) < d.phi(last + 0.5)


def test_phi_tolerates_jitter_it_has_learned():
    d = PhiAccrual(0.25)
    t = 0.0
    for i in range(100):
        d.heartbeat(t)
        t += 0.25 + (0.08 if i % 2 else -0.08)
    last = t - (0.25 - 0.08)
    assert d.phi(last + 0.5) < 8  # irregular worker: a late beat is less alarming


def test_worker_suspect_rises_before_liveness_would_expire_and_resolves():
    clock = FakeClock()
    m = Monitor(clock, 0.25)
    w = worker("w1", b"\x01")
    for _ in range(20):
        m.worker_heartbeat(b"\x01")
        clock.advance(0.25)
        assert names(m.evaluate(snap([service(workers=1, max_workers=1)], [w]))) == []
    clock.advance(0.3)  # 550 ms of silence: liveness (750 ms) has not expired yet
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
