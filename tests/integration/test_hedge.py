"""Hedged and redundant calls through real brokers and workers (docs/protocol.md §7, rules
16-17): a slow worker's calls are answered by a fast one near `hedge_after`; a worker that
answers wrongly is named in a `result_mismatch` alert; a non-idempotent method is never run
twice, hedged or redundant."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import zrpc
from tests.conftest import broker_status
from tests.monitor_tap import MonitorTap
from zrpc.testing import free_port

SPEC = "tests.worker_services:twin"
HEDGE_AFTER = 0.05
SLOW = 3.0  # the slow worker's delay: far beyond any hedged call's time


def counters(ep: str) -> dict[str, int]:
    status = broker_status(ep)
    assert status is not None
    return status["counters"]


def names(ep: str) -> dict[int, str]:
    """Worker pid -> worker name, as the broker knows them."""
    status = broker_status(ep)
    assert status is not None
    return {w["pid"]: w["name"] for w in status["workers"]}


@pytest.fixture
def tapped(cluster: Any) -> Any:
    mon = f"tcp://127.0.0.1:{free_port()}"
    ep = cluster.broker("--monitor", mon)
    tap = MonitorTap(mon)
    tap.wait_metrics()  # subscribed and receiving
    yield ep, tap
    tap.close()


def test_hedged_calls_to_a_slow_worker_are_answered_by_the_fast_one(cluster: Any,
                                                                     client_factory: Any) -> None:
    ep = cluster.broker()
    slow = cluster.worker(ep, spec=SPEC, env={"ZRPC_TEST_DELAY": str(SLOW)}, name="slow")
    fast = cluster.worker(ep, spec=SPEC, name="fast")
    c = client_factory([ep], timeout=10)
    who = c.proxy("twin").who.with_options(hedge_after=HEDGE_AFTER, max_attempts=2)
    took = []
    for _ in range(8):  # ties alternate: about half go to the slow worker first
        t0 = time.monotonic()
        assert who() == fast.pid
        took.append(time.monotonic() - t0)
    hedged = [t for t in took if t >= HEDGE_AFTER]
    assert hedged, took  # some went to the slow worker first: answered after the hedge
    assert max(took) < HEDGE_AFTER + 1.0, took  # near hedge_after, far from SLOW
    n = counters(ep)["hedges"]
    assert 1 <= n <= len(took)

    async def hedged_async() -> list[int]:  # the same from an AsyncClient
        async with zrpc.AsyncClient([ep], timeout=10) as ac:
            p = ac.proxy("twin").who.with_options(hedge_after=HEDGE_AFTER)
            return [await p() for _ in range(4)] + [await p.future()]

    assert asyncio.run(hedged_async()) == [fast.pid] * 5
    n = counters(ep)["hedges"]
    # the slow copies finish later: their replies are dropped, counted
    cluster.wait(lambda: counters(ep)["cancelled_replies"] >= n, SLOW + 10,
                 what="the slow worker's replies dropped")
    assert slow.poll() is None
    print(f"\nhedged calls took {min(hedged) * 1000:.0f}..{max(hedged) * 1000:.0f} ms "
          f"(hedge_after {HEDGE_AFTER * 1000:.0f} ms, slow worker {SLOW:g} s)")


def test_a_redundant_call_to_a_wrong_worker_raises_result_mismatch(tapped: Any, cluster: Any,
                                                                   client_factory: Any) -> None:
    ep, tap = tapped
    right = cluster.worker(ep, spec=SPEC, name="right")
    wrong = cluster.worker(ep, spec=SPEC, env={"ZRPC_TEST_SKEW": "1"}, name="wrong")
    c = client_factory([ep], timeout=10)
    assert c.proxy("twin").add.with_options(redundant=2)(1, 2) in (3, 4)  # the first reply
    _, alert = tap.wait("result_mismatch", "event")
    by_pid = names(ep)
    assert alert["subject"] == "twin.add"
    detail = alert["detail"]
    assert sorted(detail["workers"]) == sorted([by_pid[right.pid], by_pid[wrong.pid]])
    assert (detail["service"], detail["method"]) == ("twin", "add")
    assert isinstance(detail["request_id"], int)
    assert counters(ep)["result_mismatches"] == 1


def test_redundant_agreeing_workers_raise_nothing(cluster: Any, client_factory: Any) -> None:
    ep = cluster.broker()
    cluster.worker(ep, spec=SPEC)
    cluster.worker(ep, spec=SPEC)
    c = client_factory([ep], timeout=10)
    add = c.proxy("twin").add.with_options(redundant=2)
    assert [add(i, i) for i in range(5)] == [0, 2, 4, 6, 8]
    cluster.wait(lambda: counters(ep)["cancelled_replies"] == 5, 10,
                 what="the second copies compared")
    got = counters(ep)
    assert (got["redundant_copies"], got["result_mismatches"]) == (5, 0)


def test_non_idempotent_calls_are_never_run_twice(cluster: Any, client_factory: Any,
                                                  tmp_path: Path) -> None:
    ep = cluster.broker()
    ledger = tmp_path / "ledger"
    env = {"ZRPC_LEDGER": str(ledger)}
    cluster.worker(ep, spec=SPEC, env=env)
    cluster.worker(ep, spec=SPEC, env=env)
    c = client_factory([ep], timeout=10)
    charge = c.proxy("twin").charge
    with pytest.raises(zrpc.ProtocolError, match="not idempotent"):
        charge.with_options(redundant=2)("acct")
    assert not ledger.exists()  # refused, never run
    # hedged: the header is ignored; it runs once, however slow
    pid = charge.with_options(hedge_after=HEDGE_AFTER)("slow", delay=0.5)
    assert ledger.read_text().splitlines() == [f"slow {pid}"]
    got = counters(ep)
    assert (got["copies_refused"], got["hedges_ignored"], got["hedges"]) == (1, 1, 0)
