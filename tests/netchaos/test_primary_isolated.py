"""Scenario 2: the primary's host is cut from every other host under load. Clients fail over to
the backup within the failover timeout; no idempotent call is lost and no charge runs twice;
when the primary's host comes back, the lower epoch (the old primary) steps down and returns
passive, and no worker ran a call for it after the cut. Prints the failover time and the counts.

The heal comes in two steps, the state link first, then the rest; the last test heals in
the other order: a worker fences the old primary before its state link delivers, oldest
first, what the backup published during the cut. Those messages are history (Binary Star
rule 11): the old primary stays passive.

The old primary may accept requests after the heal, until it hears the new active broker:
the calls its clients had sent just before the cut, delivered late by TCP's retransmission.
No worker may run them for it: it lost its workers during the cut, and a worker that joins it
again reports the higher epoch in its next heartbeat. Without a worker it answers them
ServiceUnavailable, and their clients, answered by the backup long before, drop the answers.
"""

from __future__ import annotations

import time

import pytest

from tests.netchaos._lab import (
    FAILOVER_TIMEOUT,
    REJOIN,
    SLACK,
    Lab,
    judge_charges,
    ledger_runs,
    longest_gap,
    not_ok,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ISOLATED_SECONDS = 3.0
"""How long the backup serves alone while the old primary is cut off."""
STEP_DOWN = 15.0
"""Seconds after its state link heals by which the old primary has heard the new active broker
and stepped down: the state messages wait for TCP's next retransmission, whose backoff grew
(doubling from 0.2 s) all through the cut."""


def test_primary_isolated_fails_over_once_and_comes_back_passive(lab: Lab) -> None:
    a, b = lab.pair()
    c, d = lab.worker("c"), lab.worker("d")
    lab.wait_registered([c.pid, d.pid])
    load = lab.load("add:3,charge:2")
    load.wait_ok(100, what="calls before the cut")

    t_cut = time.monotonic()
    lab.net.isolate("a")
    t_active = lab.wait(lambda: b.first(lambda s: s["state"] == "active" and s["serving"], t_cut),
                        FAILOVER_TIMEOUT + SLACK, what="the backup takes over")
    load.wait_ok(100, since=t_active, what="calls answered by the backup")
    # what the cut-off primary had done once the cut was in force (its witness is local)
    before = lab.wait(lambda: a.statuses(t_cut + 0.3), 5, what="a status of the cut-off primary")[0][1]

    def served_nothing() -> None:
        now = a.now()
        assert now["replies"] == before["replies"], \
            f"a worker answered the cut-off primary: replies {before['replies']} -> {now['replies']}"

    def isolated() -> None:
        served_nothing()
        assert a.now()["requests"] == before["requests"], "the cut-off primary accepted calls"
        assert b.state() == "active", f"the backup left active: {b!r}"

    lab.hold(ISOLATED_SECONDS, isolated)

    # the state link heals first: the old primary hears the new active broker before any
    # worker can fence it (the other order is the last test)
    t_heal = time.monotonic()
    lab.net.heal("a", "b")
    lab.wait(lambda: lab.states() == ["passive", "active"], STEP_DOWN, what="the old primary steps down")
    t_passive = a.first(lambda s: s["state"] == "passive", t_heal)
    lab.net.heal("a")
    t_rest = time.monotonic()
    lab.wait_registered([c.pid, d.pid], [a], timeout=REJOIN)  # a spare again
    t_whole = time.monotonic()
    assert lab.states() == ["passive", "active"]
    load.wait_ok(100, since=time.monotonic(), what="calls after the heal")
    calls = load.stop()
    served_nothing()
    late = a.now()["requests"] - before["requests"]

    first_ok = min(c["t1"] for c in load.ok(since=t_active))
    gap = longest_gap(calls, t_cut, t_heal)
    lost = not_ok(calls)
    problems, outcomes = judge_charges(calls, ledger_runs(lab.ledger))
    runs = ledger_runs(lab.ledger)
    adds = [c for c in calls if c["m"] == "add"]
    print(f"\nprimary isolated: backup active {t_active - t_cut:.2f}s after the cut, first call answered "
          f"after {first_ok - t_cut:.2f}s, longest gap without an answer {gap:.2f}s "
          f"(failover timeout {FAILOVER_TIMEOUT:g}s); both said active for {(t_passive or t_heal) - t_heal:.2f}s "
          f"after its state link healed; it accepted {late} late request(s), answered "
          f"{a.now()['unavailable'] - before['unavailable']} ServiceUnavailable, ran none; the workers "
          f"registered with it again {t_whole - t_rest:.2f}s after its other links healed\n"
          f"calls: {len(adds)} add ({len(lost)} lost), charges {dict(outcomes)}, {sum(runs.values())} "
          f"executions, max {max(runs.values(), default=0)} per charge\n"
          f"alerts a: {a.alert_names(t_cut)}\nalerts b: {b.alert_names(t_cut)}")
    assert gap <= FAILOVER_TIMEOUT + SLACK
    assert lost == [], f"{len(lost)} idempotent calls lost, e.g. {lost[:3]}"
    assert problems == [], problems
    old_epoch = [s["epoch"] for _, s in a.statuses() if s["state"] == "active"][-1]
    assert old_epoch < b.now()["epoch"], "the broker that stepped down had the higher epoch"
    assert b.alerts("failover", "raised", t_cut), "the backup did not say it took over"
    assert b.alerts("failover", "resolved", t_heal), "failover not resolved when the old primary came back"
    splits = a.alerts("split_brain", since=t_heal) + b.alerts("split_brain", since=t_heal)
    assert [e for _, e in splits if e["state"] == "raised"], "nobody said both were active"
    for x in (a, b):
        raised, resolved = (len(x.alerts("split_brain", s, t_heal)) for s in ("raised", "resolved"))
        assert raised == resolved, f"split_brain on {x.host} raised {raised}x, resolved {resolved}x"


class SecondTakeover(AssertionError):
    """The old primary took over again, on the backup's replayed history."""


def test_old_primary_fenced_by_a_worker_stays_passive_when_its_state_link_heals(lab: Lab) -> None:
    """The order of the heal that the full heal above hits now and then: the primary's links
    to workers and clients first (a worker fences it), its state link last."""
    a, b = lab.pair()
    c, d = lab.worker("c"), lab.worker("d")
    lab.wait_registered([c.pid, d.pid])
    load = lab.load("add:2,charge:1")
    load.wait_ok(50, what="calls before the cut")
    t_cut = time.monotonic()
    lab.net.isolate("a")
    lab.wait(lambda: b.first(lambda s: s["state"] == "active", t_cut), FAILOVER_TIMEOUT + SLACK,
             what="the backup takes over")
    lab.hold(ISOLATED_SECONDS)
    for host in ("c", "d", "e"):
        lab.net.heal("a", host)
    t_fenced = lab.wait(lambda: a.first(lambda s: s["state"] == "passive", t_cut),
                        REJOIN, what="a worker fences the old primary")
    t_heal = time.monotonic()
    lab.net.heal("a", "b")
    lab.wait(lambda: a.now().get("peer_state") is not None and b.now().get("peer_state") is not None,
             STEP_DOWN, what="both hear each other again")
    lab.hold(1.0)
    calls = load.stop()
    problems, outcomes = judge_charges(calls, ledger_runs(lab.ledger))
    print(f"\nfenced at {lab.t(t_fenced)}, state link healed at {lab.t(t_heal)}; states now {lab.states()}; "
          f"charges {dict(outcomes)}, problems {problems}\nalerts a: {a.alert_names(t_heal)}\n"
          f"alerts b: {b.alert_names(t_heal)}")
    assert not_ok(calls) == [] and problems == []
    stepped_down = b.first(lambda s: s["state"] != "active", t_fenced)
    if stepped_down is not None or lab.states() != ["passive", "active"]:
        raise SecondTakeover(f"the serving backup stepped down at {lab.t(stepped_down)}; states now "
                             f"{lab.states()}; alerts of a: {a.alert_names(t_heal)}")
