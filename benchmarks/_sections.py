"""The sections after the main table: how zrpc scales with clients and workers, how latency
grows with the broker's queue, and what a broker holds in memory.

- scaling: one broker; 1, 8 and 64 clients as threads of this process and as child processes
  (benchmarks/_load.py), each making one call at a time, against one worker; then 1, 4 and 16
  workers under 256 calls in flight from this process. The raw forwarder does the same rows
  (its workers are raw DEALERs).
- queue: one broker whose queue may hold the deepest backlog, one worker; bursts of 100, 1,000
  and 10,000 futures submitted at once, the latency of each from submission to reply; depth 0
  is one call at a time. `zrpc.status` is polled meanwhile for the deepest queue really held.
- memory: a broker's VmRSS idle, with 100 zrpc.Client objects, with 1,000 idle clients (twice,
  to see whether what a client leaves behind grows), with 100 idle workers heartbeating; and
  under load (the scaling section's 64 client processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _measure import (
    Meter,
    Proc,
    Row,
    cpu_seconds,
    in_flight,
    in_threads,
    memory_kb,
    percentile,
    sequential,
    timed,
    warm_up,
)
from _systems import (
    CALL_TIMEOUT,
    RawClient,
    broker_status,
    raw_forwarder,
    registered,
    server,
    up,
    zrpc_broker,
    zrpc_worker,
)

import zrpc
from zrpc.testing import Processes, wait_until

LOAD = str(Path(__file__).resolve().parent / "_load.py")
CLIENTS = (1, 8, 64)
WORKERS = (1, 4, 16)
DEPTHS = (0, 100, 1_000, 10_000)
WINDOW = 256
"""Calls in flight in the workers rows: twice what 16 workers of capacity 8 take at once, so
the broker always has one waiting for the next free slot."""
QUEUE_ROOM = 2 * DEPTHS[-1]
"""The queue section's broker: --queue-limit and --max-inflight-per-client (defaults 1,000
and 10,000: a backlog of 10,000 from one client would be Overloaded at the first)."""
IDLE_CLIENTS = 1_000
ZRPC_CLIENTS = 100
"""zrpc.Client objects made in one process for the memory section (each has a context, an I/O
thread and sockets of its own: what a program making one pays)."""
IDLE_WORKERS = 100
WORKER_PROCS = 4
"""Child processes the idle workers are spread over (each Worker heartbeats from its own thread)."""
SETTLE = 1.0
"""Seconds a memory state is held before its RSS is read; the broker's CPU is measured over them."""
STATUS_EVERY = 0.02
"""Seconds between the queue section's zrpc.status polls."""
CHILD_TIMEOUT = 90.0
"""Seconds child processes have to start (64 Python processes on 2 busy cores) or to finish."""

SYSTEM_LABELS = {"zrpc": "zrpc, one broker", "raw": "raw pyzmq forwarder"}
AXES = ("client threads", "client processes", "workers")
STEPS = {"scaling": 2 * len(CLIENTS) * 2 + 2 * len(WORKERS), "queue": len(DEPTHS), "memory": 10}
"""Progress steps of each section, for the run's [k/n] lines."""


class Progress:
    """The `[k/n] what ... result` lines on stderr, counted over the whole run."""

    def __init__(self, counter: list[int], total: int) -> None:
        self.counter = counter
        self.total = total

    def begin(self, what: str) -> None:
        self.counter[0] += 1
        print(f"[{self.counter[0]}/{self.total}] {what} ...", end="", file=sys.stderr, flush=True)

    def end(self, text: str) -> None:
        print(f" {text}", file=sys.stderr)

    def skip_to(self, k: int) -> None:
        """A section that failed half-way: its remaining steps count as done."""
        if self.counter[0] < k:
            self.counter[0] = k


