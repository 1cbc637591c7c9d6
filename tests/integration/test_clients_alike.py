"""Client and AsyncClient behave alike: each behaviour is written once, against real broker and
worker processes, and runs for both clients.

`ClientsAlike` holds the behaviours; a subclass per client says how to make one (`make_client`)
and how to call through it (the driver it returns), as pyzmq's test_auth does for its
authenticators. The AsyncClient is driven on an event loop of its own, in a thread, so the
behaviours read the same for both.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

import zrpc
from tests.conftest import broker_status
from zrpc._core._proxy import MethodProxy
from zrpc.testing import wait_until

T = TypeVar("T")

CALLS = 200
DELAY = 0.2  # 3 workers x 8 slots: the 200 calls take ~2 s, so most are queued or running at the kill


class Driver:
    """Calls through one client, the same way for both kinds; results and errors as they come."""

    client: Any

    def call(self, service: str, name: str, *args: Any, options: dict[str, Any] | None = None,
             **kwargs: Any) -> Any:
        raise NotImplementedError

    def futures(self, service: str, name: str, calls: Sequence[tuple[Any, ...]],
                **kwargs: Any) -> list[Any]:
        """Sends every call at once (pipelined); the futures, of the client's kind."""
        raise NotImplementedError

    def done(self, futures: list[Any]) -> int:
        raise NotImplementedError

    def results(self, futures: list[Any], timeout: float) -> list[Any]:
        """Each future's result, or the ZrpcError it failed with."""
        raise NotImplementedError

    def close(self) -> None:
        self.client.close()

    def end(self) -> None:
        """After the test: the client closed (again), and whatever ran it released."""
        self.close()


def proxy_for(client: Any, service: str, name: str, options: dict[str, Any] | None) -> MethodProxy:
    """The same proxy path for both clients: `client.proxy(service).name.with_options(...)`."""
    m: MethodProxy = getattr(client.proxy(service), name)
    return m.with_options(**options) if options else m


class ThreadDriver(Driver):
    def __init__(self, brokers: Sequence[str], **kw: Any) -> None:
        self.client = zrpc.Client(brokers, **kw)

    def call(self, service: str, name: str, *args: Any, options: dict[str, Any] | None = None,
             **kwargs: Any) -> Any:
        return proxy_for(self.client, service, name, options)(*args, **kwargs)

    def futures(self, service: str, name: str, calls: Sequence[tuple[Any, ...]],
                **kwargs: Any) -> list[Any]:
        m = proxy_for(self.client, service, name, None)
        return [m.future(*a, **kwargs) for a in calls]

    def done(self, futures: list[Any]) -> int:
        return sum(f.done() for f in futures)

    def results(self, futures: list[Future[Any]], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        out: list[Any] = []
        for f in futures:
            try:
                out.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
            except zrpc.ZrpcError as exc:
                out.append(exc)
        return out


class LoopDriver(Driver):
    """An AsyncClient on its own event loop: every step runs there, the test thread waits."""

    def __init__(self, brokers: Sequence[str], **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-event-loop", daemon=True)
        self._thread.start()

        async def make() -> zrpc.AsyncClient:
            return zrpc.AsyncClient(brokers, **kw)

        self.client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 90) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, service: str, name: str, *args: Any, options: dict[str, Any] | None = None,
             **kwargs: Any) -> Any:
        async def go() -> Any:
            return await proxy_for(self.client, service, name, options)(*args, **kwargs)

        return self._run(go())

    def futures(self, service: str, name: str, calls: Sequence[tuple[Any, ...]],
                **kwargs: Any) -> list[Any]:
        async def go() -> list[Any]:
            m = proxy_for(self.client, service, name, None)
            return [m.future(*a, **kwargs) for a in calls]

        return self._run(go())

    def done(self, futures: list[Any]) -> int:
        async def go() -> int:
            return sum(f.done() for f in futures)

        return self._run(go())

    def results(self, futures: list[asyncio.Future[Any]], timeout: float) -> list[Any]:
        async def go() -> list[Any]:
            got = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
            for r in got:
                if isinstance(r, BaseException) and not isinstance(r, zrpc.ZrpcError):
                    raise r
            return got

        return self._run(go())

    def close(self) -> None:
        self._run(self.client.close(), timeout=10)

    def end(self) -> None:
        try:
            self.close()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


