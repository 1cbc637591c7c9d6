"""Scenario 6: a worker's link turns slow and lossy (50 ms ± 10 ms each way, 5 % of packets
dropped each way) at default settings. No false worker_lost, every call completes; prints the
p50/p99 call latency with and without the faults, what worker_suspect did and the highest phi.

The delay comes from `tc netem` on the worker's link when the kernel has sch_netem, else from a
userspace relay on the worker's host that holds each chunk (tests/netchaos/_relay.py); the loss
always from nftables. The test prints which delay ran.
"""

from __future__ import annotations

import time

import pytest

from tests.netchaos._lab import Lab, not_ok, percentile
from zrpc import _defaults as D

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

DELAY, JITTER = 0.05, 0.01
LOSS = 5
BASE_SECONDS = 4.0
FAULT_SECONDS = 10.0
RELAY_PORTS = (15555, 15556)


def test_slow_lossy_worker_link_no_false_worker_lost(lab: Lab) -> None:
    a, b = lab.pair()
    netem, said = lab.net.has_netem()
    relay = None
    if netem:
        brokers = lab.endpoints
    else:  # the worker reaches each broker through the relay on its own host
        relay = lab.relay("c", {RELAY_PORTS[0]: f"{lab.net.ip('a')}:{D.FRONTEND_PORTS[0]}",
                                RELAY_PORTS[1]: f"{lab.net.ip('b')}:{D.FRONTEND_PORTS[1]}"}, DELAY, JITTER)
        brokers = [f"tcp://127.0.0.1:{p}" for p in RELAY_PORTS]
    c = lab.worker("c", brokers=brokers)
    lab.wait_registered([c.pid])
    load = lab.load("add:2", pace=0.02)
    load.wait_ok(20, what="calls before measuring")

    t_b0 = time.monotonic()
    lab.hold(BASE_SECONDS)
    t_f0 = time.monotonic()
    if relay is None:
        lab.net.delay("c", DELAY * 1000, JITTER * 1000)
    else:
        lab.delaying(relay, True)
    lab.net.loss("c", "a", LOSS)
    lab.net.loss("c", "b", LOSS)

    def not_lost() -> None:
        lost = [e for _, e in a.alerts("worker_lost", since=t_f0)]
        assert lost == [], f"worker_lost under {DELAY * 1000:.0f} ms and {LOSS} % loss: {lost}"

    lab.hold(FAULT_SECONDS, not_lost)
    t_f1 = time.monotonic()
    lab.net.heal()
    if relay is None:
        lab.net.undelay("c")
    else:
        lab.delaying(relay, False)
    load.wait_ok(20, since=time.monotonic(), what="calls after the faults")
    calls = load.stop()
    not_lost()

    lost = not_ok(calls)
    assert lost == [], f"{len(lost)} calls failed, e.g. {lost[:3]}"
    base = [x["t1"] - x["t0"] for x in calls if t_b0 <= x["t0"] < t_f0]
    slow = [x["t1"] - x["t0"] for x in calls if t_f0 + 0.5 <= x["t0"] < t_f1]
    assert base and slow
    p50, p99 = percentile(slow, 50), percentile(slow, 99)
    assert p50 >= 2 * (DELAY - JITTER), f"the delay was not in force (p50 {p50 * 1000:.0f} ms)"
    suspects = a.alerts("worker_suspect", "raised", t_f0)
    phis = [float(v) for t, s in a.statuses(t_f0) if t <= t_f1 for v in s.get("phi", {}).values() if v is not None]
    print(f"\nslow lossy worker link (delay by {'tc netem' if netem else 'userspace relay: ' + said}): "
          f"no worker_lost; worker_suspect raised {len(suspects)}x, highest phi {max(phis, default=0):.1f} "
          f"(threshold 8)\n"
          f"latency without faults: p50 {percentile(base, 50) * 1000:.1f} ms, p99 {percentile(base, 99) * 1000:.1f} ms "
          f"({len(base)} calls); with {DELAY * 1000:.0f}±{JITTER * 1000:.0f} ms and {LOSS} % loss: "
          f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms ({len(slow)} calls)")
