"""Alerts and metrics from real brokers: each alert of the catalogue fires and resolves."""

from __future__ import annotations

import http.server
import json
import math
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import zrpc
from tests import REPO
from tests.conftest import broker_status
from tests.monitor_tap import MonitorTap
from zrpc.testing import free_port, wait_until


@pytest.fixture
def tapped(cluster):
    """A broker with a monitor socket, and a tap on it."""
    mon = f"tcp://127.0.0.1:{free_port()}"

    def start(*args: str):
        ep = cluster.broker("--monitor", mon, *args)
        tap = MonitorTap(mon)
        taps.append(tap)
        tap.wait_metrics()  # subscribed and receiving
        return ep, tap, mon

    taps: list[MonitorTap] = []
    yield start
    for t in taps:
        t.close()


def test_worker_kill_raises_lost_and_redundancy_then_both_resolve(tapped, cluster, procs, client_factory):
    ep, tap, _ = tapped()
    w1 = cluster.worker(ep)
    cluster.worker(ep)
    tap.wait("worker_joined", "event")
    t0 = time.monotonic()
    procs.signal(w1, signal.SIGKILL)
    t_lost, lost = tap.wait("worker_lost")
    assert t_lost - t0 < 1.2 and lost["severity"] == "critical" and lost["role"] == "primary"
    assert f":{w1.pid}:" in lost["subject"]  # the worker that was killed, not another
    tap.wait("redundancy_lost", subject="calc")
    assert {a["name"] for a in broker_status(ep)["alerts"]} >= {"worker_lost", "redundancy_lost"}
    cluster.worker(ep)
    tap.wait("worker_lost", "resolved")
    tap.wait("redundancy_lost", "resolved")
    print(f"\nworker_lost published {(t_lost - t0) * 1000:.0f} ms after kill -9")


def test_a_monitor_that_subscribes_late_hears_the_alerts_in_force(tapped, cluster, procs):
    ep, early, mon = tapped()
    w1 = cluster.worker(ep)
    cluster.worker(ep)
    early.wait("worker_joined", "event")
    procs.signal(w1, signal.SIGKILL)
    _, lost = early.wait("worker_lost")
    early.wait("redundancy_lost", subject="calc")
    late = MonitorTap(mon)  # subscribes after both were raised: a PUB alone would tell it nothing
    try:
        _, again = late.wait("worker_lost", "in_force")
        assert again["subject"] == lost["subject"] and again["severity"] == "critical" and not again["resolved"]
        late.wait("redundancy_lost", "in_force", subject="calc")
        assert not late.alerts("worker_joined")  # an event is over once published
        early.wait("worker_lost", "in_force")  # every subscriber hears the repeat
        cluster.worker(ep)
        late.wait("worker_lost", "resolved")
    finally:
        late.close()


def test_service_unavailable_and_queue_backlog_and_error_rate(tapped, cluster, procs, client_factory):
    ep, tap, _ = tapped("--backlog", "5", "--error-rate", "0.2")
    w = cluster.worker(ep, "--concurrency", "1")
    c = client_factory([ep], timeout=20)
    slow = [c.proxy("calc").sleep.future(0.2) for _ in range(8)]
    tap.wait("queue_backlog", subject="calc")
    [f.result() for f in slow]
    tap.wait("queue_backlog", "resolved")
    for _ in range(30):
        with pytest.raises(zrpc.RemoteError, match="division"):
            c.proxy("calc").div(1, 0)
    tap.wait("error_rate", subject="calc")
    for _ in range(200):
        c.proxy("calc").add(1, 1)
    tap.wait("error_rate", "resolved", timeout=15)
    procs.terminate(w)
    tap.wait("service_unavailable", subject="calc")
    cluster.worker(ep)
    tap.wait("service_unavailable", "resolved")


def test_latency_slo(tapped, cluster, client_factory):
    ep, tap, _ = tapped("--latency-slo", "0.05")
    cluster.worker(ep, "--concurrency", "8")
    c = client_factory([ep], timeout=20)
    for _ in range(3):
        [f.result() for f in [c.proxy("calc").sleep.future(0.1) for _ in range(16)]]
    _, alert = tap.wait("latency_slo", subject="calc")
    assert alert["detail"]["p99_ms"] > 50
    tap.wait("latency_slo", "resolved", timeout=15)  # no calls in the window: nothing to judge


