"""A client host's load: threads calling the `net` service through one zrpc.Client, each call's
outcome a JSON line with time.monotonic() stamps, until SIGTERM; then every thread finishes its
call and a last line says whether any hung.

`python -m tests.netchaos._load --brokers EP,EP --out FILE --mix add:2,charge:1`

Kinds: `add` (inline, idempotent), `hold` (idempotent, holds a worker slot `--hold` seconds),
`charge` (not idempotent; the worker's ledger counts its executions). A line is
`{"m": kind, "k": key, "t0", "t1", "out": "ok" | "wrong" | error class, "pid": worker pid}`.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from typing import IO, Any

import zrpc

JOIN_GRACE = 5.0
"""Seconds beyond a call's timeout a thread may take to finish once told to stop."""


class Load:
    def __init__(self, client: zrpc.Client, out: IO[str], pace: float, hold: float) -> None:
        self.proxy = client.proxy("net")
        self.out = out
        self.pace = pace
        self.hold = hold
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self.lock:
            self.out.write(line)
            self.out.flush()

    def one(self, kind: str, t: int, i: int) -> dict[str, Any]:
        key = f"{kind}{t}-{i}"
        t0 = time.monotonic()
        want: object
        try:
            if kind == "add":
                r, want = self.proxy.add(t, i), t + i
            elif kind == "hold":
                r, want = self.proxy.hold(t, i, self.hold), t + i
            else:
                r, want = self.proxy.charge(key), key
        except zrpc.ZrpcError as exc:
            return {"m": kind, "k": key, "t0": t0, "t1": time.monotonic(), "out": type(exc).__name__,
                    "detail": str(exc)[:200]}
        got = r.get("token") if kind == "charge" else r.get("sum")
        return {"m": kind, "k": key, "t0": t0, "t1": time.monotonic(), "out": "ok" if got == want else "wrong",
                "pid": r.get("pid")}

    def thread(self, kind: str, t: int) -> None:
        i = 0
        nxt = time.monotonic()
        while not self.stop.is_set():
            try:
                rec = self.one(kind, t, i)
            except Exception as exc:  # noqa: BLE001 - a bug in the client: recorded, the test fails
                self.write({"m": kind, "k": f"{kind}{t}-{i}", "t0": nxt, "t1": time.monotonic(),
                            "out": f"crash:{type(exc).__name__}", "detail": repr(exc)[:200]})
                return
            self.write(rec)
            i += 1
            nxt = max(nxt + self.pace, time.monotonic())
            self.stop.wait(max(0.0, nxt - time.monotonic()))  # the pace of the load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mix", default="add:2", help="kind:threads,...")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--pace", type=float, default=0.01, help="seconds between two calls of a thread")
    ap.add_argument("--hold", type=float, default=0.3)
    args = ap.parse_args()
    mix = [(kind, int(n)) for kind, n in (part.split(":") for part in args.mix.split(","))]
    with open(args.out, "a") as out, zrpc.Client(args.brokers.split(","), timeout=args.timeout) as client:
        load = Load(client, out, args.pace, args.hold)
        signal.signal(signal.SIGTERM, lambda *_: load.stop.set())
        threads = [threading.Thread(target=load.thread, args=(kind, t), daemon=True)
                   for t, (kind, _) in enumerate((k, j) for k, n in mix for j in range(n))]
        for th in threads:
            th.start()
        load.write({"started": len(threads)})
        while not load.stop.wait(0.2):  # SIGTERM sets it
            pass
        deadline = time.monotonic() + args.timeout + JOIN_GRACE
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        load.write({"done": True, "hung": sum(th.is_alive() for th in threads)})


if __name__ == "__main__":
    main()
