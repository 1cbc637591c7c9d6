"""Scenario 4: a worker's host is cut from every other host while it runs calls. The active
broker declares it lost after interval x liveness and retries its idempotent calls on the
other worker, which answers them within that bound plus the call itself (and slack); when the
host comes back, the worker registers again and serves."""

from __future__ import annotations

import time

import pytest

from tests.netchaos._lab import REJOIN, SLACK, WORKER_SILENCE, Lab, not_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

HOLD = 0.4
"""Seconds each call holds its worker: several are in flight on the cut-off host."""
CUT_SECONDS = 3.0


def test_worker_host_cut_calls_retried_then_it_serves_again(lab: Lab) -> None:
    a, b = lab.pair()
    c, d = lab.worker("c"), lab.worker("d")
    lab.wait_registered([c.pid, d.pid])
    load = lab.load("hold:6", pace=0.0, hold=HOLD)
    lab.wait(lambda: {c.pid, d.pid} <= {x["pid"] for x in load.ok()}, 15, what="both workers serving")

    t_cut = time.monotonic()
    lab.net.isolate("c")
    t_lost = lab.wait(lambda: next((t for t, e in a.alerts("worker_lost", "raised", t_cut)
                                    if f":{c.pid}:" in e["subject"]), None), WORKER_SILENCE + SLACK,
                      what="the active broker declares the cut-off worker lost")
    lab.wait(lambda: a.now()["retries"] > 0, 5, what="the lost worker's calls retried")
    lab.hold(CUT_SECONDS - (time.monotonic() - t_cut))
    assert c.pid not in a.now()["workers"]

    t_heal = time.monotonic()
    lab.net.heal("c")
    # the worker reopens its links after a backoff that doubled while they were dead
    lab.wait_registered([c.pid], [a, b], timeout=REJOIN)
    t_back = time.monotonic()
    lab.wait(lambda: any(x["pid"] == c.pid for x in load.ok(since=t_back)), 10, what="the worker serves again")
    calls = load.stop()

    lost = not_ok(calls)
    assert lost == [], f"{len(lost)} calls lost, e.g. {lost[:3]}"
    # calls in flight on c at the cut: started before it, answered later than they take
    retried = [x for x in calls if x["t0"] < t_cut and x["t1"] > t_cut + HOLD + 0.15]
    assert retried, "no call was in flight at the cut"
    assert all(x["pid"] == d.pid for x in retried), [x for x in retried if x["pid"] != d.pid]
    worst = max(x["t1"] for x in retried) - t_cut
    bound = WORKER_SILENCE + HOLD + SLACK
    assert worst <= bound, f"a retried call took {worst:.2f}s after the cut (bound {bound:.2f}s)"
    on_c = [x for x in calls if x["pid"] == c.pid and t_lost < x["t0"] < t_heal]
    assert on_c == [], f"calls dispatched to the lost worker: {on_c[:3]}"
    print(f"\nworker host cut: worker_lost {t_lost - t_cut:.2f}s after the cut; {len(retried)} calls in flight "
          f"there answered by the other worker, the last {worst:.2f}s after the cut (bound {bound:.2f}s); "
          f"registered again {t_back - t_heal:.2f}s after the heal; {len(calls)} calls, 0 lost\n"
          f"alerts a: {a.alert_names(t_cut)}")
