"""Scenario 5: a worker that reaches the primary but not the backup. Calls flow through the
primary, that worker among those serving them; after a failover to the backup, the backup
never counts that worker as serving (it never hears it) and all its calls go to the other
worker, until the worker's link to it heals and it registers there."""

from __future__ import annotations

import math
import time

import pytest

from tests.netchaos._lab import FAILOVER_TIMEOUT, REJOIN, SLACK, WORKER_SILENCE, Lab, not_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ALONE_SECONDS = 2.0
"""How long the backup serves with only the worker it hears."""


def test_worker_reaching_only_the_primary_is_not_served_by_the_backup(lab: Lab) -> None:
    a, b = lab.pair()
    c, d = lab.worker("c"), lab.worker("d")
    lab.wait_registered([c.pid, d.pid])
    load = lab.load("add:3")

    t_cut = time.monotonic()
    lab.net.cut("c", "b")
    lab.wait(lambda: c.pid not in b.now()["workers"], WORKER_SILENCE + SLACK, what="the backup forgets c")
    since = time.monotonic()
    lab.wait(lambda: {c.pid, d.pid} <= {x["pid"] for x in load.ok(since)}, 10,
             what="both workers serve through the primary")
    assert c.pid in a.now()["workers"] and b.now()["services"].get("net") == 1

    t_fo = time.monotonic()
    lab.net.isolate("a")
    t_active = lab.wait(lambda: b.first(lambda s: s["state"] == "active", t_fo), FAILOVER_TIMEOUT + SLACK,
                        what="the backup takes over")
    load.wait_ok(50, since=t_active, what="calls answered by the backup")

    def c_not_serving() -> None:
        now = b.now()
        assert c.pid not in now["workers"], f"the backup counts c, which it cannot hear: {b!r}"
        assert now["services"].get("net") == 1, f"the backup counts {now['services']} workers of net"

    lab.hold(ALONE_SECONDS, c_not_serving)

    t_heal = time.monotonic()
    lab.net.heal("c", "b")
    lab.wait_registered([c.pid], [b], timeout=REJOIN)
    # heard: its worker_joined alert, or the first status listing it (polls come 0.1 s apart)
    t_heard = min([t for t, e in b.alerts("worker_joined", since=t_heal) if f":{c.pid}:" in e["subject"]]
                  + [b.first(lambda s: c.pid in s["workers"], t_heal) or math.inf])
    lab.wait(lambda: any(x["pid"] == c.pid for x in load.ok(since=t_heard)), 10,
             what="c serves through the backup once it is heard")

    lab.net.heal()
    lab.wait(lambda: lab.states() == ["passive", "active"], 15, what="the old primary steps down")
    calls = load.stop()
    lost = not_ok(calls)
    assert lost == [], f"{len(lost)} calls lost, e.g. {lost[:3]}"
    # nothing c ran reached a client between the failover and the backup hearing c
    early = [x for x in calls if x["pid"] == c.pid and t_fo + 0.1 < x["t1"] < t_heard]
    assert early == [], f"answered by c before the backup heard it: {early[:3]}"
    print(f"\nasymmetric reach: backup active {t_active - t_fo:.2f}s after the primary was cut off, served "
          f"{len([x for x in calls if t_active <= x['t1'] < t_heard])} calls with d alone; heard c "
          f"{t_heard - t_heal:.2f}s after its link healed; {len(calls)} calls, 0 lost (cut c-b at "
          f"{lab.t(t_cut)})")
