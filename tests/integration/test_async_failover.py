"""Calls in flight while the active broker is killed -9: the AsyncClient and the Client's
futures re-send them to the new active broker, and every one completes with its own result."""

from __future__ import annotations

import asyncio
import signal

import pytest

import zrpc
from tests.integration.test_client_loops import eventually
from zrpc.testing import wait_until

pytestmark = pytest.mark.slow

CALLS = 200
DELAY = 0.2  # 3 workers x 8 slots: the 200 calls take ~2 s, so most are queued or running at the kill


def start(cluster):
    pair = cluster.pair()
    for _ in range(3):
        cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
    cluster.wait_workers(pair.endpoints[1], 3)
    return pair


def test_async_client_loses_no_call_when_the_primary_is_killed(cluster, procs):
    pair = start(cluster)

    async def main() -> None:
        async with zrpc.AsyncClient(pair.endpoints, timeout=30) as c:
            add = c.proxy("calc").slow_add
            assert await add(0, 0, delay=0) == 0  # connected to the active broker
            futures = [add.future(i, 1000, delay=DELAY) for i in range(CALLS)]
            await eventually(lambda: sum(f.done() for f in futures) >= 10, 20, what="calls being served")
            procs.signal(pair.procs["primary"], signal.SIGKILL)
            in_flight = sum(not f.done() for f in futures)
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert errors == [], errors[:3]
            assert results == [i + 1000 for i in range(CALLS)]
            assert in_flight > CALLS // 2, in_flight  # the kill did hit calls in flight
            assert c._session.active == 1
            assert await add(1, 2, delay=0) == 3  # and the client goes on with the backup

    asyncio.run(main())
    wait_until(lambda: pair.states()[1] == "active", 10, what="backup active")


def test_client_futures_lose_no_call_when_the_primary_is_killed(cluster, client_factory, procs):
    pair = start(cluster)
    c = client_factory(pair.endpoints, timeout=30)
    add = c.proxy("calc").slow_add
    assert add(0, 0, delay=0) == 0
    futures = [add.future(i, 1000, delay=DELAY) for i in range(CALLS)]
    wait_until(lambda: sum(f.done() for f in futures) >= 10, 20, what="calls being served")
    procs.signal(pair.procs["primary"], signal.SIGKILL)
    in_flight = sum(not f.done() for f in futures)
    results = []
    for f in futures:
        try:
            results.append(f.result(timeout=60))
        except zrpc.ZrpcError as exc:
            results.append(exc)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors[:3]
    assert results == [i + 1000 for i in range(CALLS)]
    assert in_flight > CALLS // 2, in_flight
    assert add(1, 2, delay=0) == 3
