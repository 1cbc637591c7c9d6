"""`zrpc health` and `zrpc.health` on real processes: the exit code for a serving service, one
with no worker, one never seen and no broker at all; --json; a pair (only the active broker
serves); a cluster found through etcd."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import zrpc
from tests import REPO
from tests.cluster.conftest import etcd  # noqa: F401 (the fixture)
from tests.conftest import broker_status
from zrpc._tools.cli.health import ask_brokers
from zrpc.testing import free_port, wait_until


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zrpc", "health", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO)


def test_exit_codes_for_serving_no_worker_and_unknown(cluster, procs):
    ep = cluster.broker()
    worker = cluster.worker(ep)
    p = health("calc", "--brokers", ep)
    assert p.returncode == 0 and p.stdout.startswith("calc: SERVING"), p.stdout + p.stderr
    assert f"{ep}: SERVING (active)" in p.stdout
    p = health("--brokers", ep)  # no service: the broker itself
    assert p.returncode == 0 and p.stdout.startswith("broker: SERVING")
    p = health("nothing", "--brokers", ep)
    assert p.returncode == 1 and p.stdout.startswith("nothing: UNKNOWN")
    procs.terminate(worker)  # it leaves: calc is known, and nobody serves it
    wait_until(lambda: not (broker_status(ep) or {"workers": [1]})["workers"], 10, what="the worker gone")
    p = health("calc", "--brokers", ep)
    assert p.returncode == 1 and p.stdout.startswith("calc: NOT_SERVING"), p.stdout


def test_json_says_what_each_broker_answered(cluster):
    ep = cluster.broker()
    cluster.worker(ep)
    p = health("calc", "--brokers", ep, "--json")
    assert p.returncode == 0
    assert json.loads(p.stdout) == {"service": "calc", "status": "SERVING", "brokers": [
        {"endpoint": ep, "status": "SERVING", "state": "active"}]}
    p = health("nothing", "--brokers", ep, "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["status"] == "UNKNOWN"


def test_no_broker_is_exit_1_quickly():
    dead = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    t0 = time.monotonic()
    answers = ask_brokers(dead, "calc", 0.5)
    assert time.monotonic() - t0 < 1.0  # both asked at once, each for its timeout
    assert [a["error"] for a in answers] == ["no answer within 0.5s"] * 2
    p = health("calc", "--brokers", ",".join(dead), "--json")
    assert p.returncode == 1 and "no broker answered" in p.stderr and "Traceback" not in p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "UNKNOWN" and [b["status"] for b in out["brokers"]] == [None, None]
    p = health("calc", "--brokers", "not-an-endpoint")
    assert p.returncode == 2  # a usage error, as click says


def test_only_the_active_broker_of_a_pair_serves(cluster):
    pair = cluster.pair()
    cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
    cluster.wait_workers(pair.endpoints[1], 1)
    p = health("calc", "--brokers", pair.brokers, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    said = {b["endpoint"]: (b["status"], b["state"]) for b in json.loads(p.stdout)["brokers"]}
    assert said == {pair.endpoints[0]: ("SERVING", "active"),
                    pair.endpoints[1]: ("NOT_SERVING", "passive")}
    with zrpc.Client([pair.endpoints[1]], timeout=2) as c:  # the passive one answers too
        assert c.call("zrpc", "health")["status"] == "NOT_SERVING"


def test_cluster_members_found_through_etcd(procs, etcd):  # noqa: F811 (the fixture)
    frontend = f"tcp://127.0.0.1:{free_port()}"
    procs.zrpc("broker", "--cluster", etcd.url, "--name", "b1", "--frontend", frontend,
               "--log-level", "debug", name="b1")
    wait_until(lambda: (broker_status(frontend) or {}).get("cluster", {}).get("registration")
               == "registered", 20, what="b1 registered")
    p = health("calc", "--cluster", etcd.url)
    assert p.returncode == 1 and p.stdout.startswith("calc: UNKNOWN"), p.stdout + p.stderr
    procs.zrpc("worker", "zrpc.examples.calc:calc", "--cluster", etcd.url, "--log-level", "debug",
               name="worker")
    wait_until(lambda: health("calc", "--cluster", etcd.url).returncode == 0, 20,
               what="calc serving in the cluster")
    out = json.loads(health("calc", "--cluster", etcd.url, "--json").stdout)
    assert out["brokers"] == [{"endpoint": frontend, "status": "SERVING", "state": "active"}]
    p = health("calc", "--cluster", f"etcd://127.0.0.1:{free_port()}", "--timeout", "0.3")
    assert p.returncode == 1 and "cannot read cluster" in p.stderr and "Traceback" not in p.stderr