@contextmanager
def peak_rss(pid: int, every: float = 0.1) -> Iterator[list[int]]:
    """Samples a process's VmRSS (KiB) while the block runs; the list ends up holding the peak."""
    peak = [memory_kb(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            try:
                peak[0] = max(peak[0], memory_kb(pid))
            except (OSError, KeyError):
                return

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()


def stop_started(procs: Processes, since: int, grace: float = 5.0) -> None:
    """Stops every process started after the first `since` (a section cleans up after itself):
    SIGTERM to all at once, SIGKILL to what is left after `grace` seconds."""
    alive = [p for p in procs.procs[since:] if p.poll() is None]
    for p in alive:
        procs.signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            procs.kill(p)


# --- child processes ----------------------------------------------------------------------------


def said(procs: Processes, proc: subprocess.Popen[bytes], key: str) -> dict[str, Any] | None:
    """The JSON line holding `key` that a _load.py child printed (None: not yet). A child that
    ended without printing it fails the row, with its log."""
    log = procs.child(proc).log
    if log is not None and log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{key}"' in line:
                found: dict[str, Any] = json.loads(line)
                return found
    if proc.poll() is not None:
        text = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"a load process (pid {proc.pid}) ended with code {proc.returncode} "
                           f"before saying {key}: {text.strip().splitlines()[-1] if text.strip() else ''}")
    return None


def load(procs: Processes, name: str, *args: str, ends: bool = False) -> subprocess.Popen[bytes]:
    p = procs.spawn([sys.executable, LOAD, *args], name=name, die_with_parent=True)
    if ends:
        procs.expect_exit(p)
    return p


def all_said(procs: Processes, kids: list[subprocess.Popen[bytes]], key: str, what: str) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        found = [said(procs, k, key) for k in kids]
        return [f for f in found if f is not None] if all(found) else None

    out = wait_until(check, CHILD_TIMEOUT, interval=0.05, what=what)
    assert isinstance(out, list)  # the predicate's value
    return out


# --- scaling ------------------------------------------------------------------------------------


@dataclass
class Point:
    """One row of the scaling section: `n` clients or workers along `axis`."""

    system: str
    axis: str
    n: int
    row: Row
    broker_rss_kb: int = 0  # the broker's (or forwarder's) peak VmRSS during the row
    broker_idle_kb: int = 0  # ... before any load
    answered: int | None = None  # calls the zrpc broker had answered by the row's end

    def as_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "n": self.n, **self.row.as_dict(),
                "broker_rss_mb": round(self.broker_rss_kb / 1024, 1),
                "broker_idle_mb": round(self.broker_idle_kb / 1024, 1), "broker_answered": self.answered}


def finish(row: Row, lat: list[float]) -> Row:
    lat.sort()
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    row.p50_us = None if p50 is None else p50 * 1e6
    row.p99_us = None if p99 is None else p99 * 1e6
    return row


class Target:
    """One broker (zrpc or the raw forwarder) and its workers, grown as the rows need."""

    def __init__(self, system: str, procs: Processes) -> None:
        self.system, self.procs = system, procs
        if system == "zrpc":
            self.ep, broker = zrpc_broker(procs)
            self.broker = Proc("broker", "broker", broker.pid)
            self.workers = [Proc("worker", "server", zrpc_worker(procs, [self.ep]).pid)]
        else:
            setup, client = raw_forwarder(procs)
            client.close()
            self.ep, self.back = setup.front, setup.back
            self.broker, first = setup.procs
            self.workers = [first]
        self.idle_kb = memory_kb(self.broker.pid)

    def grow(self, n: int) -> None:
        """Starts workers until there are `n` (zrpc: until the broker has registered them)."""
        while len(self.workers) < n:
            label = f"worker-{len(self.workers) + 1}"
            if self.system == "zrpc":
                p = self.procs.zrpc("worker", "zrpc.examples.calc:calc", "--brokers", self.ep,
                                    "--log-level", "warning", name="zrpc-worker", die_with_parent=True)
            else:
                p = server(self.procs, "raw-worker", self.back)
            self.workers.append(Proc(label, "server", p.pid))
        if self.system == "zrpc":
            up(self.procs, lambda: registered(self.ep) >= n, f"{n} zrpc workers registered")

    def meter(self) -> Meter:
        return Meter([self.broker, *self.workers])

    def answered(self) -> int | None:
        """Calls the zrpc broker has answered so far (None: the forwarder counts nothing)."""
        if self.system != "zrpc":
            return None
        return int(((broker_status(self.ep) or {}).get("counters") or {}).get("replies", 0))

    def add(self) -> tuple[Callable[[], object], Callable[[], None]]:
        """A client of its own: add(1, 2), and its close."""
        if self.system == "zrpc":
            c = zrpc.Client([self.ep], timeout=CALL_TIMEOUT)
            return partial(c.proxy("calc").add, 1, 2), c.close
        rc = RawClient(self.ep)
        return partial(rc.call, "add", 1, 2), rc.close


