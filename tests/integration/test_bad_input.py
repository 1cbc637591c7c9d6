"""A broker and a worker survive garbage on their sockets and keep serving."""

import random
import time

import msgpack
import pytest
import zmq

from tests import run_to_end
from tests.conftest import broker_status
from zrpc._core._frames import CLIENT, WORKER
from zrpc.testing import free_port, hostile_message, wait_until


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_broker_survives_thousands_of_malformed_messages(cluster, client_factory):
    ep = cluster.broker()
    cluster.worker(ep)
    pid = broker_status(ep)["broker"]["pid"]
    ctx = zmq.Context()
    rng = random.Random(7)
    try:
        rss0 = None
        for round_ in range(2):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(ep)
            for i in range(3000):
                s.send_multipart(hostile_message(rng, i))
            # most are malformed; the socket stays open until they are all delivered
            wait_until(lambda round_=round_: (broker_status(ep) or {}).get("counters", {}).get("malformed", 0)
                       >= 1500 * (round_ + 1), 15, what="malformed messages counted")
            # the answerable ones (a readable request id, bad headers) got PROTOCOL_ERROR
            answers: dict[int, int] = {}
            while s.poll(1000):
                head = msgpack.unpackb(s.recv_multipart()[0], raw=False)
                if head[1] == 2:  # a REPLY (a hostile heartbeat gets a heartbeat back)
                    answers[head[2]] = head[3]
            bad_headers = [rid for rid, status in answers.items() if rid % 16 in (1, 13) and status == 7]
            assert len(bad_headers) > 100, sorted(answers.items())[:20]
            s.close()
            # the queued calls (bounded in bytes) expire: the broker holds nothing any more
            wait_until(lambda: (lambda st: st and st["queued_bytes"] == 0 and st["inflight"] == 0)(
                broker_status(ep)), 15, what="the flood's calls gone")
            if rss0 is None:
                rss0 = rss_kb(pid)
        c = client_factory([ep], timeout=5)
        assert c.proxy("calc").add(2, 2) == 4
        # a second flood leaves memory where the first did (the broker hands freed memory
        # back once a second); the bound is generous for a shared, noisy machine
        wait_until(lambda: rss_kb(pid) - rss0 < 50_000, 5, what="RSS back within 50 MB of the first flood")
    finally:
        ctx.destroy(linger=0)


def test_oversized_message_drops_only_that_connection(cluster, client_factory):
    from zmq.utils.monitor import recv_monitor_message

    ep = cluster.broker("--max-message-size", str(1024 * 1024))
    cluster.worker(ep)
    c = client_factory([ep], timeout=5)
    assert c.proxy("calc").add(1, 1) == 2  # a client connected before, and kept
    before = broker_status(ep)["counters"]
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        events = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        s.connect(ep)
        assert recv_monitor_message(events)["event"] == zmq.EVENT_CONNECTED
        s.send_multipart([b"\x00" * (50 * 1024 * 1024), b""])
        # the broker's libzmq refuses it at the frame header: this connection is dropped ...
        events.rcvtimeo = 15_000
        assert recv_monitor_message(events)["event"] == zmq.EVENT_DISCONNECTED
        # ... and nothing of it reached the broker (it never allocated 50 MB to read it)
        after = broker_status(ep)["counters"]
        assert after["malformed"] == before["malformed"], (before, after)
        assert c.proxy("calc").add(2, 2) == 4
        s.disable_monitor()
    finally:
        ctx.destroy(linger=0)


def test_bad_body_gets_a_protocol_error_reply(cluster):
    ep = cluster.broker()
    cluster.worker(ep)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.rcvtimeo = 5000
        s.connect(ep)
        s.send_multipart([msgpack.packb([CLIENT, 1, 5, "calc", "add", {"budget_ms": 3000}]), b"\xc1"])
        head, body = s.recv_multipart()
        assert msgpack.unpackb(head)[:4] == [CLIENT, 2, 5, 7]  # PROTOCOL_ERROR
    finally:
        ctx.destroy(linger=0)


