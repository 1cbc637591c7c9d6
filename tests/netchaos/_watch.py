"""A broker's witness, run on the broker's own host: its zrpc.status every tenth of a second and
every alert of its monitor socket, as JSON lines with time.monotonic() stamps (one clock for
every namespace), so that a test sees each broker even while its host is cut off.

`python -m tests.netchaos._watch --broker EP --monitor EP --out FILE`; SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from typing import IO, Any

import msgpack
import zmq

import zrpc

EVERY = 0.1
"""Seconds between two status polls: a state that lasts longer is seen."""
KEEPALIVE = 1.0
"""A status line at least this often, even when nothing changed."""
POLL_TIMEOUT = 0.5


def compact(st: dict[str, Any]) -> dict[str, Any]:
    """What the scenarios judge, out of a zrpc.status answer."""
    b = st.get("broker", {})
    c = st.get("counters", {})
    return {
        "role": b.get("role"), "state": b.get("state"), "serving": b.get("serving"),
        "epoch": b.get("epoch"), "peer_state": b.get("peer_state"), "pid": b.get("pid"),
        "requests": c.get("requests", 0), "replies": c.get("replies", 0), "retries": c.get("retries", 0),
        "unavailable": c.get("unavailable", 0),
        "not_active": c.get("not_active", 0) + c.get("not_active_calls", 0),
        "workers": sorted(w.get("pid") for w in st.get("workers", []) if isinstance(w.get("pid"), int)),
        "services": {s["name"]: s["workers"] for s in st.get("services", [])},
        "phi": {str(w.get("pid")): w.get("phi") for w in st.get("workers", [])},
        "alerts": sorted(f"{a['name']}:{a['subject']}" for a in st.get("alerts", [])),
    }


class Witness:
    def __init__(self, broker: str, monitor: str, out: IO[str]) -> None:
        self.out = out
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"alert.")
        self.sub.connect(monitor)
        self.client = zrpc.Client([broker], timeout=POLL_TIMEOUT)
        self.stop = False
        self.last: dict[str, Any] | None = None
        self.last_at = 0.0

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps({"t": round(time.monotonic(), 4), **record}, default=str) + "\n")
        self.out.flush()

    def poll_status(self) -> None:
        try:
            view: dict[str, Any] = compact(self.client.call("zrpc", "status"))
        except zrpc.ZrpcError as exc:
            view = {"down": type(exc).__name__}
        now = time.monotonic()
        if view != self.last or now - self.last_at >= KEEPALIVE:
            self.write({"status": view})
            self.last, self.last_at = view, now

    def read_alerts(self, until: float) -> None:
        while not self.stop:
            left = until - time.monotonic()
            if left <= 0 or not self.sub.poll(max(1, int(left * 1000))):
                return
            frames = self.sub.recv_multipart()
            try:
                ev = msgpack.unpackb(frames[-1], raw=False)
            except Exception:  # noqa: BLE001 - a witness reports, it does not judge the wire
                continue
            if isinstance(ev, dict):
                self.write({"alert": {k: ev.get(k) for k in ("name", "state", "subject", "detail", "role",
                                                              "broker_state")}})

    def run(self) -> None:
        self.write({"hello": True})
        nxt = time.monotonic()
        while not self.stop:
            self.poll_status()
            nxt = max(nxt + EVERY, time.monotonic())
            self.read_alerts(nxt)

    def close(self) -> None:
        self.client.close()
        self.sub.close()
        self.ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--broker", required=True)
    ap.add_argument("--monitor", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.out, "a") as out:
        w = Witness(args.broker, args.monitor, out)

        def stop(*_: object) -> None:
            w.stop = True

        signal.signal(signal.SIGTERM, stop)
        try:
            w.run()
        finally:
            w.close()


if __name__ == "__main__":
    main()
