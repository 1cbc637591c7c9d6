"""Scenario 2 of consensus-backed failover: the active broker cut from etcd, and from nothing
else (its clients and workers still reach it), on throwaway hosts (tests/netchaos): a and b
the candidates, c and d workers, e the clients and etcd. The active broker cannot renew its
lease, so it stops serving before etcd can expire it, and says lease_lost; the other takes the
role once etcd has expired it; the two never serve at once; no idempotent call is lost and no
charge runs twice. Healed, the old holder learns its lease is gone and stays passive.

The hosts are skipped, with the reason, where namespaces cannot be built (tests/netchaos)."""

from __future__ import annotations

import time

import pytest

from tests.cluster.conftest import etcd_binary
from tests.elect.conftest import ETCD_EXPIRY_CHECK, FENCE, INTERVAL, SLACK, TTL
from tests.netchaos._lab import Broker, Lab, Record, judge_charges, ledger_runs, not_ok
from zrpc import _defaults as D

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ETCD_PORT = 2379
ETCD_HOST = "e"


def start_etcd(lab: Lab) -> str:
    """One etcd member on host e; its etcd:// URL."""
    ip = lab.net.ip(ETCD_HOST)
    lab.spawn(ETCD_HOST, [str(etcd_binary()), "--name", "e0", "--data-dir", str(lab.tmp / "etcd-e0"),
                          "--listen-client-urls", f"http://{ip}:{ETCD_PORT}",
                          "--advertise-client-urls", f"http://{ip}:{ETCD_PORT}",
                          "--listen-peer-urls", f"http://{ip}:2380",
                          "--initial-advertise-peer-urls", f"http://{ip}:2380",
                          "--initial-cluster", f"e0=http://{ip}:2380", "--initial-cluster-state", "new",
                          "--heartbeat-interval", "50", "--election-timeout", "500",
                          "--unsafe-no-fsync", "--log-level", "warn"], name="etcd")
    return f"etcd://{ip}:{ETCD_PORT}"


def elected_pair(lab: Lab, url: str) -> tuple[Broker, Broker]:
    """Candidates on a (primary) and b (backup), each with its witness; a active, b passive."""
    made = []
    for i, (host, role) in enumerate((("a", "primary"), ("b", "backup"))):
        ip = lab.net.ip(host)
        b = Broker(host, role, f"tcp://{ip}:{D.FRONTEND_PORTS[i]}", f"tcp://{ip}:{D.MONITOR_PORTS[i]}",
                   Record(lab.tmp / f"witness-{host}.jsonl"))
        lab.python(host, "tests.netchaos._watch", "--broker", b.endpoint, "--monitor", b.monitor,
                   "--out", str(b.witness.path), name=f"witness-{host}")
        made.append(b)
    lab.brokers = made
    lab.wait(lambda: all(any(r.get("hello") for r in b.witness.lines()) for b in made), 20, what="witnesses up")
    for b in made:
        b.proc = lab.python(b.host, "zrpc", "broker", "--role", b.role, "--elect", url,
                            "--frontend", b.endpoint, "--monitor", b.monitor, "--log-level", "debug",
                            name=f"broker-{b.host}")
    lab.wait(lambda: lab.states() == ["active", "passive"], 30, what="a active, b passive")
    return made[0], made[1]


def test_the_active_cut_from_etcd_alone_stops_itself_before_the_other_takes_over(lab: Lab) -> None:
    url = start_etcd(lab)
    a, b = elected_pair(lab, url)
    c, d = lab.worker("c"), lab.worker("d")
    lab.wait_registered([c.pid, d.pid])
    load = lab.load("add:3,charge:2")
    load.wait_ok(100, what="calls before the cut")

    t_cut = time.monotonic()
    lab.net.block_port("a", ETCD_HOST, ETCD_PORT)  # a still reaches its clients and workers
    t_stop = lab.wait(lambda: a.first(lambda s: s["state"] != "active", t_cut), FENCE + SLACK + 5,
                      what="the cut-off holder stopping itself")
    t_b = lab.wait(lambda: b.first(lambda s: s["state"] == "active" and s["serving"], t_cut),
                   TTL + ETCD_EXPIRY_CHECK + INTERVAL + SLACK + 5, what="the other taking over")
    last_a = max((t for t, s in a.statuses(t_cut) if s["state"] == "active"), default=t_cut)
    load.wait_ok(100, since=t_b, what="calls answered by the new holder")
    lost = lab.wait(lambda: a.alerts("lease_lost", "raised", since=t_cut), 5, what="lease_lost from a")
    lab.wait(lambda: b.alerts("failover", "raised", since=t_cut), 5, what="failover from b")

    def one_holder() -> None:
        assert a.state() != "active", f"the cut-off broker serves again: {a!r}"
        assert b.state() == "active", f"the holder left active: {b!r}"

    lab.hold(2.0, one_holder)
    t_heal = time.monotonic()
    lab.net.heal("a", ETCD_HOST)
    lab.wait(lambda: (a.now().get("alerts") is not None
                      and not any(x.startswith("lease_lost") for x in a.now()["alerts"])), 15,
             what="the old holder with a lease again (lease_lost resolved)")
    lab.hold(2.0, one_holder)
    calls = load.stop()
    lost_calls = not_ok(calls)
    problems, outcomes = judge_charges(calls, ledger_runs(lab.ledger))
    stopped_after, took = t_stop - t_cut, t_b - t_cut
    print(f"\nthe active cut from etcd only: it stopped serving {stopped_after:.2f}s after the cut "
          f"(fence {FENCE:.1f}s after its last renewal), the other served {took:.2f}s after it "
          f"({t_b - last_a:.2f}s after a's last active status); {len(calls)} calls, "
          f"{len(lost_calls)} idempotent ones lost; charges {dict(outcomes)}; lease_lost: "
          f"{lost[0][1]['detail'].get('reason')}; healed at +{t_heal - t_cut:.1f}s, a stays passive")
    assert last_a < t_b, "both served at once"
    assert stopped_after < FENCE + SLACK
    assert took < TTL + ETCD_EXPIRY_CHECK + INTERVAL + SLACK
    assert lost_calls == [], lost_calls[:3]
    assert problems == [], problems
