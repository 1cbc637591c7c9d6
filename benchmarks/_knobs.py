"""The knobs section: what each setting a user may turn costs or buys, one broker, one worker.

Every row starts a fresh `zrpc broker` and `zrpc worker zrpc.examples.calc:calc` with the
row's flags and measures the same load, so the rows differ by the knob alone:

- calc's `add` is declared `inline=True` (run on the worker's I/O thread); `slow_add(1, 2, 0)`
  is the same sum as an ordinary handler in the thread pool (its `time.sleep(0)` is one system
  call, about a microsecond), so the pair of rows is what the two thread hand-offs cost.
- `--prefetch 24`: the worker holds 24 calls beyond its 8 threads (capacity 32).
- `--concurrency 1 / 32`: the pool's size (and the capacity).
- heartbeats every 50 ms instead of 250 ms, both ways.
- CURVE: every socket encrypted and authenticated (keys from `zrpc keygen`).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _measure import Meter, Proc, Row, in_flight, sequential, warm_up
from _systems import CALL_TIMEOUT, registered, up, zrpc_broker

import zrpc
from zrpc.testing import Processes

WINDOW = 128
"""Calls in flight in the pipelined rows (the main table's 128 row)."""


@dataclass(frozen=True)
class Knob:
    label: str
    method: str = "add"  # add: inline; slow_add: the thread pool
    window: int = WINDOW  # 1: sequential
    broker: tuple[str, ...] = ()
    worker: tuple[str, ...] = ()
    curve: bool = False


KNOBS = (
    Knob("defaults: add inline, prefetch 0, concurrency 8"),
    Knob("handler in the thread pool", "slow_add"),
    Knob("thread pool, --prefetch 24", "slow_add", worker=("--prefetch", "24")),
    Knob("inline, --prefetch 24", worker=("--prefetch", "24")),
    Knob("thread pool, --concurrency 1", "slow_add", worker=("--concurrency", "1")),
    Knob("thread pool, --concurrency 32", "slow_add", worker=("--concurrency", "32")),
    Knob("heartbeats every 50 ms", broker=("--heartbeat-interval", "0.05"),
         worker=("--heartbeat-interval", "0.05")),
    Knob("CURVE on", curve=True),
    Knob("sequential, inline", window=1),
    Knob("sequential, thread pool", "slow_add", window=1),
)
STEPS = len(KNOBS)


@dataclass
class KnobRow:
    knob: Knob
    row: Row
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        k = self.knob
        return {"knob": k.label, "method": k.method, "window": k.window, "broker_flags": list(k.broker),
                "worker_flags": list(k.worker), "curve": k.curve, **self.row.as_dict()}


def _keys(tmp: Path) -> dict[str, Path]:
    """A key pair for the broker and one for its peers (worker and client share one here)."""
    tmp.mkdir(parents=True)
    for name in ("broker", "peer"):
        subprocess.run([sys.executable, "-m", "zrpc", "keygen", str(tmp / name), "--name", name],
                       check=True, capture_output=True)
    allowed = tmp / "allowed"
    allowed.mkdir()
    (allowed / "peer.key").write_bytes((tmp / "peer" / "peer.key").read_bytes())
    return {"broker_secret": tmp / "broker" / "broker.key_secret", "broker_public": tmp / "broker" / "broker.key",
            "peer_secret": tmp / "peer" / "peer.key_secret", "allowed": allowed}


def measure_knob(procs: Processes, knob: Knob, seconds: float, tmp: Path) -> Row:
    broker_flags = list(knob.broker)
    worker_flags = list(knob.worker)
    client_kw: dict[str, Any] = {}
    if knob.curve:
        keys = _keys(tmp)
        broker_flags += ["--curve-secret", str(keys["broker_secret"]), "--curve-authorized", str(keys["allowed"])]
        worker_flags += ["--curve-server-key", str(keys["broker_public"]), "--curve-secret", str(keys["peer_secret"])]
        client_kw = {"curve_server_key": str(keys["broker_public"]), "curve_secret": str(keys["peer_secret"])}
    ep, broker = zrpc_broker(procs, *broker_flags, name="zrpc-broker-knob", client_kw=client_kw)
    worker = procs.zrpc("worker", "zrpc.examples.calc:calc", "--brokers", ep, "--log-level", "warning",
                        *worker_flags, name="zrpc-worker-knob", die_with_parent=True)
    up(procs, lambda: registered(ep, **client_kw) >= 1, "zrpc worker registered")
    found = [Proc("broker", "broker", broker.pid), Proc("worker", "server", worker.pid)]
    args = (1, 2, 0.0) if knob.method == "slow_add" else (1, 2)
    with zrpc.Client([ep], timeout=CALL_TIMEOUT, **client_kw) as client:
        fn = getattr(client.proxy("calc"), knob.method)
        if fn(*args) != 3:
            raise RuntimeError(f"calc.{knob.method}{args} did not answer 3")
        meter = Meter(found)
        if knob.window == 1:
            return sequential(partial(fn, *args), warm_up(seconds), seconds, meter, "zrpc", knob.label)
        calls = in_flight(lambda: fn.future(*args), lambda f: f.result(), knob.window, warm_up(seconds),
                          seconds, meter.start)
        return meter.stop("zrpc", knob.label, calls)


def knobs(procs: Processes, seconds: float, progress: Any) -> tuple[list[KnobRow], list[str]]:
    """One row per knob, each on fresh processes stopped after it."""
    from _sections import failed, stop_started

    out: list[KnobRow] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zrpc-knobs-") as tmp:
        for i, knob in enumerate(KNOBS):
            since = len(procs.procs)
            progress.begin(f"knobs: {knob.label}")
            try:
                row = measure_knob(procs, knob, seconds, Path(tmp) / str(i))
                out.append(KnobRow(knob, row))
                progress.end(f"{row.calls_s:,.0f} calls/s")
            except Exception as exc:  # this knob's row is missing; the others still run
                notes.append(failed(f"knobs, {knob.label}", exc, procs))
            finally:
                stop_started(procs, since)
    return out, notes
