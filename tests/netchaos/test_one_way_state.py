"""Scenario 3: a state link that works one way only (the TCP flow carrying one broker's state
is cut; every other flow between the hosts works). The deaf broker says peer_lost; a client that
can reach only the backup then votes there:

- backup deaf (a hears b, b does not hear a): the backup takes over on the vote (its peer is
  silent) and the primary, which hears it active with a higher epoch, steps down at once
  (split_brain raised and resolved): dual-active lasts one state message, not longer;
- primary deaf (b hears a, a does not hear b): the backup hears its peer active and refuses the
  vote (NotActive until the call's deadline); nothing changes.

Either way the pair converges to one active broker, before and after the heal, and no call of
the load is lost.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.netchaos._lab import PEER_TIMEOUT, SLACK, Lab, judge_charges, ledger_runs, not_ok
from zrpc import _defaults as D

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

VOTE_TIMEOUT = 3.0


@pytest.mark.parametrize("deaf", ["backup", "primary"])
def test_one_way_state_link_converges(lab: Lab, deaf: str) -> None:
    a, b = lab.pair()
    c, d = lab.worker("c"), lab.worker("d")
    lab.wait_registered([c.pid, d.pid])
    load = lab.load("add:2,charge:1")
    load.wait_ok(50, what="calls before the fault")
    deaf_one, hearing = (b, a) if deaf == "backup" else (a, b)
    publisher = hearing  # the flow cut is the one that carries the hearing broker's state
    port = D.STATE_PORTS[0] if publisher is a else D.STATE_PORTS[1]

    t_cut = time.monotonic()
    lab.net.block_port("a", "b", port)
    lab.wait(lambda: deaf_one.alerts("peer_lost", "raised", t_cut) and deaf_one.now().get("peer_state") is None,
             PEER_TIMEOUT + SLACK, what=f"the deaf {deaf} says peer_lost")

    def one_way_only() -> None:
        assert lab.states() == ["active", "passive"], lab.describe()
        assert hearing.now().get("peer_state") is not None, f"the {hearing.role} stopped hearing: {hearing!r}"

    lab.hold(1.0, one_way_only)
    assert not hearing.alerts("peer_lost", since=t_cut)

    # a client that can reach only the backup: every request it sends there is a vote
    t_vote = time.monotonic()
    code, out = lab.once("e", "call", "net.add", "2", "3", "--brokers", b.endpoint, "--timeout",
                         str(VOTE_TIMEOUT), "--json", name="vote")
    answer = json.loads(out.strip().splitlines()[-1])
    if deaf == "backup":
        assert code == 0 and answer["result"]["sum"] == 5, out
        lab.wait(lambda: lab.states() == ["passive", "active"], PEER_TIMEOUT + SLACK,
                 what="the primary hears the backup active and steps down")
        t_b = b.first(lambda s: s["state"] == "active", t_vote)
        t_a = a.first(lambda s: s["state"] == "passive", t_vote)
        assert t_b is not None and t_a is not None
        dual = max(0.0, t_a - t_b)
        assert dual <= PEER_TIMEOUT + SLACK, f"both active for {dual:.2f}s"
        assert b.alerts("failover", "raised", t_vote), "the backup did not say it took over"
        assert a.alerts("split_brain", "raised", t_vote) and a.alerts("split_brain", "resolved", t_vote), \
            "the primary did not say it saw two actives"
        verdict = f"backup took over on the vote, both active for at most {dual:.2f}s"
        expected = ["passive", "active"]
    else:
        assert code == 1 and answer["error"]["type"] == "Timeout", out
        assert b.first(lambda s: s["state"] == "active", t_cut) is None, "the backup took over while hearing a"
        assert b.now()["not_active"] > 0, "the backup did not refuse the vote"
        verdict = f"backup refused the vote ({b.now()['not_active']} NotActive answers)"
        expected = ["active", "passive"]

    t_heal = time.monotonic()
    lab.net.heal("a", "b")
    lab.wait(lambda: deaf_one.alerts("peer_back", since=t_heal), 10, what="the deaf broker hears its peer again")
    lab.wait(lambda: lab.states() == expected and all(x.now().get("peer_state") for x in (a, b)), 10,
             what="one active, each hearing the other")
    load.wait_ok(50, since=time.monotonic(), what="calls after the heal")
    calls = load.stop()
    assert lab.states() == expected
    lost = not_ok(calls)
    assert lost == [], f"{len(lost)} idempotent calls lost, e.g. {lost[:3]}"
    problems, outcomes = judge_charges(calls, ledger_runs(lab.ledger))
    assert problems == [], problems
    print(f"\n{deaf} deaf: {verdict}; {len(calls)} calls, 0 lost, charges {dict(outcomes)}\n"
          f"alerts a: {a.alert_names(t_cut)}\nalerts b: {b.alert_names(t_cut)}")
