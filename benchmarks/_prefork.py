"""The prefork section: one broker, `zrpc worker zrpc.examples.calc:calc --processes N` for
N = 1 and 2, the same client, for microsecond handlers and CPU-bound ones.

`--processes 1` is the worker in the command's own process; with 2 the command imports calc,
forks two worker processes and supervises them, and each is a worker of its own at the broker.
Before N is timed the broker lists exactly N workers, each with the pid of one of that
command's processes. Workloads: `add(1, 2)` with 128 futures in flight (inline, microseconds)
and `burn(0.001)` with 64 (a pool handler spinning 1 ms in pure Python, holding the GIL).
A row's worker CPU is every process of the command: its N workers and, for N > 1, the supervisor.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from _measure import Meter, Proc, Row, in_flight, warm_up
from _sections import Progress, failed, finish, stop_started
from _systems import CALL_TIMEOUT, PIPE, WORKLOADS, Workload, broker_status, up, zrpc_broker

import zrpc
from zrpc.testing import Processes

PROCESSES = (1, 2)
BURN = "burn64"
BURN_SECONDS = 0.001
"""What each burn call spins: a millisecond, against add's microseconds."""
BURN_WINDOW = 64
"""Burn calls in flight: the 8 threads of each of two processes busy, and as many again waiting
at the broker for the next free slot."""
CALLS = {PIPE: WORKLOADS[PIPE], BURN: Workload(BURN, f"burn({BURN_SECONDS:g}) {BURN_WINDOW} in flight", "burn",
                                                BURN_WINDOW)}
ARGS: dict[str, tuple[Any, ...]] = {PIPE: (1, 2), BURN: (BURN_SECONDS,)}
KIND = {PIPE: "microseconds, inline", BURN: "CPU-bound"}
STEPS = len(PROCESSES) * len(CALLS)
SUPERVISOR = "supervisor"


