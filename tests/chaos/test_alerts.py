"""Early warning under real signals: suspect before lost, and failover/peer alerts on a pair."""

from __future__ import annotations

import signal
import time

import pytest

from tests.monitor_tap import MonitorTap
from zrpc.testing import free_port

pytestmark = pytest.mark.slow


def test_sigstop_worker_is_suspect_before_it_is_lost(cluster, procs):
    mon = f"tcp://127.0.0.1:{free_port()}"
    ep = cluster.broker("--monitor", mon)
    tap = MonitorTap(mon)
    w = None
    try:
        tap.wait_metrics()
        w = cluster.worker(ep)
        cluster.worker(ep)
        # the phi detector learns the heartbeat rhythm: wait for the broker to publish three
        # snapshots (one a second) with both workers in, i.e. a dozen heartbeats each
        tap.wait_snapshots(3, since=time.monotonic())
        assert not tap.alerts("worker_suspect"), "a healthy worker was suspected"
        t0 = time.monotonic()
        procs.signal(w, signal.SIGSTOP)
        t_lost, lost = tap.wait("worker_lost")
        assert f":{w.pid}:" in lost["subject"]
        t_suspect, suspect = tap.wait("worker_suspect", subject=lost["subject"])
        lead = t_lost - t_suspect
        print(f"\nSIGSTOP: worker_suspect after {(t_suspect - t0) * 1000:.0f} ms, worker_lost after "
              f"{(t_lost - t0) * 1000:.0f} ms: {lead * 1000:.0f} ms of warning (phi {suspect['detail']['phi']})")
        assert lead > 0  # the warning came first (how long before is the machine's to say)
        procs.signal(w, signal.SIGCONT)
        tap.wait("worker_lost", "resolved")  # it rejoins
    finally:
        if w is not None:
            procs.signal(w, signal.SIGCONT)
        tap.close()


def test_failover_alert_on_the_new_active_broker(cluster, procs, client_factory):
    pair = cluster.pair()
    mons = [f"tcp://127.0.0.1:{p}" for p in pair.ports.monitor]
    tap = MonitorTap(*mons)
    try:
        tap.wait_metrics()
        cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
        c = client_factory(pair.endpoints, timeout=10)
        assert c.proxy("calc").add(1, 1) == 2
        procs.signal(pair.procs["primary"], signal.SIGKILL)
        assert c.proxy("calc").add(2, 2) == 4
        _, failover = tap.wait("failover")
        assert failover["role"] == "backup" and failover["broker_state"] == "active"
        tap.wait("peer_lost")
        cluster.start_broker(pair, "primary")
        tap.wait("peer_lost", "resolved")
        tap.wait("peer_back", "event")
        tap.wait("failover", "resolved")  # redundancy is back
    finally:
        tap.close()


def test_split_brain_alert_when_a_stopped_primary_resumes(cluster, procs):
    import zrpc

    pair = cluster.pair()
    mons = [f"tcp://127.0.0.1:{p}" for p in pair.ports.monitor]
    tap = MonitorTap(*mons)
    try:
        tap.wait_metrics()
        cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
        procs.signal(pair.procs["primary"], signal.SIGSTOP)
        with zrpc.Client(pair.endpoints, timeout=10) as c:
            assert c.proxy("calc").add(1, 1) == 2  # the backup takes over
        procs.signal(pair.procs["primary"], signal.SIGCONT)
        _, raised = tap.wait("split_brain")
        tap.wait("split_brain", "resolved")
        assert raised["severity"] == "critical"
    finally:
        procs.signal(pair.procs["primary"], signal.SIGCONT)
        tap.close()
