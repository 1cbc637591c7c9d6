"""Member brokers on a real etcd: they register and see each other, a killed one leaves
within its lease's TTL and comes back, etcd going away costs no call (and is alerted, then
resolved, the lost leases registered again), several etcd endpoints are tried in turn,
`zrpc status --cluster` lists every member, and cluster mistakes on the command line are
one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests import REPO
from zrpc._defaults import LEASE_TTL
from zrpc._tools._procs import TRACEBACK
from zrpc.testing import free_port, wait_until

SLACK = 2.5
"""Seconds beyond the lease TTL a killed member may take to leave: etcd checks expiry every
half second, the watch delivers, the status is polled (a loaded 2-core machine adds more)."""


def test_members_see_each_other_and_a_killed_one_leaves_within_its_ttl_then_comes_back(
        etcd, members, procs):
    b1 = members(etcd.url, "b1")
    b1.wait_registered()
    b1.tap.wait_metrics()  # subscribed: it hears the others join
    b2, b3 = members(etcd.url, "b2"), members(etcd.url, "b3")
    for b in (b1, b2, b3):
        b.wait_members({"b1", "b2", "b3"})
    joined = {e["subject"] for _, e in b1.tap.alerts("member_joined")}
    assert joined == {"b2", "b3"}  # b3 found b1 and b2 there: no alert of its own for them
    assert all(b.cluster()["etcd"] == "ok" for b in (b1, b2, b3))

    code, out = procs.run("status", "--cluster", etcd.url, "--json", name="status")
    assert code == 0, out
    st = json.loads(out[out.index("{"):])
    assert [b["name"] for b in st["brokers"]] == ["b1", "b2", "b3"]
    assert all(b["state"] == "active" and b["lease_age_s"] is not None for b in st["brokers"])
    assert [b["endpoint"] for b in st["brokers"]] == [b1.frontend, b2.frontend, b3.frontend]
    assert st["cluster"]["members"] == ["b1", "b2", "b3"] and st["services"] == st["workers"] == []

    b2.tap.wait_metrics()
    t0 = time.monotonic()
    procs.kill(b3.proc)  # kill -9: nothing revokes its lease, it must expire
    for b in (b1, b2):
        b.wait_members({"b1", "b2"}, timeout=LEASE_TTL + SLACK + 5)
    left_after = time.monotonic() - t0
    assert left_after < LEASE_TTL + SLACK, f"b3 left {left_after:.1f}s after kill -9"
    for b in (b1, b2):
        _, alert = b.tap.wait("member_left", subject="b3")
        assert alert["severity"] == "warning"
    print(f"\na member killed with -9 left the others' view {left_after:.2f}s later")

    b3 = members(etcd.url, "b3")  # restarted: a new run, the same name
    for b in (b1, b2, b3):
        b.wait_members({"b1", "b2", "b3"})
    b1.tap.wait("member_left", "resolved", subject="b3")
    assert len(b1.tap.alerts("member_joined")) >= 3

    t0 = time.monotonic()
    procs.terminate(b2.proc)  # a clean stop revokes the lease: the others see it at once
    b1.wait_members({"b1", "b3"}, timeout=LEASE_TTL)
    assert time.monotonic() - t0 < LEASE_TTL


def test_etcd_down_costs_no_call_is_alerted_and_lost_leases_register_again(
        etcd, members, procs, cluster, client_factory):
    b1, b2 = members(etcd.url, "b1"), members(etcd.url, "b2")
    for b in (b1, b2):
        b.wait_registered()
        b.wait_members({"b1", "b2"})
    b1.tap.wait_metrics()
    cluster.worker(b1.frontend)
    client = client_factory(brokers=[b1.frontend], timeout=2.0)
    assert client.call("calc", "add", 1, 2) == 3

    etcd.kill()
    b1.tap.wait("etcd_unreachable", timeout=LEASE_TTL + 2)
    assert client.call("calc", "add", 2, 3) == 5
    c = b1.cluster()
    assert c["etcd"] == "unreachable" and c["members"] == ["b1", "b2"]  # as last seen
    b3 = members(etcd.url, "b3")  # nobody new joins while etcd is away
    wait_until(lambda: b1.cluster().get("registration") != "registered", LEASE_TTL + SLACK,
               what="b1's lease past its TTL")
    assert client.call("calc", "add", 3, 4) == 7
    wait_until(lambda: b3.cluster().get("etcd") == "unreachable", 15, what="b3 up, without etcd")
    assert b3.cluster()["registration"] != "registered"
    assert {a["name"] for a in b1.status()["alerts"]} >= {"etcd_unreachable"}

    etcd.start(0)  # the same data, the same port
    b1.tap.wait("etcd_unreachable", "resolved", timeout=10)
    for b in (b1, b2):
        b.wait_registered(times=2)  # registered again, on a new lease
    for b in (b1, b2, b3):
        b.wait_members({"b1", "b2", "b3"})
    _, joined = b1.tap.wait("member_joined", "event", subject="b3")
    assert joined["detail"]["frontend"] == b3.frontend
    assert not [a for a in b1.status()["alerts"] if a["name"] in ("etcd_unreachable", "member_left")]
    assert client.call("calc", "add", 4, 5) == 9


def test_several_etcd_endpoints_are_tried_in_turn(etcd3, members):
    b1 = members(etcd3.url, "b1")
    b1.wait_registered()
    b1.tap.wait_metrics()
    etcd3.kill(0)  # the endpoint it talks to first
    b2 = members(etcd3.url, "b2")
    for b in (b1, b2):
        b.wait_members({"b1", "b2"}, timeout=20)
    b1.tap.wait("member_joined", "event", subject="b2")  # its watch moved to a live endpoint
    until = time.monotonic() + LEASE_TTL + 0.5

    def kept_for_a_ttl() -> bool:  # polled: the lease must be kept all along, not just at the end
        c = b1.cluster()
        assert c["registration"] == "registered" and c["registrations"] == 1, c
        return time.monotonic() >= until

    wait_until(kept_for_a_ttl, LEASE_TTL + 10, interval=0.2, what="a whole TTL with the lease kept")
    assert b1.cluster()["etcd"] == "ok"


def test_status_shows_a_member_that_does_not_answer(etcd, members, procs):
    import etcd3gw

    b1 = members(etcd.url, "b1")
    b1.wait_registered()
    client = etcd3gw.client(host="127.0.0.1", port=etcd.members[0].client, timeout=2)
    lease = client.lease(30)
    ghost = f"tcp://127.0.0.1:{free_port()}"  # registered, but nobody serves there
    client.put("/zrpc/zrpc/brokers/ghost", json.dumps({"name": "ghost", "frontend": ghost}), lease=lease)
    try:
        code, out = procs.run("status", "--cluster", etcd.url, "--json", "--timeout", "0.5", name="status")
        assert code == 0, out
        st = json.loads(out[out.index("{"):])
        by_name = {b["name"]: b for b in st["brokers"]}
        assert by_name["b1"]["state"] == "active"
        assert by_name["ghost"]["state"] == "unreachable" and by_name["ghost"]["endpoint"] == ghost
        assert "error" in by_name["ghost"]
        # the tables, read as a person would (their "internal errors" column is no log problem)
        table = _cli(["status", "--cluster", etcd.url, "--timeout", "0.5"], {"COLUMNS": "200"})
        empty = _cli(["status", "--cluster", etcd.url, "--cluster-name", "empty"])
        out, err = table.communicate(timeout=30)
        assert table.returncode == 0 and "ghost" in out and "unreachable" in out, out + err
        assert TRACEBACK not in out + err
        out, err = empty.communicate(timeout=30)
        assert empty.returncode == 1 and "error: no broker is registered in cluster 'empty'" in err, out + err
    finally:
        lease.revoke()


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "zrpc", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
                                 **(env or {})})


CLI_CASES = [
    (["broker", "--cluster", "http://127.0.0.1:2379", "--name", "b1"], {}, ["--cluster", "expected etcd://"]),
    (["broker", "--cluster", "etcd://127.0.0.1:notaport", "--name", "b1"], {}, ["bad endpoint"]),
    (["broker", "--cluster", "etcd://127.0.0.1:2379"], {}, ["--cluster needs --name"]),
    (["broker", "--cluster", "etcd://127.0.0.1:2379", "--name", "b1", "--role", "backup"], {}, ["drop --role"]),
    (["broker", "--cluster", "etcd://127.0.0.1:2379", "--name", "b1", "--state", "tcp://127.0.0.1:1",
      "--peer-state", "tcp://127.0.0.1:2"], {}, ["drop --state and --peer-state"]),
    (["broker", "--name", "b1"], {}, ["--name is for a cluster member"]),
    (["broker", "--cluster", "etcd://127.0.0.1:2379", "--name", "a/b"], {}, ["invalid --name"]),
    (["status", "--cluster", "etcd://"], {}, ["expected etcd://"]),
    (["status"], {"ZRPC_CLUSTER": "nonsense"}, ["expected etcd://"]),
    (["status", "--cluster", "etcd://127.0.0.1:1"], {}, ["cannot read cluster", "cannot connect"]),
]


def test_cluster_mistakes_on_the_command_line_are_one_line():
    runs = [(_cli(args, env), args, words) for args, env, words in CLI_CASES]  # all at once
    for p, args, words in runs:
        out, err = p.communicate(timeout=60)
        assert p.returncode != 0, (args, out, err)
        assert TRACEBACK not in out + err, err
        errors = [line for line in err.splitlines() if line.lower().startswith("error")]
        assert len(errors) == 1, (args, err)
        for w in words:
            assert w in errors[0], (args, err)