def client_threads(t: Target, n: int, seconds: float) -> Point:
    closers: list[Callable[[], None]] = []
    lat: list[float] = []
    on = threading.Event()
    meter = t.meter()

    def make_call() -> Callable[[], object]:
        call, close = t.add()
        closers.append(close)
        return timed(call, lat, on.is_set)

    def start() -> None:
        on.set()
        meter.start()

    try:
        with peak_rss(t.broker.pid) as peak:
            calls = in_threads(make_call, n, warm_up(seconds), seconds, start)
            row = meter.stop(t.system, f"threads{n}", calls)
    finally:
        for close in closers:
            close()
    return Point(t.system, AXES[0], n, finish(row, lat), peak[0], t.idle_kb)


def client_processes(t: Target, n: int, seconds: float, tmp: str) -> Point:
    """`n` _load.py children, started and warmed up, then told to go at once (a file appears)."""
    go = os.path.join(tmp, f"go-{t.system}-{n}")
    flags = ["--raw"] if t.system == "raw" else []
    kids = [load(t.procs, f"load-{t.system}", "calls", t.ep, str(seconds), go, *flags, ends=True)
            for _ in range(n)]
    try:
        all_said(t.procs, kids, "ready", f"{n} load processes up")
        meter = t.meter()
        threading.Event().wait(warm_up(seconds))  # the warm-up: a measured duration, not a synchronisation
        with peak_rss(t.broker.pid) as peak:
            meter.start()
            Path(go).touch()
            results = all_said(t.procs, kids, "done", f"{n} load processes done")
            calls = sum(int(r["calls"]) for r in results)
            row = meter.stop(t.system, f"procs{n}", calls)
    finally:
        for k in kids:
            try:
                k.wait(5)
            except subprocess.TimeoutExpired:
                t.procs.kill(k)
    rate = sum(r["calls"] / r["seconds"] for r in results if r["seconds"])
    row.seconds = calls / rate if rate else 0.0
    del row.cpu_us["client"]  # this process only coordinated; the clients are the children
    row.cpu_us["clients"] = sum(float(r["cpu_s"]) for r in results) * 1e6 / max(calls, 1)
    row.roles["clients"] = "client"
    del row.roles["client"]
    lat = [float(us) / 1e6 for r in results for us in r["lat_us"]]
    return Point(t.system, AXES[1], n, finish(row, lat), peak[0], t.idle_kb)


def workers_row(t: Target, n: int, seconds: float) -> Point:
    """`n` workers kept busy by WINDOW calls in flight from one client of this process."""
    t.grow(n)
    lat: list[float] = []
    on = threading.Event()
    meter = t.meter()

    def start() -> None:
        on.set()
        meter.start()

    if t.system == "zrpc":
        client = zrpc.Client([t.ep], timeout=CALL_TIMEOUT)
        fut = client.proxy("calc").add.future

        def submit() -> tuple[float, Future[Any]]:
            return time.perf_counter(), fut(1, 2)

        def wait(token: tuple[float, Future[Any]]) -> object:
            out = token[1].result()
            if on.is_set():
                lat.append(time.perf_counter() - token[0])
            return out

        try:
            with peak_rss(t.broker.pid) as peak:
                calls = in_flight(submit, wait, WINDOW, warm_up(seconds), seconds, start)
                row = meter.stop(t.system, f"workers{n}", calls)
        finally:
            client.close()
    else:  # raw replies come in any order, unmatched: no latencies
        rc = RawClient(t.ep)
        try:
            with peak_rss(t.broker.pid) as peak:
                calls = in_flight(lambda: rc.send((1, 2)), rc.recv, WINDOW, warm_up(seconds), seconds, start)
                row = meter.stop(t.system, f"workers{n}", calls)
        finally:
            rc.close()
    return Point(t.system, AXES[2], n, finish(row, lat), peak[0], t.idle_kb)


