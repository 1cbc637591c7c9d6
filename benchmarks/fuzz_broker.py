"""Throw malformed and adversarial messages at a running broker and worker, then check that
both still serve and how much their memory grew.

The broker gets zrpc.testing.hostile_message() on its frontend from several sockets; the
worker, connected to a second (fake) broker run by this script, gets hostile worker-dialect
messages. Afterwards a normal call must succeed through the real broker.

    python benchmarks/fuzz_broker.py [--messages 100000] [--json]

Exit status 0 when nothing crashed, the call succeeded and RSS grew less than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zrpc  # noqa: E402
from zrpc._core._frames import WORKER  # noqa: E402
from zrpc.testing import Processes, free_port, hostile_message, wait_until  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hostile_to_worker(rng: random.Random, i: int) -> list[bytes]:
    def pk(o: object) -> bytes:
        return bytes(msgpack.packb(o, use_bin_type=True))

    kind = i % 6
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:
        return [pk([WORKER, 1, b"c" * 16, i, "calc", "add", {"budget_ms": 1000}]), rng.randbytes(16)]
    if kind == 2:
        return [pk([WORKER, 1, b"c" * 16, i, "calc", "nope", {"budget_ms": 1000}]), b""]
    if kind == 3:
        return [pk([WORKER, 1, b"c" * 16, i, "calc", "add", {"budget_ms": 1000, "probe": True}]), b""]
    if kind == 4:
        return [pk([WORKER, 4, {"interval_ms": rng.choice([0, -1, 10**9, "x"]), "liveness": 0}]), b""]
    return [pk([WORKER, 1, b"c" * 16, i, "calc", "add", {"budget_ms": 0}]), pk([[1, 2], {}])]


def status(ep: str) -> dict[str, Any] | None:
    try:
        with zrpc.Client([ep], timeout=2) as c:
            st: dict[str, Any] = c.call("zrpc", "status")
            return st
    except zrpc.ZrpcError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="to the broker (the worker gets 1/5)")
    ap.add_argument("--max-growth-mb", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--broker-args", default="", help="extra `zrpc broker` arguments (quoted)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    ep = f"tcp://127.0.0.1:{free_port()}"
    fake_ep = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    report: dict[str, Any] = {"messages_to_broker": a.messages, "messages_to_worker": a.messages // 5}
    with Processes() as procs:
        broker = procs.zrpc("broker", "--frontend", ep, "--log-level", "error", *a.broker_args.split())
        wait_until(lambda: status(ep), 15, what="broker up")
        fake = ctx.socket(zmq.ROUTER)
        fake.linger = 0
        fake.rcvtimeo = 10_000
        fake.bind(fake_ep)
        worker = procs.zrpc("worker", "zrpc.examples.calc:calc", "--brokers", f"{ep},{fake_ep}", "--log-level", "error")
        wait_until(lambda: (status(ep) or {}).get("workers"), 15, what="worker up")
        wid = fake.recv_multipart()[0]

        def flood(n: int, offset: int) -> None:
            socks = [ctx.socket(zmq.DEALER) for _ in range(8)]
            for s in socks:
                s.linger = 2000
                s.sndhwm = 0
                s.connect(ep)
            for i in range(offset, offset + n):
                socks[i % len(socks)].send_multipart(hostile_message(rng, i))
                if i % 5 == 0:
                    fake.send_multipart([wid, *hostile_to_worker(rng, i)])
                if i % 1000 == 999:
                    time.sleep(0.01)  # let the broker drain (bounded queues drop the excess)
            for s in socks:
                s.close()

        warm = min(5000, a.messages // 10)
        flood(warm, 0)
        wait_until(lambda: status(ep), 30, what="broker answering after the warm-up")
        rss0 = {"broker": rss_mb(broker.pid), "worker": rss_mb(worker.pid)}
        t0 = time.monotonic()
        flood(a.messages - warm, warm)
        st: Any = wait_until(lambda: status(ep), 60, what="broker answering after the flood")
        report["seconds"] = round(time.monotonic() - t0, 1)
        with zrpc.Client([ep], timeout=10) as c:
            report["call_after"] = c.proxy("calc").add(2, 2) == 4
        rss1 = {"broker": rss_mb(broker.pid), "worker": rss_mb(worker.pid)}
        report["alive"] = {"broker": broker.poll() is None, "worker": worker.poll() is None}
        report["rss_mb_before"] = {k: round(v, 1) for k, v in rss0.items()}
        report["rss_mb_after"] = {k: round(v, 1) for k, v in rss1.items()}
        report["broker_counters"] = {k: v for k, v in st["counters"].items() if v}
    ctx.destroy(linger=0)
    growth = max(rss1[k] - rss0[k] for k in rss0)
    report["ok"] = bool(report["call_after"] and all(report["alive"].values()) and growth < a.max_growth_mb)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k:20} {v}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