class ClientsAlike:
    """The behaviours. Not collected itself (no Test prefix): its subclasses are."""

    def make_client(self, brokers: Sequence[str], **kw: Any) -> Driver:
        raise NotImplementedError

    @pytest.fixture
    def connect(self) -> Iterator[Callable[..., Driver]]:
        """Makes drivers; closes them after the test, which fails if a loop contained a bug
        or a broker sent what the client could not read."""
        made: list[Driver] = []

        def make(brokers: Sequence[str], **kw: Any) -> Driver:
            d = self.make_client(brokers, **kw)
            made.append(d)
            return d

        yield make
        for d in made:
            d.end()
        assert [(d.client.internal_errors, d.client.malformed) for d in made] == [(0, 0)] * len(made)

    @pytest.fixture
    def one(self, cluster: Any) -> str:
        """One broker with one calc worker."""
        ep: str = cluster.broker()
        cluster.worker(ep)
        return ep

    # --- calls ---------------------------------------------------------------------------

    def test_a_call_returns_its_result(self, one: str, connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=5)
        assert c.call("calc", "add", 1, 2) == 3
        assert c.call("calc", "add", 40, b=2) == 42
        value = {"a": [1, "x", b"\x00"], "n": None, "f": 1.5}
        assert c.call("calc", "echo", value) == value

    def test_futures_are_pipelined_and_each_gets_its_own_result(self, one: str,
                                                                 connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=20)
        futures = c.futures("calc", "add", [(i, 1) for i in range(300)])
        assert c.results(futures, 20) == [i + 1 for i in range(300)]

    # --- errors, each mapped to its exception --------------------------------------------

    def test_a_raising_handler_is_a_remote_error_raised_or_in_its_future(
            self, one: str, connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=5)
        with pytest.raises(zrpc.RemoteError) as info:
            c.call("calc", "div", 1, 0)
        e = info.value
        assert e.remote_type == "ZeroDivisionError" and "division" in e.message
        assert "Traceback" in (e.remote_traceback or "")
        ok, failed = c.results(c.futures("calc", "div", [(6, 3), (1, 0)]), 5)
        assert ok == 2 and isinstance(failed, zrpc.RemoteError) and failed.remote_type == "ZeroDivisionError"

    def test_an_unknown_method_is_method_not_found(self, one: str, connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=5)
        with pytest.raises(zrpc.MethodNotFound):
            c.call("calc", "nope")
        assert c.call("calc", "add", 1, 1) == 2

    def test_an_unknown_service_is_unavailable(self, one: str, connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=5)
        with pytest.raises(zrpc.ServiceUnavailable):
            c.call("nosuch", "add", 1, 2)  # after the broker's grace for a restarting worker

    def test_a_per_call_timeout_raises_timeout_at_its_deadline(self, cluster: Any, one: str,
                                                               connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=5)
        start = time.monotonic()
        with pytest.raises(zrpc.Timeout):
            c.call("calc", "sleep", 1.0, options={"timeout": 0.3})
        assert 0.3 <= time.monotonic() - start < 0.9  # the call's deadline: not the reply, nor 5 s
        assert c.call("calc", "add", 2, 2) == 4  # and the client goes on
        # the sleep ends at the worker before the test does (a call in flight slows teardown)
        cluster.wait(lambda: (broker_status(one) or {}).get("inflight") == 0, 5, what="worker idle")

    def test_bad_arguments_are_refused_before_anything_is_sent(self, one: str,
                                                               connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=5)
        with pytest.raises(ValueError):
            c.call("", "add", 1, 2)
        with pytest.raises(ValueError):
            c.call("calc", "add", 1, 2, options={"timeout": -1})
        assert c.call("calc", "add", 1, 2) == 3

    def test_a_closed_client_refuses_calls(self, one: str, connect: Callable[..., Driver]) -> None:
        c = connect([one], timeout=5)
        assert c.call("calc", "add", 1, 2) == 3
        c.close()
        with pytest.raises(zrpc.ZrpcError, match="closed"):
            c.call("calc", "add", 1, 2)
        c.close()  # idempotent

    # --- failover ------------------------------------------------------------------------

    @pytest.mark.slow
    def test_no_call_is_lost_when_the_primary_is_killed(self, cluster: Any, procs: Any,
                                                        connect: Callable[..., Driver]) -> None:
        """Calls in flight while the active broker is killed -9 are re-sent to the backup, and
        every one completes with its own result."""
        pair = cluster.pair()
        for _ in range(3):
            cluster.worker(pair.endpoints[0], "--brokers", pair.brokers)
        cluster.wait_workers(pair.endpoints[1], 3)
        c = connect(pair.endpoints, timeout=30)
        assert c.call("calc", "slow_add", 0, 0, delay=0) == 0  # connected to the active broker
        futures = c.futures("calc", "slow_add", [(i, 1000) for i in range(CALLS)], delay=DELAY)
        wait_until(lambda: c.done(futures) >= 10, 20, what="calls being served")
        procs.signal(pair.procs["primary"], signal.SIGKILL)
        in_flight = CALLS - c.done(futures)
        results = c.results(futures, 60)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors[:3]
        assert results == [i + 1000 for i in range(CALLS)]
        assert in_flight > CALLS // 2, in_flight  # the kill did hit calls in flight
        assert c.client._session.active == 1
        assert c.call("calc", "slow_add", 1, 2, delay=0) == 3  # and the client goes on with the backup
        wait_until(lambda: pair.states()[1] == "active", 10, what="backup active")


class TestClient(ClientsAlike):
    def make_client(self, brokers: Sequence[str], **kw: Any) -> Driver:
        return ThreadDriver(brokers, **kw)


class TestAsyncClient(ClientsAlike):
    def make_client(self, brokers: Sequence[str], **kw: Any) -> Driver:
        return LoopDriver(brokers, **kw)