def test_slow_worker_is_degraded(tapped, cluster, client_factory, tmp_path):
    (tmp_path / "latsvc.py").write_text(
        "import os, time, zrpc\n"
        "lat = zrpc.Service('lat')\n"
        "@lat.method\n"
        "def work():\n"
        "    time.sleep(float(os.environ.get('LAT_DELAY', '0')))  # noqa: sleep (a slow handler)\n"
        "    return os.getpid()\n")
    ep, tap, _ = tapped()
    env = {"PYTHONPATH": f"{tmp_path}:{cluster.procs.env['PYTHONPATH']}"}
    cluster.worker(ep, spec="latsvc", env=env)
    cluster.worker(ep, spec="latsvc", env=env)
    slow = cluster.worker(ep, spec="latsvc", env={**env, "LAT_DELAY": "0.15"})
    c = client_factory([ep], timeout=20)
    for _ in range(6):
        [f.result() for f in [c.proxy("lat").work.future() for _ in range(24)]]
    _, alert = tap.wait("worker_degraded")
    assert f":{slow.pid}:" in alert["subject"]
    assert alert["detail"]["ewma_ms"] > 100 and alert["detail"]["peers_median_ms"] < 50


def test_prometheus_metrics_parse(cluster, client_factory):
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    ep = cluster.broker("--metrics-port", str(port))
    cluster.worker(ep)
    c = client_factory([ep], timeout=5)
    for i in range(25):
        c.proxy("calc").add(i, i)

    def scrape():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        calls = [s.value for s in fams["zrpc_calls"].samples if s.labels.get("service") == "calc"
                 and s.name == "zrpc_calls_total"] if "zrpc_calls" in fams else []
        return fams if calls and calls[0] >= 25 else None

    fams = wait_until(scrape, 10, what="metrics with 25 calls")
    assert "zrpc_call_latency_seconds" in fams and "zrpc_worker_phi" in fams
    active = [s for s in fams["zrpc_broker_active"].samples]
    assert active[0].value == 1.0
    # the numbers mean something: an average latency can be computed (sum/count), phi is a
    # real value for the one worker
    lat = {s.name: s.value for s in fams["zrpc_call_latency_seconds"].samples
           if s.labels.get("service") == "calc" and not s.name.endswith("_bucket")}
    assert lat["zrpc_call_latency_seconds_count"] >= 25
    assert 0 < lat["zrpc_call_latency_seconds_sum"] / lat["zrpc_call_latency_seconds_count"] < 5, lat
    phis = [s.value for s in fams["zrpc_worker_phi"].samples]
    assert len(phis) == 1 and math.isfinite(phis[0]) and math.copysign(1, phis[0]) == 1, phis


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_monitor_cli_json_exec_and_webhook(tapped, cluster, tmp_path):
    ep, tap, mon = tapped()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out_file = tmp_path / "alerts.jsonl"
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "zrpc", "monitor", "--monitors", mon, "--json", "--no-metrics",
             "--exec", f"cat >> {out_file}; echo >> {out_file}",
             "--webhook", f"http://127.0.0.1:{server.server_port}/hook", "--count", "1"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "listening" in p.stderr.readline()
            # PUB drops events until the SUB has connected: make alerts until one is seen
            for _ in range(5):
                cluster.worker(ep, wait=False)  # worker_joined is the alert it gets
                try:
                    wait_until(lambda: p.poll() is not None, 3, what="monitor exits after one alert")
                    break
                except TimeoutError:
                    continue
            out, err = p.communicate(timeout=5)
        finally:
            if p.poll() is None:
                p.kill()
        line = json.loads(out.splitlines()[0])
        assert line["topic"] == "alert.worker_joined" and line["state"] == "event"
        assert json.loads(out_file.read_text().splitlines()[0])["name"] == "worker_joined"
        assert _Hook.received and _Hook.received[0]["name"] == "worker_joined"
    finally:
        server.shutdown()


def test_monitor_cli_reports_a_failing_hook_and_keeps_going(tapped, cluster):
    ep, tap, mon = tapped()
    p = subprocess.Popen(
        [sys.executable, "-m", "zrpc", "monitor", "--monitors", mon, "--no-metrics",
         "--exec", "exit 3", "--webhook", f"http://127.0.0.1:{free_port()}/nothing", "--count", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in p.stderr.readline()
        for _ in range(6):  # PUB drops events until the SUB has connected
            cluster.worker(ep)
            if p.poll() is not None:
                break
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "Traceback" not in err
    assert "exited 3" in err and "--webhook" in err
    assert out.count("worker_joined") == 2  # it went on after the first failure
