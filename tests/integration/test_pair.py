"""A Binary Star pair on loopback: one active, one passive, workers on both, status on both."""

import json
import subprocess
import sys

import pytest

import zrpc
from tests import REPO
from tests.conftest import broker_status


def test_pair_settles_and_serves_through_the_active_broker(cluster, client_factory):
    pair = cluster.pair()
    cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
    cluster.wait_workers(pair.endpoints[1], 1)  # registered with both
    c = client_factory(pair.endpoints, timeout=5)
    assert [c.proxy("calc").add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    primary, backup = (broker_status(ep) for ep in pair.endpoints)
    assert primary["counters"]["replies"] >= 20 and backup["counters"]["replies"] == 0
    assert (primary["broker"]["peer_state"], backup["broker"]["peer_state"]) == ("passive", "active")


def test_passive_broker_refuses_calls_but_answers_status(cluster):
    pair = cluster.pair()
    cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
    cluster.wait_workers(pair.endpoints[1], 1)  # the backup could serve the call, if it took over
    with zrpc.Client([pair.endpoints[1]], timeout=1) as only_backup:
        # the primary is alive, so a client vote on the backup must not make it take over:
        # every call is refused (NOT_ACTIVE, re-sent until its deadline), none is served
        for _ in range(3):
            with pytest.raises(zrpc.Timeout):
                only_backup.proxy("calc").add(1, 1)
        assert only_backup.call("zrpc", "ping") == "pong"
    assert pair.states() == ["active", "passive"]
    backup = broker_status(pair.endpoints[1])
    assert backup["counters"]["not_active"] >= 3 and backup["counters"]["replies"] == 0
    # on the wire: the refusal is an answer, NOT_ACTIVE, not silence
    import msgpack
    import zmq

    from zrpc._core._frames import CLIENT, Status

    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger, s.rcvtimeo = 0, 5000
        s.connect(pair.endpoints[1])
        s.send_multipart([msgpack.packb([CLIENT, 1, 42, "calc", "add", {"budget_ms": 3000}]),
                          msgpack.packb([[1, 1], {}])])
        head = msgpack.unpackb(s.recv_multipart()[0], raw=False)
        assert head[:4] == [CLIENT, 2, 42, Status.NOT_ACTIVE]
    finally:
        ctx.destroy(linger=0)


def test_client_starting_with_backup_first_finds_the_active_broker(cluster, client_factory):
    pair = cluster.pair()
    cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
    cluster.wait_workers(pair.endpoints[1], 1)
    c = client_factory(list(reversed(pair.endpoints)), timeout=5)
    assert c.proxy("calc").add(2, 2) == 4


def test_status_json_shows_both_brokers(cluster):
    pair = cluster.pair()
    p = subprocess.run([sys.executable, "-m", "zrpc", "status", "--json", "--brokers", pair.brokers],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    st = json.loads(p.stdout)
    assert [(b["role"], b["state"], b["peer_state"]) for b in st["brokers"]] == [
        ("primary", "active", "passive"), ("backup", "passive", "active")]


def test_broker_refuses_half_a_pair_configuration():
    p = subprocess.run([sys.executable, "-m", "zrpc", "broker", "--state", "tcp://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert p.returncode != 0 and "go together" in p.stderr and "Traceback" not in p.stderr