def scaling(procs: Processes, seconds: float, progress: Progress, tmp: str,
            systems: Sequence[str]) -> tuple[list[Point], list[str]]:
    """The rows of each of `systems` (zrpc, raw), one broker each, in turn."""
    points: list[Point] = []
    notes: list[str] = []
    for system in systems:
        label = SYSTEM_LABELS[system]
        end = progress.counter[0] + STEPS["scaling"] // 2
        since = len(procs.procs)
        try:
            t = Target(system, procs)
            rows: list[tuple[str, Callable[[], Point]]] = [
                *((f"{n} client thread{'s' * (n > 1)}", partial(client_threads, t, n, seconds)) for n in CLIENTS),
                *((f"{n} client process{'es' * (n > 1)}", partial(client_processes, t, n, seconds, tmp))
                  for n in CLIENTS),
                *((f"{n} worker{'s' * (n > 1)}, {WINDOW} in flight", partial(workers_row, t, n, seconds))
                  for n in WORKERS),
            ]
            for what, run in rows:
                progress.begin(f"scaling, {label}: {what}")
                point = run()
                point.answered = t.answered()
                points.append(point)
                progress.end(f"{point.row.calls_s:,.0f} calls/s")
        except Exception as exc:  # this system's rows end here; the other's still run
            notes.append(failed(f"scaling, {label}", exc, procs))
        finally:
            progress.skip_to(end)
            stop_started(procs, since)
    return points, notes


def failed(what: str, exc: BaseException, procs: Processes) -> str:
    text = str(exc).strip().splitlines()
    note = f"{what}: failed, {type(exc).__name__}: {text[0] if text else ''}"
    print(f"\n{note}", file=sys.stderr)
    for problem in procs.problems():
        print(problem, file=sys.stderr)
    return note


# --- queue depth --------------------------------------------------------------------------------


@dataclass
class Depth:
    """The latency of calls submitted `depth` at once (0: one at a time)."""

    depth: int
    row: Row
    bursts: int = 0
    peak_queued: int = 0  # the deepest queue zrpc.status reported meanwhile
    max_us: float | None = None
    refused: dict[str, int] = field(default_factory=dict)  # exception type -> calls

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, **self.row.as_dict(), "bursts": self.bursts,
                "peak_queued": self.peak_queued, "max_us": None if self.max_us is None else round(self.max_us),
                "refused": self.refused}


@contextmanager
def queue_watch(ep: str) -> Iterator[list[int]]:
    """Polls zrpc.status while the block runs: the list ends up holding calc's deepest queue."""
    peak = [0]
    stop = threading.Event()
    client = zrpc.Client([ep], timeout=CALL_TIMEOUT)

    def poll() -> None:
        while not stop.wait(STATUS_EVERY):
            try:
                status = client.call("zrpc", "status")
            except zrpc.ZrpcError:  # a busy broker's late answer: the next poll will do
                continue
            for s in status.get("services", []):
                if s.get("name") == "calc":
                    peak[0] = max(peak[0], int(s.get("queued", 0)))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()
        client.close()


def burst(fut: Callable[..., Future[Any]], depth: int, lat: list[float], refused: dict[str, int]) -> float:
    """Submits `depth` calls at once and waits for all; returns the seconds from the first
    submission to the last reply."""
    t0 = time.perf_counter()
    sent = {}
    for _ in range(depth):
        sent[fut(1, 2)] = time.perf_counter()
    for f in as_completed(sent):
        now = time.perf_counter()
        exc = f.exception()
        if exc is None:
            lat.append(now - sent[f])
        else:
            refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
    return time.perf_counter() - t0


