"""The clients' loops against a scripted broker (a ROUTER in this process): hostile heartbeats,
undecodable frames, a loop that dies, callbacks that call back, close() from anywhere."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any

import pytest
import zmq

import zrpc
from zrpc._core._frames import (
    CLIENT,
    ClientReply,
    ClientRequest,
    Heartbeat,
    Status,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_result, unpack_call
from zrpc.testing import wait_until


class FakeBroker:
    """Answers heartbeats with `info` and `add`/`echo` requests with their result; a test can
    make it silent, or send any frames to every client it has heard."""

    def __init__(self, info: dict[str, Any] | None = None, answer: bool = True) -> None:
        self.info = info if info is not None else {"state": "active", "epoch": 1}
        self.answer = answer
        self.heartbeats = 0
        self.requests = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._peers: list[bytes] = []
        self._out: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def send(self, frames: list[bytes]) -> None:
        self._out.put(frames)

    def _run(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            if sock.poll(10):
                peer, *frames = sock.recv_multipart()
                if peer not in self._peers:
                    self._peers.append(peer)
                msg = decode_frames(frames)
                if type(msg) is Heartbeat:
                    self.heartbeats += 1
                    sock.send_multipart([peer, *encode(Heartbeat(CLIENT, self.info))])
                elif type(msg) is ClientRequest:
                    self.requests += 1
                    if self.answer:
                        args, _ = unpack_call(msg.body)
                        result = sum(args) if msg.method == "add" else args
                        sock.send_multipart([peer, *encode(ClientReply(msg.request_id, Status.OK,
                                                                       pack_result(result)))])
            while not self._out.empty():
                frames = self._out.get()
                for p in self._peers:
                    sock.send_multipart([p, *frames])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()


@pytest.fixture
def fakes():
    made: list[FakeBroker] = []

    def make(**kw: Any) -> FakeBroker:
        b = FakeBroker(**kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def heard_by(*brokers: FakeBroker, n: int = 4) -> None:
    """The client's loop is alive: it keeps heartbeating every broker."""
    wait_until(lambda: all(b.heartbeats >= n for b in brokers), 10, what="client heartbeats")