@dataclass
class PreforkRow:
    """One workload against one `zrpc worker --processes N`."""

    processes: int
    row: Row
    served: dict[str, int] = field(default_factory=dict)  # worker process label -> calls it answered

    @property
    def workers(self) -> list[str]:
        """The labels of the worker processes (not the client, broker or supervisor)."""
        return list(self.served)

    def share(self) -> dict[str, float]:
        total = sum(self.served.values())
        return {w: n / total for w, n in self.served.items()} if total else {}

    def as_dict(self) -> dict[str, Any]:
        d = self.row.as_dict()
        return {"processes": self.processes, **d, "answered_by_process": self.served,
                "supervisor_cpu_us_per_call": _round(self.row.cpu_us.get(SUPERVISOR))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def parent_of(pid: int) -> int:
    """The parent pid of a process, from /proc/PID/stat (0: it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0
    return int(text[text.rindex(")") + 2:].split()[1])  # field 4 of proc(5)


def listed(ep: str) -> list[dict[str, Any]]:
    """The workers the broker at `ep` lists (none when it does not answer)."""
    workers: list[dict[str, Any]] = (broker_status(ep) or {}).get("workers") or []
    return workers


def serving(ep: str, n: int, command: int) -> list[int] | None:
    """The pids of the command's N worker processes, once the broker lists exactly those (with
    one process, the command's own pid; with more, its children), else None."""
    pids = sorted(int(w.get("pid", 0)) for w in listed(ep))
    if len(pids) != n:
        return None
    ours = pids == [command] if n == 1 else all(parent_of(p) == command for p in pids)
    return pids if ours else None


def served(ep: str, labels: dict[int, str]) -> dict[str, int]:
    """Calls each worker process (pid -> label) has answered so far."""
    return {labels[int(w["pid"])]: int(w.get("served", 0)) for w in listed(ep) if int(w.get("pid", 0)) in labels}


def timed_row(client: zrpc.Client, key: str, n: int, found: list[Proc], ep: str, labels: dict[int, str],
              seconds: float) -> PreforkRow:
    """`key`'s calls in flight for `seconds` after a warm-up, with each call's latency."""
    wl = CALLS[key]
    fut = getattr(client.proxy("calc"), wl.method).future
    args = ARGS[key]
    meter = Meter(found)
    lat: list[float] = []
    on = threading.Event()
    before: dict[str, int] = {}

    def start() -> None:
        before.update(served(ep, labels))  # before the clock: the status call is not the row's
        on.set()
        meter.start()

    def submit() -> tuple[float, Future[Any]]:
        return time.perf_counter(), fut(*args)

    def wait(token: tuple[float, Future[Any]]) -> object:
        out = token[1].result()
        if on.is_set():
            lat.append(time.perf_counter() - token[0])
        return out

    calls = in_flight(submit, wait, wl.window, warm_up(seconds), seconds, start)
    row = finish(meter.stop(f"prefork{n}", key, calls), lat)
    after = served(ep, labels)
    return PreforkRow(n, row, {w: after[w] - before.get(w, 0) for w in after})


def start_worker(procs: Processes, ep: str, n: int) -> tuple[subprocess.Popen[bytes], list[Proc], dict[int, str]]:
    """`zrpc worker --processes n`, once the broker lists its n processes: the command, the
    Procs whose CPU a row reads, and each worker process's label by pid."""
    cmd = procs.zrpc("worker", "zrpc.examples.calc:calc", "--brokers", ep, "--processes", str(n),
                     "--log-level", "warning", name=f"zrpc-worker-prefork{n}", die_with_parent=True)
    found = up(procs, lambda: serving(ep, n, cmd.pid), f"the broker listing {n} worker process(es)")
    assert isinstance(found, list)  # the predicate's value
    labels = {pid: "worker" if n == 1 else f"worker-{i + 1}" for i, pid in enumerate(found)}
    measured = [Proc(label, "server", pid) for pid, label in labels.items()]
    if n > 1:
        measured.append(Proc(SUPERVISOR, "server", cmd.pid))
    return cmd, measured, labels


def check(client: zrpc.Client) -> None:
    """The calls must do what the rows say, or the figures measure something else."""
    calc = client.proxy("calc")
    got = calc.add(1, 2), calc.burn(BURN_SECONDS)
    if got[0] != 3 or not isinstance(got[1], int) or got[1] <= 0:
        raise RuntimeError(f"add(1, 2) and burn({BURN_SECONDS:g}) answered wrongly: {got}")


def prefork(procs: Processes, seconds: float, progress: Progress) -> tuple[list[PreforkRow], list[str]]:
    """The rows of 1 and 2 worker processes through one broker; everything is stopped at the end."""
    out: list[PreforkRow] = []
    notes: list[str] = []
    end = progress.counter[0] + STEPS
    since = len(procs.procs)
    client: zrpc.Client | None = None
    try:
        ep, broker = zrpc_broker(procs, name="zrpc-broker-prefork")
        client = zrpc.Client([ep], timeout=CALL_TIMEOUT)
        for n in PROCESSES:
            cmd, workers, labels = start_worker(procs, ep, n)
            check(client)
            for key in CALLS:
                progress.begin(f"prefork: {n} process{'es' * (n > 1)}, {CALLS[key].label}")
                r = timed_row(client, key, n, [Proc("broker", "broker", broker.pid), *workers], ep, labels,
                              seconds)
                out.append(r)
                progress.end(f"{r.row.calls_s:,.0f} calls/s")
            procs.terminate(cmd, timeout=5)
            up(procs, lambda: not listed(ep), "the broker listing no worker")
    except Exception as exc:  # the rows measured so far stand
        notes.append(failed("prefork", exc, procs))
    finally:
        if client is not None:
            client.close()
        progress.skip_to(end)
        stop_started(procs, since)
    return out, notes


def busiest(row: Row) -> tuple[str, float]:
    """The role that spent the most CPU per call (every worker process together) and its µs."""
    roles = {"client": "the client", "broker": "the broker", "server": "the worker"}
    us, role = max((row.cpu_role(r) or 0.0, r) for r in roles)
    return roles[role], us


def outlook(rows: Sequence[PreforkRow], cpus: int | None = None) -> str:
    """One line from the measured rows: what the second worker process bought for each workload,
    and why ("" without rows of 1 and 2 processes for some workload)."""
    cpus = cpus or os.cpu_count() or 1
    by = {(r.processes, r.row.workload): r.row for r in rows}
    one, two = PROCESSES[0], PROCESSES[-1]
    parts: list[str] = []
    for key in (BURN, PIPE):
        a, b = by.get((one, key)), by.get((two, key))
        if a is None or b is None or not a.calls_s:
            continue
        who, us = busiest(a)
        total, worker = sum(a.cpu_us.values()), a.cpu_role("server") or 0.0
        why = (f"the worker was the busiest, {worker:,.0f} of {total:,.0f} µs of CPU per call, and a process's "
               "Python runs on one core at a time" if who == "the worker" else
               f"the worker spent {worker:,.0f} of {total:,.0f} µs of CPU per call and {who}, at {us:,.0f}, "
               "was the busiest")
        spent = sum(b.cpu_us.values())
        cap = (f"; at the CPU per call measured with {two}, the {cpus} cores allow ~{cpus * 1e6 / spent:,.0f} "
               "calls/s" if spent else "")
        than = f" the calls/s of {one}" if not parts else ""
        parts.append(f"{b.calls_s / a.calls_s:.2f}×{than} for {CALLS[key].label} ({KIND[key]}: "
                     f"with {one} process {why}{cap})")
    if not parts:
        return ""
    return f"On this machine ({cpus} cpus) {two} worker processes did " + " and ".join(parts) + "."