def queue_depths(procs: Processes, seconds: float, progress: Progress) -> tuple[list[Depth], list[str]]:
    out: list[Depth] = []
    notes: list[str] = []
    end = progress.counter[0] + STEPS["queue"]
    since = len(procs.procs)
    try:
        room = str(QUEUE_ROOM)
        ep, broker = zrpc_broker(procs, "--queue-limit", room, "--max-inflight-per-client", room,
                                 name="zrpc-broker-queue")
        worker = zrpc_worker(procs, [ep])
        found = [Proc("broker", "broker", broker.pid), Proc("worker", "server", worker.pid)]
        client = zrpc.Client([ep], timeout=CALL_TIMEOUT)
        try:
            add = client.proxy("calc").add
            for depth in DEPTHS:
                progress.begin(f"queue: {depth:,} calls submitted at once" if depth else "queue: one call at a time")
                meter = Meter(found)
                if not depth:
                    with queue_watch(ep) as peak:
                        row = sequential(partial(add, 1, 2), warm_up(seconds), seconds, meter, "zrpc", "depth0")
                    d = Depth(0, row, peak_queued=peak[0])
                else:
                    burst(add.future, min(depth, 1000), [], {})  # warm-up
                    lat: list[float] = []
                    refused: dict[str, int] = {}
                    busy, bursts = 0.0, 0
                    with queue_watch(ep) as peak:
                        meter.start()
                        until = time.perf_counter() + seconds
                        while not bursts or time.perf_counter() < until:
                            busy += burst(add.future, depth, lat, refused)
                            bursts += 1
                        row = meter.stop("zrpc", f"depth{depth}", len(lat) + sum(refused.values()))
                    row.seconds = busy
                    d = Depth(depth, finish(row, lat), bursts, peak[0], max(lat) * 1e6 if lat else None, refused)
                    if refused:
                        notes.append(f"queue: of {bursts * depth:,} calls submitted {depth:,} at once, "
                                     + ", ".join(f"{n:,} failed {k}" for k, n in refused.items())
                                     + f" (the queue held at most {peak[0]:,})")
                out.append(d)
                progress.end(f"p50 {fmt_us(d.row.p50_us)}, p99 {fmt_us(d.row.p99_us)}, "
                             f"deepest queue {d.peak_queued:,}")
        finally:
            client.close()
    except Exception as exc:
        notes.append(failed("queue", exc, procs))
    finally:
        progress.skip_to(end)
        stop_started(procs, since)
    return out, notes


def fmt_us(us: float | None) -> str:
    if us is None:
        return "—"
    return f"{us / 1000:,.1f} ms" if us >= 1000 else f"{us:,.0f} µs"


# --- memory -------------------------------------------------------------------------------------


@dataclass
class Memory:
    """The broker's resident memory in one state."""

    state: str
    rss_kb: int
    base_kb: int  # the state it is compared with
    peers: int = 0  # clients or workers the difference is spread over
    cpu_pct: float | None = None  # the broker's CPU while the state was held
    note: str = ""
    detail: dict[str, float] = field(default_factory=dict)  # the note's figures, for the JSON

    @property
    def per_peer_kb(self) -> float | None:
        return (self.rss_kb - self.base_kb) / self.peers if self.peers else None

    def as_dict(self) -> dict[str, Any]:
        per = self.per_peer_kb
        return {"state": self.state, "rss_mb": round(self.rss_kb / 1024, 1),
                "delta_mb": round((self.rss_kb - self.base_kb) / 1024, 1), "peers": self.peers,
                "kb_per_peer": None if per is None else round(per, 1),
                "cpu_pct": None if self.cpu_pct is None else round(self.cpu_pct, 1), "note": self.note,
                **self.detail}


