"""zrpc beside raw pyzmq, in one run, on this machine.

raw:  client DEALER -> Python ROUTER/ROUTER forwarder (batch drain) -> worker DEALER, msgpack
      bodies, the handler inline: the least a broker in Python can do.
zrpc: zrpc.Client -> zrpc broker -> zrpc worker (examples.calc), the same calls.

Rows: sequential add(1, 2) (calls/s, p50, p99), pipelined add with 256 in flight, 64 KiB echo
with 16 in flight. Prints a table and the zrpc/raw ratio per row.

    python benchmarks/throughput.py [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zrpc.testing import Processes, free_port, wait_until  # noqa: E402

PAYLOAD = os.urandom(64 * 1024)


# --- raw pieces (run as child processes of this script) -------------------------------------


def raw_forwarder(front_ep: str, back_ep: str) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(front_ep)
    back.bind(back_ep)
    workers: list[bytes] = []
    turn = 0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            for _ in range(512):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is back:
                    if len(frames) == 2:  # [wid, b"READY"]
                        workers.append(frames[0])
                    else:  # [wid, cid, head, body]
                        front.send_multipart(frames[1:])
                elif workers:
                    turn = (turn + 1) % len(workers)
                    back.send_multipart([workers[turn], *frames])


def raw_worker(back_ep: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back_ep)
    s.send(b"READY")
    while True:
        cid, head, body = s.recv_multipart()
        args, kwargs = msgpack.unpackb(body)
        result = args[0] + args[1] if len(args) == 2 else args[0]
        s.send_multipart([cid, head, msgpack.packb(result)])


class RawClient:
    def __init__(self, ep: str) -> None:
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.connect(ep)
        self.rid = 0

    def call(self, *args: object) -> object:
        self.rid += 1
        self.s.send_multipart([msgpack.packb(self.rid), msgpack.packb([list(args), {}])])
        head, body = self.s.recv_multipart()
        return msgpack.unpackb(body)

    def ready(self) -> bool:
        """One probe call; False if the forwarder had no worker yet (it drops the call)."""
        self.rid += 1
        self.s.send_multipart([msgpack.packb(self.rid), msgpack.packb([[1, 2], {}])])
        if not self.s.poll(200):
            return False
        self.s.recv_multipart()
        return True

    def pipelined(self, n: int, window: int, *args: object) -> None:
        sent = done = 0
        body = msgpack.packb([list(args), {}])
        while done < n:
            while sent < n and sent - done < window:
                self.rid += 1
                self.s.send_multipart([msgpack.packb(self.rid), body])
                sent += 1
            self.s.recv_multipart()
            done += 1

    def close(self) -> None:
        self.ctx.destroy(linger=0)


# --- measurement ----------------------------------------------------------------------------


def sequential(call, seconds: float) -> dict[str, float]:
    for _ in range(200):
        call()
    lat = []
    end = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
        if t > end:
            break
    lat.sort()
    return {"calls_s": len(lat) / sum(lat), "p50_us": lat[len(lat) // 2] * 1e6,
            "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def rate(run, n: int) -> float:
    run(min(n, 1000))  # warm up
    t = time.perf_counter()
    run(n)
    return n / (time.perf_counter() - t)


def zrpc_pipelined(client, n: int, window: int, method: str, *args: object) -> None:
    from collections import deque

    fn = getattr(client.proxy("calc"), method).future
    q: deque = deque()
    for _ in range(n):
        if len(q) >= window:
            q.popleft().result()
        q.append(fn(*args))
    for f in q:
        f.result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per sequential row")
    ap.add_argument("--calls", type=int, default=30000, help="per pipelined row")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--ep", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "forwarder":
        raw_forwarder(*a.ep)
        return 0
    if a.role == "worker":
        raw_worker(*a.ep)
        return 0

    import zrpc
    from tests.conftest import broker_status

    results: dict[str, dict[str, float]] = {}
    with Processes() as procs:
        front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        procs.spawn([sys.executable, __file__, "--role", "forwarder", "--ep", front, back])
        procs.spawn([sys.executable, __file__, "--role", "worker", "--ep", back])
        raw = RawClient(front)
        wait_until(raw.ready, 10, what="raw path up")
        print("measuring raw pyzmq ...", file=sys.stderr)
        r = sequential(lambda: raw.call(1, 2), a.seconds)
        r["pipelined_s"] = rate(lambda n: raw.pipelined(n, 256, 1, 2), a.calls)
        r["echo64k_s"] = rate(lambda n: raw.pipelined(n, 16, PAYLOAD), a.calls // 10)
        results["raw"] = r
        raw.close()

        ep = f"tcp://127.0.0.1:{free_port()}"
        procs.zrpc("broker", "--frontend", ep, "--log-level", "warning")
        wait_until(lambda: broker_status(ep), 10, what="broker up")
        procs.zrpc("worker", "zrpc.examples.calc:calc", "--brokers", ep, "--log-level", "warning")
        wait_until(lambda: (broker_status(ep) or {}).get("workers"), 10, what="worker up")
        print("measuring zrpc ...", file=sys.stderr)
        with zrpc.Client([ep], timeout=30) as c:
            add = c.proxy("calc").add
            z = sequential(lambda: add(1, 2), a.seconds)
            z["pipelined_s"] = rate(lambda n: zrpc_pipelined(c, n, 256, "add", 1, 2), a.calls)
            z["echo64k_s"] = rate(lambda n: zrpc_pipelined(c, n, 16, "echo", PAYLOAD), a.calls // 10)
        results["zrpc"] = z

    rows = [("sequential add calls/s", "calls_s", True), ("sequential p50 us", "p50_us", False),
            ("sequential p99 us", "p99_us", False), ("pipelined (256) add calls/s", "pipelined_s", True),
            ("64 KiB echo (16) calls/s", "echo64k_s", True)]
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'row':32} {'raw pyzmq':>12} {'zrpc':>12} {'zrpc/raw':>9}")
    for label, key, higher_better in rows:
        rv, zv = results["raw"][key], results["zrpc"][key]
        ratio = zv / rv if higher_better else rv / zv
        print(f"{label:32} {rv:12,.0f} {zv:12,.0f} {ratio:9.2f}")
    print("(ratio > 1 is zrpc faster; for latency rows the ratio is raw/zrpc)")
    print(f"python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
          f"{os.cpu_count()} cpus; median of one run each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
