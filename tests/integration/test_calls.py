"""Real broker and worker processes on loopback: the call path end to end."""

import asyncio
import collections
import time

import pytest

import zrpc
from tests.conftest import broker_status
from zrpc.testing import wait_until


@pytest.fixture
def one(cluster):
    ep = cluster.broker()
    cluster.worker(ep)
    return ep


def test_call_proxy_and_plain(one, client_factory):
    c = client_factory([one], timeout=5)
    assert c.proxy("calc").add(1, 2) == 3
    assert c.call("calc", "add", 40, b=2) == 42
    assert c.proxy("calc").echo({"a": [1, "x", b"\x00"]}) == {"a": [1, "x", b"\x00"]}


def test_thousand_futures_pipelined(one, client_factory):
    c = client_factory([one], timeout=20)
    calc = c.proxy("calc")
    # every slot of the worker (8) is held, so the adds sent meanwhile wait at the broker: they
    # are all there at once only if the client sends without waiting for earlier replies
    held = [calc.sleep.future(2.0) for _ in range(8)]
    futures = [calc.add.future(i, i) for i in range(1000)]
    wait_until(lambda: (broker_status(one) or {"services": [{}]})["services"][0].get("queued", 0) >= 900,
               10, what="the adds queued at the broker together")
    assert [f.result() for f in futures] == [2 * i for i in range(1000)]
    assert [f.result() for f in held] == [2.0] * 8


def test_many_threads_share_one_client(one, client_factory):
    from concurrent.futures import ThreadPoolExecutor

    c = client_factory([one], timeout=20)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: c.call("calc", "add", i, 1), range(400)))
    assert results == [i + 1 for i in range(400)]


def test_async_client(one):
    async def main():
        async with zrpc.AsyncClient([one], timeout=5) as ac:
            calc = ac.proxy("calc")
            assert await calc.add(2, 3) == 5
            assert await calc.slow_square(4) == 16
            got = await asyncio.gather(*[calc.add.future(i, 1) for i in range(300)])
            assert got == [i + 1 for i in range(300)]
            with pytest.raises(zrpc.RemoteError):
                await calc.div(1, 0)
            with pytest.raises(zrpc.Timeout):
                await calc.sleep.with_options(timeout=0.2)(2)

    asyncio.run(main())


def test_remote_error_has_type_message_traceback(one, client_factory):
    c = client_factory([one], timeout=5)
    with pytest.raises(zrpc.RemoteError) as info:
        c.proxy("calc").div(1, 0)
    e = info.value
    assert e.remote_type == "ZeroDivisionError" and "division" in e.message
    assert "Traceback" in e.remote_traceback and "div" in e.remote_traceback


def test_wrong_arguments_are_a_remote_type_error(one, client_factory):
    c = client_factory([one], timeout=5)
    with pytest.raises(zrpc.RemoteError) as info:
        c.proxy("calc").add(1)
    assert info.value.remote_type == "TypeError"


def test_timeout_is_raised_at_the_deadline(one, client_factory):
    c = client_factory([one], timeout=5)
    t0 = time.monotonic()
    with pytest.raises(zrpc.Timeout):
        c.proxy("calc").sleep.with_options(timeout=0.3)(3)
    assert time.monotonic() - t0 < 2.5


def test_unknown_service_and_method(one, client_factory):
    c = client_factory([one], timeout=5)
    with pytest.raises(zrpc.ServiceUnavailable):
        c.call("nosuch", "x")
    with pytest.raises(zrpc.MethodNotFound):
        c.proxy("calc").nope()


def test_internal_service(one, client_factory):
    c = client_factory([one], timeout=5)
    assert c.call("zrpc", "ping") == "pong"
    assert "add" in c.call("zrpc", "services")["calc"]
    with pytest.raises(zrpc.MethodNotFound):
        c.call("zrpc", "nope")


def test_overloaded_with_a_tiny_queue(cluster, client_factory):
    ep = cluster.broker("--queue-limit", "2")
    cluster.worker(ep, "--concurrency", "1")
    c = client_factory([ep], timeout=10)
    slow = [c.proxy("calc").sleep.future(0.5) for _ in range(3)]  # 1 running, 2 queued
    with pytest.raises(zrpc.Overloaded):
        c.proxy("calc").add(1, 1)
    assert [f.result() for f in slow] == [0.5, 0.5, 0.5]


def test_queued_call_times_out_when_workers_stay_busy(cluster, client_factory):
    ep = cluster.broker()
    cluster.worker(ep, "--concurrency", "1")
    c = client_factory([ep], timeout=10)
    busy = c.proxy("calc").sleep.future(1.5)
    with pytest.raises(zrpc.Timeout):
        c.proxy("calc").add.with_options(timeout=0.3)(1, 1)
    assert busy.result() == 1.5
    # the broker timed the queued call out itself (the client's own deadline would raise
    # Timeout too): it was answered, and never handed to the worker once the slot freed
    st = wait_until(lambda: (lambda s: s if s and s["services"][0]["queued"] == 0
                             and s["workers"][0]["outstanding"] == 0 else None)(broker_status(ep)),
                    5, what="the broker idle")
    assert st["counters"]["timeouts"] == 1 and st["workers"][0]["served"] == 1, st["counters"]


def test_load_spreads_across_three_workers(cluster, client_factory):
    ep = cluster.broker()
    for _ in range(3):
        cluster.worker(ep, "--concurrency", "2")
    c = client_factory([ep], timeout=20)
    futures = [c.proxy("calc").sleep.future(0.05) for _ in range(60)]
    for f in futures:
        f.result()
    served = [w["served"] for w in broker_status(ep)["workers"]]
    assert len(served) == 3 and sum(served) == 60
    assert min(served) >= 12, served  # least-outstanding keeps them all busy


