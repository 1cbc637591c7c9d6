"""Scenario 1: only the link between the two broker hosts breaks. Clients still reach the
primary, the backup never takes over (it hears no client vote), and after the heal exactly
one broker is active and no call was lost."""

from __future__ import annotations

import time

import pytest

from tests.netchaos._lab import PEER_TIMEOUT, SLACK, Lab, judge_charges, ledger_runs, not_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CUT_SECONDS = 4.0
"""Eight peer timeouts: ample time for a wrong takeover to show."""


def test_peer_link_cut_backup_never_takes_over(lab: Lab) -> None:
    a, b = lab.pair()
    c, d = lab.worker("c"), lab.worker("d")
    lab.wait_registered([c.pid, d.pid])
    load = lab.load("add:2,charge:1")
    load.wait_ok(50, what="calls before the cut")

    t_cut = time.monotonic()
    lab.net.cut("a", "b")
    lab.wait(lambda: a.alerts("peer_lost", "raised", t_cut) and b.alerts("peer_lost", "raised", t_cut),
             PEER_TIMEOUT + SLACK, what="both brokers raise peer_lost")

    def invariant() -> None:
        assert b.state() == "passive", f"the backup left passive during the cut: {b!r}"
        assert a.state() == "active", f"the primary left active during the cut: {a!r}"

    lab.hold(CUT_SECONDS, invariant)
    served_during_cut = len(load.ok(since=t_cut))
    requests_during_cut = a.now()["requests"] - next(s for t, s in a.statuses() if t >= t_cut)["requests"]

    t_heal = time.monotonic()
    lab.net.heal("a", "b")
    lab.wait(lambda: a.alerts("peer_back", since=t_heal) and b.alerts("peer_back", since=t_heal),
             10, what="both brokers raise peer_back")
    lab.wait(lambda: a.now().get("peer_state") == "passive" and b.now().get("peer_state") == "active",
             5, what="each hears the other again")
    load.wait_ok(50, since=time.monotonic(), what="calls after the heal")
    calls = load.stop()

    assert lab.states() == ["active", "passive"]
    assert b.first(lambda s: s["state"] == "active") is None, "the backup was active at some point"
    assert served_during_cut > 0 and requests_during_cut > 0, "clients did not reach the primary during the cut"
    lost = not_ok(calls)
    assert lost == [], f"{len(lost)} idempotent calls lost, e.g. {lost[:3]}"
    problems, outcomes = judge_charges(calls, ledger_runs(lab.ledger))
    assert problems == []
    assert set(outcomes) == {"ok"}, outcomes
    print(f"\npeer link cut {CUT_SECONDS:g}s: {len(calls)} calls, {served_during_cut} answered during the cut, "
          f"0 lost; alerts a: {a.alert_names(t_cut)}; b: {b.alert_names(t_cut)}")