def held(pid: int) -> tuple[int, float]:
    """Holds the state SETTLE seconds: (VmRSS KiB at the end, the broker's CPU % meanwhile)."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    threading.Event().wait(SETTLE)  # a measured duration, not a synchronisation
    return memory_kb(pid), (cpu_seconds(pid) - cpu0) * 100 / (time.perf_counter() - t0)


def memory(procs: Processes, progress: Progress, points: list[Point]) -> tuple[list[Memory], list[str]]:
    out: list[Memory] = []
    notes: list[str] = []
    end = progress.counter[0] + STEPS["memory"]
    since = len(procs.procs)

    def state(what: str, base: int | None, peers: int = 0, note: str = "", **detail: float) -> Memory:
        """Holds and records one state; `base` None: it is its own base (the idle broker)."""
        progress.begin(f"memory: {what}")
        rss, cpu = held(broker.pid)
        m = Memory(what, rss, rss if base is None else base, peers, cpu, note, detail)
        out.append(m)
        progress.end(f"{rss / 1024:,.1f} MB")
        return m

    try:
        ep, broker = zrpc_broker(procs, name="zrpc-broker-memory")
        idle = state("idle, nothing connected", None).rss_kb
        zrpc_worker(procs, [ep])
        one = state("one worker", idle, 1).rss_kb
        kid = load(procs, "load-clients", "clients", ep, str(ZRPC_CLIENTS))
        cost = all_said(procs, [kid], "ready", f"{ZRPC_CLIENTS} zrpc.Client objects")[0]
        client_kb, client_threads = cost["rss_kb"] / ZRPC_CLIENTS, cost["threads"] / ZRPC_CLIENTS
        state(f"{ZRPC_CLIENTS} zrpc.Client objects, one call each", one, ZRPC_CLIENTS,
              f"in their own process, each: {client_kb:,.0f} KiB, {client_threads:g} threads",
              client_process_kb=round(client_kb, 1), client_threads=client_threads)
        procs.terminate(kid, timeout=5)
        state(f"the {ZRPC_CLIENTS} zrpc.Client objects gone", one)
        for round_ in (1, 2):
            kid = load(procs, "load-dealers", "dealers", ep, str(IDLE_CLIENTS))
            info = all_said(procs, [kid], "ready", f"{IDLE_CLIENTS} idle clients")[0]
            dealer_kb = info["rss_kb"] / IDLE_CLIENTS
            state(f"{IDLE_CLIENTS:,} idle clients, one call each (round {round_})", one, IDLE_CLIENTS,
                  f"DEALERs in one process: {dealer_kb:,.0f} KiB each there", client_process_kb=round(dealer_kb, 1))
            procs.terminate(kid, timeout=5)
            state(f"the {IDLE_CLIENTS:,} clients gone (round {round_})", one)
        per = IDLE_WORKERS // WORKER_PROCS
        kids = [load(procs, "load-workers", "workers", ep, str(per)) for _ in range(WORKER_PROCS)]
        all_said(procs, kids, "ready", f"{IDLE_WORKERS} idle workers")
        up(procs, lambda: registered(ep) >= IDLE_WORKERS + 1, f"{IDLE_WORKERS} workers registered")
        state(f"{IDLE_WORKERS} idle workers heartbeating (and the first)", one, IDLE_WORKERS,
              f"concurrency 1, {per} per process")
        if broker_status(ep) is None:
            raise RuntimeError("the broker stopped answering")
    except Exception as exc:
        notes.append(failed("memory", exc, procs))
    finally:
        progress.skip_to(end - 1)
        stop_started(procs, since)
    progress.begin(f"memory: under load ({CLIENTS[-1]} client processes)")
    zp = [p for p in points if p.system == "zrpc"]
    under = [p for p in zp if p.axis == AXES[1] and p.n == CLIENTS[-1]]
    if under:
        p = under[0]
        out.append(Memory(f"under load, {CLIENTS[-1]} client processes (peak)", p.broker_rss_kb, p.broker_idle_kb,
                          note=f"the scaling broker, {p.row.calls_s:,.0f} calls/s, "
                               f"{p.answered or 0:,} answered by then",
                          detail={"answered": p.answered or 0}))
        last = zp[-1]
        if last is not p:
            out.append(Memory(f"after {last.answered or 0:,} calls answered (peak)", last.broker_rss_kb,
                              last.broker_idle_kb, note=f"the scaling broker, its last row ({last.n} {last.axis})",
                              detail={"answered": last.answered or 0}))
        progress.end(f"{p.broker_rss_kb / 1024:,.1f} MB")
    else:
        progress.end("not measured (it comes from the scaling section)")
        notes.append("memory under load: not measured (it is the scaling section's 64 client processes row)")
    return out, notes
