"""How one row is measured: a warm-up, then calls for a fixed time, with the CPU time every
process of the row spent on them (so a system is judged by its cost as well as its rate).

Three ways to keep calls in flight, one per kind of client: a window of futures (one thread
submits, then waits for the oldest), threads that each make one call at a time (clients with
no pipelining), and asyncio tasks. Each calls `start()` once warm; the row's clock and CPU
figures run from there to the last reply.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second of /proc/PID/stat's utime and stime."""


@dataclass(frozen=True)
class Proc:
    """One process a row's CPU time is read from: `role` is client, broker or server."""

    label: str
    role: str
    pid: int


def warm_up(seconds: float) -> float:
    """A row's warm-up: long enough to fill queues and caches, short beside the row."""
    return min(1.0, max(0.1, seconds / 4))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of proc(5)


def cpu_snapshot(procs: list[Proc]) -> dict[str, float]:
    return {p.label: cpu_seconds(p.pid) for p in procs}


def memory_kb(pid: int, key: str = "VmRSS") -> int:
    """A process's resident set (VmRSS) or its peak (VmHWM) in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} is not in /proc/{pid}/status")


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The value below which a share `q` of the values fall (None: there are none)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


@dataclass
class Row:
    """One system's figures for one workload."""

    system: str
    workload: str
    calls: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_us: dict[str, float] = field(default_factory=dict)  # process label -> CPU µs per call
    roles: dict[str, str] = field(default_factory=dict)  # process label -> role

    @property
    def calls_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def cpu_role(self, role: str) -> float | None:
        """CPU µs per call of every process of `role` together (None: the row has none)."""
        found = [us for label, us in self.cpu_us.items() if self.roles[label] == role]
        return sum(found) if found else None

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.system, "workload": self.workload, "calls": self.calls,
                "seconds": round(self.seconds, 3), "calls_s": round(self.calls_s, 1),
                "p50_us": _round(self.p50_us), "p99_us": _round(self.p99_us),
                "cpu_us_per_call": {k: round(v, 2) for k, v in self.cpu_us.items()},
                "cpu_us_per_call_by_role": {r: _round(self.cpu_role(r), 2)
                                            for r in ("client", "broker", "server")},
                "roles": self.roles}


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


class Meter:
    """Times one row and reads the CPU time of its processes around the measured part."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = [Proc("client", "client", os.getpid()), *procs]
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}

    def start(self) -> None:
        self._cpu0 = cpu_snapshot(self.procs)
        self._t0 = time.perf_counter()

    def stop(self, system: str, workload: str, calls: int) -> Row:
        elapsed = time.perf_counter() - self._t0
        cpu1 = cpu_snapshot(self.procs)
        per_call = {label: (cpu1[label] - self._cpu0[label]) * 1e6 / max(calls, 1) for label in cpu1}
        return Row(system, workload, calls, elapsed, cpu_us=per_call,
                   roles={p.label: p.role for p in self.procs})


def sequential(call: Callable[[], object], warm: float, seconds: float, meter: Meter,
               system: str, workload: str) -> Row:
    """One call at a time; every call's latency is kept for p50 and p99."""
    end = time.perf_counter() + warm
    while time.perf_counter() < end:
        call()
    lat: list[float] = []
    meter.start()
    end = time.perf_counter() + seconds
    t = 0.0
    while t < end:
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    row = meter.stop(system, workload, len(lat))
    lat.sort()
    row.p50_us = lat[len(lat) // 2] * 1e6
    row.p99_us = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
    return row


def timed(call: Callable[[], object], latencies: list[float], counting: Callable[[], bool]) -> Callable[[], object]:
    """`call`, keeping the latency (seconds) of each call made while `counting()` holds."""
    def run() -> object:
        t = time.perf_counter()
        out = call()
        if counting():
            latencies.append(time.perf_counter() - t)  # list.append is atomic: threads may share it
        return out

    return run


def in_flight(submit: Callable[[], Any], wait: Callable[[Any], object], window: int, warm: float,
              seconds: float, start: Callable[[], None]) -> int:
    """Keeps `window` calls in flight from one thread: submit until the window is full, then
    wait for the oldest. Returns the calls completed after `start()`."""
    pending: deque[Any] = deque()

    def run(until: float) -> int:
        done = 0
        while time.perf_counter() < until:
            if len(pending) >= window:
                wait(pending.popleft())
                done += 1
            pending.append(submit())
        return done

    run(time.perf_counter() + warm)
    start()
    done = run(time.perf_counter() + seconds)
    while pending:
        wait(pending.popleft())
        done += 1
    return done


def in_threads(make_call: Callable[[], Callable[[], object]], threads: int, warm: float,
               seconds: float, start: Callable[[], None]) -> int:
    """`threads` threads, each with a client of its own (`make_call()` runs in the thread),
    each making one call at a time. Returns the calls completed after `start()`."""
    counting = threading.Event()
    stop = threading.Event()
    counts = [0] * threads
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        try:
            call = make_call()
            while not stop.is_set():
                call()
                if counting.is_set():
                    counts[i] += 1
        except BaseException as exc:  # reported by the main thread, not lost in this one
            errors.append(exc)

    pool = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    stop.wait(warm)  # the warm-up: a measured duration, not a synchronisation
    start()
    counting.set()
    stop.wait(seconds)
    stop.set()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts)


async def in_tasks(call: Callable[[], Awaitable[object]], tasks: int, warm: float, seconds: float,
                   start: Callable[[], None]) -> int:
    """`tasks` asyncio tasks, each awaiting one call at a time. Returns the calls completed
    after `start()`."""
    state = {"counting": False, "stop": False, "done": 0}

    async def loop() -> None:
        while not state["stop"]:
            await call()
            if state["counting"]:
                state["done"] += 1

    running = [asyncio.create_task(loop()) for _ in range(tasks)]
    await asyncio.sleep(warm)  # noqa: sleep (the warm-up: a measured duration)
    start()
    state["counting"] = True
    await asyncio.sleep(seconds)  # noqa: sleep (the measured window)
    state["stop"] = True
    await asyncio.gather(*running)
    return int(state["done"])