def test_worker_survives_garbage_from_a_broker(cluster, client_factory):
    real = cluster.broker()
    fake_ep = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    try:
        fake = ctx.socket(zmq.ROUTER)
        fake.linger = 0
        fake.rcvtimeo = 10000
        # a broker's queues hold 100,000 messages; a ROUTER's default of 1,000 would drop some
        # of the 2,001 below, silently, whenever libzmq's I/O thread falls behind (a busy machine)
        fake.sndhwm = 0
        fake.bind(fake_ep)
        w = cluster.worker(real, "--brokers", f"{real},{fake_ep}")
        wid = fake.recv_multipart()[0]  # its READY
        pk = lambda o: msgpack.packb(o, use_bin_type=True)  # noqa: E731
        # the fake heartbeats the worker as a broker does: a silent link is dropped and re-opened
        # (Paranoid Pirate), and whatever was sent to it meanwhile would be lost. A few rounds,
        # each waiting for the worker's next message, so the garbage follows a fresh heartbeat
        # on a link that is up
        beat = [wid, pk([WORKER, 4, {}]), b""]
        for _ in range(4):
            fake.send_multipart(beat)
            fake.recv_multipart()
        while True:
            try:
                fake.recv_multipart(zmq.NOBLOCK)  # what it sent before now
            except zmq.Again:
                break
        fake.send_multipart(beat)
        rng = random.Random(3)
        for i in range(2000):
            if i % 3 == 0:
                frames = [rng.randbytes(rng.randrange(0, 40))]
            elif i % 3 == 1:
                frames = [pk([WORKER, 1, b"c", i, "calc", "add", {}]), rng.randbytes(10)]
            else:
                frames = [pk([WORKER, 1, b"c", i, "calc", "nope", {"budget_ms": 100}]), b""]
            fake.send_multipart([wid, *frames])
        # a last, valid call on the same connection: its answer means every message before it
        # has been read (one connection keeps order)
        fake.send_multipart([wid, pk([WORKER, 1, b"c", 99_999, "calc", "add", {"budget_ms": 5000}]),
                             pk([[20, 22], {}])])
        # and it goes on heartbeating while the worker works through them: a worker that has
        # read everything hears nothing more, and a backlog longer than its liveness would
        # make it drop this link (and send the replies through the real broker)
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + 30
        next_beat = 0.0
        while 99_999 not in statuses:
            assert time.monotonic() < deadline, "the worker never answered the last, valid call"
            if time.monotonic() >= next_beat:
                fake.send_multipart(beat)
                next_beat = time.monotonic() + 0.1
            if not fake.poll(100):
                continue
            f = fake.recv_multipart()
            head = msgpack.unpackb(f[1], raw=False)
            if head[1] == 2:  # a REPLY: [tag, 2, client_id, request_id, status]
                statuses[head[3]] = head[4]
        assert msgpack.unpackb(f[2]) == 42 and statuses[99_999] == 0
        # what could be answered was answered, and said why
        assert {statuses[i] for i in statuses if i % 3 == 1} <= {7}  # undecodable body: PROTOCOL_ERROR
        assert {statuses[i] for i in statuses if i % 3 == 2 and i < 2000} <= {4}  # METHOD_NOT_FOUND
        assert sum(1 for i in statuses if i % 3 == 1) > 300 and sum(1 for i in statuses if i % 3 == 2) > 300
        c = client_factory([real], timeout=5)
        assert c.proxy("calc").add(3, 4) == 7
        assert w.poll() is None
    finally:
        ctx.destroy(linger=0)


@pytest.mark.slow
def test_fuzz_script_bounded_run():
    """benchmarks/fuzz_broker.py, smaller: broker and worker survive, serve, and stay lean."""
    import json
    import sys

    code, out, err = run_to_end([sys.executable, "benchmarks/fuzz_broker.py", "--messages", "20000", "--json"],
                                timeout=300)
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"]  # includes RSS growth within the script's bound
    assert report["call_after"] and all(report["alive"].values())
    assert report["broker_counters"]["malformed"] > 5000
