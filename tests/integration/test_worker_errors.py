"""A handler's error or result that cannot be encoded as it is still gets an answer, and costs
no capacity: a real broker, a real worker with concurrency 2, real clients."""

from __future__ import annotations

import pytest

import zrpc

SPEC = "tests.worker_services:bad"


@pytest.mark.parametrize("method, message", [
    ("surrogate", "caf\\udce9"),
    ("unprintable", "<unprintable Unprintable object>"),
    ("async_surrogate", "caf\\udce9"),
    ("async_unprintable", "<unprintable Unprintable object>"),
])
def test_errors_that_cannot_be_encoded_are_answered_and_cost_no_slot(
        cluster, client_factory, method, message):
    ep = cluster.broker()
    cluster.worker(ep, "--concurrency", "2", spec=SPEC)
    c = client_factory([ep], timeout=10)
    bad = c.proxy("bad")
    for _ in range(10):  # five times the worker's concurrency
        with pytest.raises(zrpc.RemoteError) as info:
            getattr(bad, method)()
        assert info.value.message == message
        assert info.value.remote_type in ("ValueError", "Unprintable")
    assert bad.add(2, 3) == 5
    assert bad.async_add(4, 5) == 9
    # all ten at once: both slots are free, and the queue drains
    futures = [getattr(bad, method).future() for _ in range(10)]
    assert all(isinstance(f.exception(timeout=10), zrpc.RemoteError) for f in futures)
    assert bad.add(1, 1) == 2


def test_a_result_holding_a_lone_surrogate_is_an_error_not_a_lost_call(cluster, client_factory):
    ep = cluster.broker()
    cluster.worker(ep, "--concurrency", "2", spec=SPEC)
    c = client_factory([ep], timeout=10)
    for _ in range(5):
        with pytest.raises(zrpc.RemoteError) as info:
            c.call("bad", "surrogate_result")
        assert info.value.remote_type == "TypeError" and "msgpack" in info.value.message
    assert c.call("bad", "add", 1, 2) == 3