def test_sigterm_drains_in_flight_calls(cluster, client_factory, procs):
    ep = cluster.broker()
    w1 = cluster.worker(ep, "--concurrency", "4")
    c = client_factory([ep], timeout=10)
    futures = [c.proxy("calc").sleep.future(0.6) for _ in range(4)]
    cluster.wait_workers(ep, 1)
    wait_until(lambda: broker_status(ep)["workers"][0]["outstanding"] == 4, 5, what="4 in flight")
    procs.signal(w1, 15)
    assert [f.result() for f in futures] == [0.6] * 4
    assert w1.wait(10) == 0
    cluster.wait_workers(ep, 0)
    # nothing is left hanging: with no worker left the next call is refused clearly (once the
    # 1 s service grace has passed), not left to time out
    with pytest.raises(zrpc.ServiceUnavailable):
        c.proxy("calc").add.with_options(timeout=5)(1, 1)


def test_calls_made_before_the_worker_starts_wait_for_it(cluster, client_factory):
    ep = cluster.broker("--service-grace", "10")
    # past the default grace (1 s), so the call is kept only because of --service-grace
    wait_until(lambda: (broker_status(ep) or {}).get("broker", {}).get("uptime_s", 0) > 2.0, 10,
               what="the broker up for longer than the default grace")
    c = client_factory([ep], timeout=15)
    f = c.proxy("calc").add.future(2, 2)
    wait_until(lambda: (broker_status(ep) or {"services": []})["services"], 5, what="the call queued")
    cluster.worker(ep)
    assert f.result() == 4


def test_without_a_worker_calls_are_refused_after_the_grace(cluster, client_factory):
    ep = cluster.broker("--service-grace", "0.5")
    wait_until(lambda: (broker_status(ep) or {}).get("broker", {}).get("uptime_s", 0) > 1.0, 10,
               what="the broker past its grace")
    c = client_factory([ep], timeout=10)
    with pytest.raises(zrpc.ServiceUnavailable):
        c.proxy("calc").add(1, 1)


def test_lb_option_chooses_the_strategy(cluster, client_factory):
    """`--lb weighted` follows the workers' weights (3:1); least-outstanding, the default,
    would share sequential calls evenly."""
    ep = cluster.broker("--lb", "weighted")
    cluster.worker(ep, "--weight", "3")
    cluster.worker(ep, "--weight", "1")
    c = client_factory([ep], timeout=5)
    for i in range(40):
        assert c.proxy("calc").add(i, 1) == i + 1
    st = broker_status(ep)
    assert st["lb"] == "weighted"
    assert sorted(w["served"] for w in st["workers"]) == [10, 30]


def test_worker_serves_several_services(cluster, client_factory, tmp_path):
    mod = tmp_path / "twosvc.py"
    mod.write_text(
        "import zrpc\n"
        "a = zrpc.Service('alpha')\nb = zrpc.Service('beta')\n"
        "@a.method\ndef hi(): return 'alpha'\n"
        "@b.method\ndef hi(): return 'beta'\n"
    )
    ep = cluster.broker()
    cluster.worker(ep, spec="twosvc", env={"PYTHONPATH": f"{tmp_path}:{cluster.procs.env['PYTHONPATH']}"})
    c = client_factory([ep], timeout=5)
    assert c.call("alpha", "hi") == "alpha" and c.call("beta", "hi") == "beta"
    counts = collections.Counter(s["name"] for s in broker_status(ep)["services"])
    assert counts == {"alpha": 1, "beta": 1}



def test_a_draining_worker_ignores_requests_to_register(procs):
    """A broker that forgot a leaving worker asks it to register; it must not come back."""
    import msgpack
    import zmq

    from zrpc._core._frames import WORKER, Command, Disconnect, Heartbeat, decode_frames, encode
    from zrpc.testing import free_port

    ep = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.linger = 0
    fake.rcvtimeo = 5000
    fake.bind(ep)
    try:
        w = procs.zrpc("worker", "zrpc.examples.calc:calc", "--brokers", ep, name="worker")
        wid, head, _ = fake.recv_multipart()
        assert msgpack.unpackb(head)[1] == Command.READY
        procs.signal(w, 15)
        while type(decode_frames(fake.recv_multipart()[1:])) is not Disconnect:
            pass  # heartbeats until its DISCONNECT (which this broker never acknowledges)
        fake.send_multipart([wid, *encode(Heartbeat(WORKER, {"register": True}))])
        fake.rcvtimeo = 1500  # it leaves within a second once nothing is in flight
        seen = []
        while w.poll() is None:
            try:
                seen.append(msgpack.unpackb(fake.recv_multipart()[1])[1])
            except zmq.Again:
                break
        assert Command.READY not in seen
        assert w.wait(10) == 0
    finally:
        ctx.destroy(linger=0)


def test_prefetch_holds_calls_at_the_worker_beyond_its_threads(cluster, client_factory):
    ep = cluster.broker()
    cluster.worker(ep, "--concurrency", "1", "--prefetch", "2")
    assert broker_status(ep)["workers"][0]["capacity"] == 3  # what it announced
    c = client_factory([ep], timeout=10)
    futures = [c.proxy("calc").sleep.future(0.4) for _ in range(4)]
    # three at the worker (one running, two waiting for its thread), one queued at the broker
    wait_until(lambda: (lambda s: s and s["workers"][0]["outstanding"] == 3
                        and s["services"][0]["queued"] == 1)(broker_status(ep)), 5,
               what="3 calls held by the worker, 1 queued at the broker")
    assert [f.result() for f in futures] == [0.4] * 4