async def eventually(pred: Any, timeout: float, what: str) -> None:
    """wait_until for a coroutine: polls `pred` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:g}s")
        await asyncio.sleep(0.02)  # noqa: sleep (polling with a deadline)


BAD_EPOCHS = ["x", float("inf"), float("nan"), [1], {"e": 1}]


# --- 1. hostile heartbeats ------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", BAD_EPOCHS, ids=repr)
def test_client_survives_a_heartbeat_with_a_bad_epoch(fakes, client_factory, epoch):
    a, b = fakes(), fakes(info={"state": "active", "epoch": epoch})
    c = client_factory([a.endpoint, b.endpoint], timeout=3)
    heard_by(a, b, n=6)  # both sides' heartbeats were compared, more than once
    assert c.call("calc", "add", 1, 2) == 3
    assert c.internal_errors == 0


@pytest.mark.parametrize("epoch", BAD_EPOCHS, ids=repr)
def test_async_client_survives_a_heartbeat_with_a_bad_epoch(fakes, epoch):
    a, b = fakes(), fakes(info={"state": "active", "epoch": epoch})

    async def main() -> None:
        async with zrpc.AsyncClient([a.endpoint, b.endpoint], timeout=3) as c:
            assert await c.call("calc", "add", 1, 2) == 3
            n = a.heartbeats + b.heartbeats
            await eventually(lambda: a.heartbeats + b.heartbeats >= n + 8, 10,  # it keeps running
                             what="client heartbeats")
            assert await asyncio.wait_for(c.call("calc", "add", 2, 2), 3) == 4
            assert c.internal_errors == 0

    asyncio.run(asyncio.wait_for(main(), 20))


# --- 7. undecodable frames ------------------------------------------------------------------------


def dropped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "zrpc.client" and r.levelno == logging.WARNING and "malformed" in r.getMessage()]


def test_undecodable_frames_are_counted_logged_and_dropped(fakes, client_factory, caplog):
    caplog.set_level(logging.WARNING, logger="zrpc.client")
    a = fakes()
    c = client_factory([a.endpoint], timeout=3)
    heard_by(a, n=1)
    a.send([b"\xc1garbage", b""])
    a.send([b"x", b"y", b"z"])
    wait_until(lambda: c.malformed >= 2, 5, what="malformed frames counted")
    assert c.call("calc", "add", 1, 1) == 2
    lines = dropped_lines(caplog)
    assert len(lines) == 2 and lines[0].startswith(f"dropped malformed message #1 from broker {a.endpoint}: ")


def test_async_undecodable_frames_are_counted_logged_and_dropped(fakes, caplog):
    caplog.set_level(logging.WARNING, logger="zrpc.client")
    a = fakes()

    async def main() -> None:
        async with zrpc.AsyncClient([a.endpoint], timeout=3) as c:
            assert await c.call("calc", "add", 1, 1) == 2
            a.send([b"\xc1garbage", b""])
            a.send([b"x", b"y", b"z"])
            await eventually(lambda: c.malformed >= 2, 5, what="malformed frames counted")
            assert await c.call("calc", "add", 2, 1) == 3

    asyncio.run(asyncio.wait_for(main(), 10))
    lines = dropped_lines(caplog)
    assert len(lines) == 2 and lines[0].startswith(f"dropped malformed message #1 from broker {a.endpoint}: ")


# --- 2. containment, and a loop that dies anyway ------------------------------------------------


def test_a_bug_in_one_tick_costs_nothing_but_is_counted(fakes, client_factory, monkeypatch):
    a = fakes()
    c = client_factory([a.endpoint], timeout=3)
    real = c._session.tick
    failed = threading.Event()

    def tick() -> list[Any]:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("injected")
        return real()

    monkeypatch.setattr(c._session, "tick", tick)
    c._waker.wake()
    wait_until(failed.is_set, 5, what="the injected failure")
    assert c.call("calc", "add", 1, 2) == 3
    assert c.internal_errors == 1


def test_a_dead_io_thread_fails_every_call_at_once(fakes, client_factory, monkeypatch):
    a = fakes(answer=False)
    c = client_factory([a.endpoint], timeout=60)
    pending = [c.future("calc", "add", i, 1) for i in range(10)]
    wait_until(lambda: a.requests == 10, 5, what="calls sent")

    def tick() -> list[Any]:
        raise SystemExit("injected")

    monkeypatch.setattr(c._session, "tick", tick)
    c._waker.wake()
    for f in pending:
        with pytest.raises(zrpc.ZrpcError, match="client I/O thread died"):
            f.result(timeout=5)
    with pytest.raises(zrpc.ZrpcError, match="client I/O thread died"):
        c.future("calc", "add", 1, 1)  # at once: no future that could never resolve
    with pytest.raises(zrpc.ZrpcError, match="client I/O thread died"):
        c.call("calc", "add", 1, 1)
    assert c.internal_errors == 1  # the death itself is an internal error, logged once
    c.close()
    assert c._ctx.closed


def test_a_dead_async_reader_fails_every_call_at_once(fakes, monkeypatch):
    a = fakes(answer=False)

    async def main() -> None:
        c = zrpc.AsyncClient([a.endpoint], timeout=60)
        try:
            pending = [c.future("calc", "add", i, 1) for i in range(10)]
            await eventually(lambda: a.requests == 10, 5, what="calls sent")

            def tick() -> list[Any]:
                raise SystemExit("injected")

            monkeypatch.setattr(c._session, "tick", tick)
            for f in pending:
                with pytest.raises(zrpc.ZrpcError, match="client I/O task died"):
                    await asyncio.wait_for(f, 5)
            with pytest.raises(zrpc.ZrpcError, match="client I/O task died"):
                c.future("calc", "add", 1, 1)
            assert c.internal_errors == 1
        finally:
            await c.close()
        assert c._ctx.closed

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_bug_in_the_async_reader_is_contained(fakes, monkeypatch):
    a = fakes()

    async def main() -> None:
        async with zrpc.AsyncClient([a.endpoint], timeout=3) as c:
            assert await c.call("calc", "add", 1, 2) == 3
            real = c._session.tick
            calls = {"n": 0}

            def tick() -> list[Any]:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("injected")
                return real()

            monkeypatch.setattr(c._session, "tick", tick)
            assert await asyncio.wait_for(c.call("calc", "add", 2, 2), 5) == 4
            await eventually(lambda: calls["n"] >= 3, 5, what="timer steps after the failure")
            assert c.internal_errors == 1

    asyncio.run(asyncio.wait_for(main(), 20))


# --- 3. done-callbacks never run on the I/O thread ------------------------------------------------


def test_a_done_callback_can_make_a_nested_blocking_call(fakes, client_factory):
    a = fakes()
    c = client_factory([a.endpoint], timeout=2)
    got: Future[Any] = Future()

    def callback(f: Future[Any]) -> None:
        try:
            got.set_result((f.result(), c.call("calc", "add", 10, 20), threading.current_thread()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            got.set_exception(exc)

    c.future("calc", "add", 1, 2).add_done_callback(callback)
    first, nested, thread = got.result(timeout=10)
    assert (first, nested) == (3, 30)
    assert thread is not c._thread


def test_many_callbacks_each_calling_back(fakes, client_factory):
    a = fakes()
    c = client_factory([a.endpoint], timeout=5)
    results: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for i in range(50):
        c.future("calc", "add", i, 0).add_done_callback(
            lambda f: results.put(c.future("calc", "add", f.result(), 1).result(5)))
    got = sorted(results.get(timeout=10) for _ in range(50))
    assert got == [i + 1 for i in range(50)]


def test_a_callback_added_after_completion_runs_in_the_caller(fakes, client_factory):
    a = fakes()
    c = client_factory([a.endpoint], timeout=2)
    f = c.future("calc", "add", 1, 1)
    assert f.result(5) == 2
    seen = []
    f.add_done_callback(lambda f: seen.append(threading.current_thread()))
    assert seen == [threading.current_thread()]


def test_a_future_without_callbacks_needs_no_callback_thread(fakes, client_factory):
    """The hot path: no thread hop unless someone asked for a callback."""
    a = fakes()
    c = client_factory([a.endpoint], timeout=2)
    assert c.call("calc", "add", 1, 1) == 2
    assert c._callbacks is None  # the callback thread was never needed, so never started


# --- 4. submit/close race ---------------------------------------------------------------------------


def test_a_call_prepared_while_the_client_closes_still_resolves(fakes, client_factory, monkeypatch):
    a = fakes(answer=False)
    c = client_factory([a.endpoint], timeout=60)
    inside, release = threading.Event(), threading.Event()
    real = c._session.table.prepare

    def prepare(*args: Any, **kw: Any) -> Any:
        call = real(*args, **kw)
        inside.set()
        release.wait(10)  # close() runs to its end right here
        return call

    monkeypatch.setattr(c._session.table, "prepare", prepare)
    out: Future[Any] = Future()

    def submit() -> None:
        try:
            out.set_result(c.future("calc", "add", 1, 1))
        except zrpc.ZrpcError as exc:
            out.set_result(exc)

    t = threading.Thread(target=submit)
    t.start()
    assert inside.wait(5)
    c.close()
    release.set()
    t.join(5)
    got = out.result(5)
    if isinstance(got, Future):
        with pytest.raises(zrpc.ZrpcError):
            got.result(timeout=5)
    else:
        assert isinstance(got, zrpc.ZrpcError)


def _submit_until_closed(c: zrpc.Client, futures: list[Future[Any]], go: threading.Event) -> None:
    go.wait()
    for i in range(2000):
        try:
            futures.append(c.future("calc", "echo", i))
        except zrpc.ZrpcError:
            return


def test_many_threads_submitting_while_another_closes(fakes):
    """Thread switches every 10 us make the interleaving likely (about one trial in four lost
    a future before close() and submit agreed under a lock)."""
    import sys
    import time

    a = fakes(answer=False)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(30):
            c = zrpc.Client([a.endpoint], timeout=60)
            futures: list[Future[Any]] = []
            go = threading.Event()
            threads = [threading.Thread(target=_submit_until_closed, args=(c, futures, go))
                       for _ in range(6)]
            for t in threads:
                t.start()
            go.set()
            wait_until(lambda fs=futures: len(fs) >= 20, 10, interval=0.001, what="calls submitted")
            c.close()
            for t in threads:
                t.join(10)
            bound = time.monotonic() + 10
            for f in futures:
                with pytest.raises(zrpc.ZrpcError):  # closed, not lost: none waits for its 60 s
                    f.result(timeout=max(0.0, bound - time.monotonic()))
    finally:
        sys.setswitchinterval(old)


# --- 5. close() from anywhere ---------------------------------------------------------------------


def test_close_from_a_done_callback(fakes):
    a = fakes()
    c = zrpc.Client([a.endpoint], timeout=2)
    done: Future[Any] = Future()

    def callback(f: Future[Any]) -> None:
        try:
            c.close()
            done.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            done.set_exception(exc)

    c.future("calc", "add", 1, 2).add_done_callback(callback)
    done.result(timeout=10)
    wait_until(lambda: c._ctx.closed, 10, what="context terminated")
    with pytest.raises(zrpc.ZrpcError, match="closed"):
        c.call("calc", "add", 1, 1)
    c.close()  # idempotent


def test_close_from_the_io_thread_releases_the_context(fakes, monkeypatch):
    a = fakes(answer=False)
    c = zrpc.Client([a.endpoint], timeout=60)
    pending = c.future("calc", "add", 1, 2)
    wait_until(lambda: a.requests == 1, 5, what="call sent")
    errors: list[BaseException] = []

    def tick() -> list[Any]:
        try:
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)
        return []

    monkeypatch.setattr(c._session, "tick", tick)
    c._waker.wake()
    with pytest.raises(zrpc.ZrpcError, match="closed"):
        pending.result(timeout=5)
    wait_until(lambda: c._ctx.closed, 10, what="context terminated")
    assert errors == []
    assert not c._thread.is_alive() or c._thread.join(5) is None
    c.close()
    assert c.internal_errors == 0


def test_close_twice_and_from_two_threads(fakes):
    a = fakes()
    c = zrpc.Client([a.endpoint], timeout=2)
    assert c.call("calc", "add", 1, 2) == 3
    ts = [threading.Thread(target=c.close) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    c.close()
    assert c._ctx.closed


def test_async_close_twice(fakes):
    a = fakes()

    async def main() -> None:
        c = zrpc.AsyncClient([a.endpoint], timeout=2)
        assert await c.call("calc", "add", 1, 2) == 3
        await c.close()
        await c.close()
        assert c._ctx.closed
        with pytest.raises(zrpc.ZrpcError, match="closed"):
            c.future("calc", "add", 1, 1)

    asyncio.run(asyncio.wait_for(main(), 10))
