"""Load, faults and measurements for the soak (tests/chaos/test_soak.py).

Load: client threads and one AsyncClient calling examples.calc in every way a user does, each
outcome tallied against what the call may legitimately end with. Faults: worker kill -9 and
SIGSTOP/SIGCONT on a seeded schedule, and one broker restart per phase. Judgements: pure
functions over what was recorded (outcomes, the ledger, alerts), so that their rules can be
tested without processes (tests/unit/test_soak_rules.py).
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zrpc
from zrpc.testing import Processes, wait_until

Proc = subprocess.Popen[bytes]

PIPELINE = 200  # futures in flight per burst
BIG = 64 * 1024  # bytes per large echo
ASYNC_BURST = 50
TIMEOUT_CALL = 0.4  # a sleep(TIMEOUT_SLEEP) with this timeout must end in Timeout
TIMEOUT_SLEEP = 1.2
GRACE = 5.0  # beyond a call's own timeout, how long we wait for its future before calling it hung

EXPECTED = {
    "add": "ok", "pipelined": "ok", "echo64k": "ok", "error": "RemoteError", "timeout": "Timeout",
    "unknown": "MethodNotFound", "charge": "ok",
}
"""What each kind of call must end with when nothing goes wrong."""

NON_IDEMPOTENT = {"charge"}
NO_RESULT = object()
"""`want` of a call that must fail: any result is wrong."""


@dataclass(frozen=True, slots=True)
class Odd:
    """A call that did not end as EXPECTED says: judged against the rules after the run."""

    phase: str
    kind: str
    outcome: str
    start: float
    end: float
    detail: str


@dataclass(slots=True)
class Charge:
    outcome: str
    pid: int | None
    start: float
    end: float


@dataclass
class Tally:
    """Every call's outcome, thread-safe and small: expected outcomes are only counted."""

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    odd: list[Odd] = field(default_factory=list)
    charges: dict[str, Charge] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, phase: str, kind: str, outcome: str, start: float, end: float, detail: str = "",
            token: str | None = None, pid: int | None = None) -> None:
        with self.lock:
            self.counts[(phase, kind, outcome)] += 1
            if outcome != EXPECTED[kind]:
                self.odd.append(Odd(phase, kind, outcome, start, end, detail))
            if token is not None:
                self.charges[token] = Charge(outcome, pid, start, end)

    def total(self, phase: str | None = None) -> int:
        with self.lock:
            return sum(n for (p, _, _), n in self.counts.items() if phase is None or p == phase)


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, zrpc.ZrpcError):
        return type(exc).__name__, str(exc)[:200]
    if isinstance(exc, TimeoutError):  # our own wait on a future ran out: the call hung
        return "hung", f"no outcome within its timeout + {GRACE:g}s"
    return f"python:{type(exc).__name__}", repr(exc)[:200]


class Load:
    """Mixed load on one phase's brokers until stop(): sequential calls, pipelined futures,
    64 KiB echoes, handler errors, timeouts, unknown methods and unique-token charges, from
    threads sharing two Clients plus one AsyncClient on its own event loop."""

    def __init__(self, phase: str, brokers: list[str], tally: Tally, seed: int,
                 timeout: float = 10.0) -> None:
        self.phase = phase
        self.tally = tally
        self.timeout = timeout
        self.brokers = brokers
        self.seed = seed
        self._stop = threading.Event()
        self.clients = [zrpc.Client(brokers, timeout=timeout) for _ in range(2)]
        a, b = (c.proxy("calc") for c in self.clients)
        self.threads = [
            threading.Thread(target=self._guard, args=(name, fn), name=f"soak-{phase}-{name}", daemon=True)
            for name, fn in (
                ("seq0", lambda: self._sequential(a, 0)),
                ("seq1", lambda: self._sequential(b, 1)),
                ("pipe", lambda: self._pipelined(b)),
                ("big", lambda: self._big(a)),
                ("charge0", lambda: self._charges(a, "c0")),
                ("charge1", lambda: self._charges(b, "c1")),
                ("misc", lambda: self._misc(b)),
                ("async", lambda: asyncio.run(self._async())),
            )
        ]
        self.crashed: list[str] = []  # a load thread that died of an unexpected exception

    # --- control -------------------------------------------------------------------------

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 60.0) -> list[str]:
        """Stops and joins every thread; returns the names of those still running (hung)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in self.threads if t.is_alive()]
        for c in self.clients:
            c.close()
        return hung

    def _guard(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test, never silent
            self.crashed.append(f"{name}: {exc!r}")

    def _record(self, kind: str, start: float, outcome: str, detail: str = "", token: str | None = None,
                pid: int | None = None) -> None:
        self.tally.add(self.phase, kind, outcome, start, time.monotonic(), detail, token, pid)

    def _failed(self, kind: str, start: float, exc: BaseException, token: str | None) -> None:
        outcome, detail = _describe(exc)
        if isinstance(exc, zrpc.RemoteError) and kind == "error" and exc.remote_type != "ZeroDivisionError":
            outcome = f"RemoteError({exc.remote_type})"
        self._record(kind, start, outcome, detail, token)

    def _returned(self, kind: str, start: float, r: Any, want: Any) -> None:
        """A result: right or wrong. A charge's `want` is its token (the result names it and
        the worker that ran it)."""
        if kind == "charge":
            ok = isinstance(r, dict) and r.get("account") == want and r.get("charged") == 1
            pid = r.get("pid") if ok else None
            self._record(kind, start, "ok" if ok else "wrong result", "" if ok else repr(r)[:200], want,
                         pid if isinstance(pid, int) else None)
            return
        ok = want is not NO_RESULT and r == want
        self._record(kind, start, "ok" if ok else "wrong result", "" if ok else repr(r)[:200])

    def _call(self, kind: str, want: Any, fn: Callable[..., Any], *args: Any, t0: float | None = None) -> None:
        t0 = time.monotonic() if t0 is None else t0
        try:
            r = fn(*args)
        except Exception as exc:  # noqa: BLE001 - every outcome is tallied
            self._failed(kind, t0, exc, want if kind == "charge" else None)
            return
        self._returned(kind, t0, r, want)

    async def _acall(self, kind: str, want: Any, aw: Awaitable[Any], t0: float | None = None) -> None:
        start = time.monotonic() if t0 is None else t0
        try:
            r = await asyncio.wait_for(aw, self.timeout + GRACE)
        except Exception as exc:  # noqa: BLE001 - tallied (asyncio.TimeoutError is TimeoutError)
            self._failed(kind, start, exc, want if kind == "charge" else None)
            return
        self._returned(kind, start, r, want)

    # --- the load ------------------------------------------------------------------------

    def _sequential(self, p: Any, t: int) -> None:
        i = 0
        while not self._stop.is_set():
            self._call("add", t + i, p.add, t, i)
            i += 1

    def _pipelined(self, p: Any) -> None:
        burst = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            futs = [p.add.future(burst, i) for i in range(PIPELINE)]
            for i, f in enumerate(futs):
                self._call("pipelined", burst + i, f.result, self.timeout + GRACE, t0=t0)
            burst += 1

    def _big(self, p: Any) -> None:
        i = 0
        while not self._stop.is_set():
            payload = i.to_bytes(8, "big") * (BIG // 8)
            self._call("echo64k", payload, p.echo, payload)
            i += 1

    def _charges(self, p: Any, who: str) -> None:
        rng = random.Random(f"{self.seed}-{self.phase}-{who}")
        i = 0
        while not self._stop.is_set():
            token = f"{self.phase}.{who}.{i}"
            self._call("charge", token, p.charge, token, 1, rng.choice((0.0, 0.0, 0.005, 0.02)))
            i += 1

    def _misc(self, p: Any) -> None:
        rng = random.Random(f"{self.seed}-{self.phase}-misc")
        short_sleep = p.sleep.with_options(timeout=TIMEOUT_CALL)
        while not self._stop.is_set():
            kind = rng.choice(("error", "error", "timeout", "unknown", "unknown"))
            if kind == "error":
                self._call(kind, NO_RESULT, p.div, 1, 0)
            elif kind == "timeout":
                self._call(kind, NO_RESULT, short_sleep, TIMEOUT_SLEEP)
            else:
                self._call(kind, NO_RESULT, p.no_such_method, 1)

    async def _async(self) -> None:
        async with zrpc.AsyncClient(self.brokers, timeout=self.timeout) as c:
            p = c.proxy("calc")
            i = 0
            while not self._stop.is_set():
                await self._acall("add", i + 1, p.add(i, 1))
                t0 = time.monotonic()
                futs = [p.add.future(i, k) for k in range(ASYNC_BURST)]
                for k, f in enumerate(futs):
                    await self._acall("pipelined", i + k, f, t0)
                payload = (i + 1).to_bytes(8, "big") * (BIG // 8)
                await self._acall("echo64k", payload, p.echo(payload))
                token = f"{self.phase}.async.{i}"
                await self._acall("charge", token, p.charge(token, 1))
                await self._acall("error", NO_RESULT, p.div(i, 0))
                await self._acall("unknown", NO_RESULT, p.missing())
                i += 1


# --- the rules each outcome is judged by (pure: tests/unit/test_soak_rules.py) -------------

RESEND_SLACK = 3.0
"""Seconds after a restarted broker is whole again by which a client has surely re-sent what
it held (twice the default failover timeout): a deadline later than that is no excuse."""

WATCHED_ALERTS = ("worker_suspect", "worker_lost")
"""Alerts that may name only a worker the soak stopped or killed."""


def judge_outcomes(odd: Iterable[Odd], restart_window: tuple[float, float] | None, *, lone: bool,
                   t0: float = 0.0) -> tuple[list[str], Counter[str]]:
    """Every call that did not end as EXPECTED: allowed only where the rules allow it.
    A charge may end CallStateUnknown or Timeout (the ledger then says whether it ran), or
    ServiceUnavailable while the lone broker restarts (the ledger must say it never ran). An
    idempotent call may end ServiceUnavailable or Timeout only while the LONE broker restarts,
    and Timeout only if its deadline came before the client could re-send it to the broker
    that is back (RESEND_SLACK after the window): a call that times out 9 s after its broker
    returned was lost, not unlucky. Returns the broken rules and the tolerated outcomes."""
    problems: list[str] = []
    tolerated: Counter[str] = Counter()
    broken: Counter[tuple[str, str, float, float, str]] = Counter()

    def in_window(o: Odd) -> bool:
        w = restart_window
        return w is not None and o.start <= w[1] and o.end >= w[0]

    def before_resend(o: Odd) -> bool:
        return restart_window is not None and o.end <= restart_window[1] + RESEND_SLACK

    for o in odd:
        if o.kind in NON_IDEMPOTENT and o.outcome in ("CallStateUnknown", "Timeout"):
            tolerated[f"charge {o.outcome}"] += 1
        elif o.kind in NON_IDEMPOTENT and o.outcome == "ServiceUnavailable" and lone and in_window(o):
            tolerated["charge ServiceUnavailable during the broker restart"] += 1
        elif (o.kind not in NON_IDEMPOTENT and lone and in_window(o)
              and (o.outcome == "ServiceUnavailable" or (o.outcome == "Timeout" and before_resend(o)))):
            tolerated[f"{o.kind} {o.outcome} during the broker restart"] += 1
        else:  # alike failures (a burst of futures lost at once) make one line with a count
            broken[(o.kind, o.outcome, round(o.start - t0, 1), round(o.end - o.start, 1), o.detail)] += 1
    for (kind, outcome, start, took, detail), n in broken.items():
        problems.append(f"{n} x {kind} ended {outcome} (expected {EXPECTED[kind]}), started at "
                        f"{start:.1f}s, after {took:.1f}s: {detail}")
    return problems, tolerated


def judge_ledger(lines: Iterable[str], charges: dict[str, Charge]) -> tuple[list[str], dict[str, int]]:
    """Ledger lines are `token cents pid`, one per execution. Each charge ran at most once; one
    that returned ran exactly once, in the worker its result names; one answered
    ServiceUnavailable never ran; nothing ran that was never asked for."""
    problems: list[str] = []
    runs: Counter[str] = Counter()
    pids: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or not parts[2].isdigit():
            problems.append(f"ledger: malformed line {line!r}")
            continue
        runs[parts[0]] += 1
        pids[parts[0]] = int(parts[2])
    twice = sorted(t for t, n in runs.items() if n > 1)
    if twice:
        problems.append(f"ledger: {len(twice)} double executions, e.g. {twice[:5]}")
    strangers = sorted(t for t in runs if t not in charges)
    if strangers:
        problems.append(f"ledger: executions of charges never made: {strangers[:5]}")
    for token, c in charges.items():
        if c.outcome == "ok" and runs[token] != 1:
            problems.append(f"charge {token} returned a result but ran {runs[token]} times")
        elif c.outcome == "ok" and c.pid is not None and pids.get(token) != c.pid:
            problems.append(f"charge {token} says it ran in {c.pid}, the ledger says {pids.get(token)}")
        elif c.outcome == "ServiceUnavailable" and runs[token]:
            problems.append(f"charge {token} answered ServiceUnavailable yet ran {runs[token]} times")
    return problems, {"charges": len(charges), "executions": sum(runs.values()),
                      "max_runs": max(runs.values(), default=0),
                      "not_ok_but_ran": sum(1 for t, c in charges.items() if c.outcome != "ok" and runs[t])}


def judge_alerts(alerts: Iterable[tuple[float, dict[str, Any]]], hurt: set[int],
                 t0: float = 0.0) -> tuple[list[str], Counter[str]]:
    """No worker_suspect/worker_lost for a worker whose pid is not in `hurt` (worker names are
    host:pid:id), no internal_error at all. Returns the broken rules and the alerts by name."""
    problems: list[str] = []
    raised: Counter[str] = Counter()
    for t, ev in alerts:
        name = str(ev.get("name", "?"))
        raised[name] += 1
        if name == "internal_error":
            problems.append(f"alert internal_error from {ev.get('broker')}: {ev.get('detail')}")
        if name in WATCHED_ALERTS:
            parts = str(ev.get("subject", "")).split(":")
            pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
            if pid not in hurt:
                problems.append(f"alert {name} for healthy worker {ev.get('subject')} from "
                                f"{ev.get('broker')} ({ev.get('broker_state')}) at {t - t0:.2f}s: "
                                f"{ev.get('detail')}")
    return problems, raised


def registered_pids(status: dict[str, Any] | None) -> set[int] | None:
    if status is None:
        return None
    return {int(w["pid"]) for w in status.get("workers", []) if isinstance(w.get("pid"), int)}


def rss_kb(pid: int) -> int | None:
    """VmRSS from /proc (kB), or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class RssSampler:
    """Samples each broker's RSS once a second: the first sample after its warm-up and its
    last one are compared after the load."""

    def __init__(self, warmup: float) -> None:
        self.warmup = warmup
        self.brokers: dict[str, tuple[Proc, float]] = {}  # label -> (process, time it joined the load)
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.series: dict[str, list[tuple[float, int]]] = {}  # (seconds since it joined, kB)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def watch(self, label: str, proc: Proc) -> None:
        with self._lock:
            self.brokers[label] = (proc, time.monotonic())

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        now = time.monotonic()
        with self._lock:
            items = list(self.brokers.items())
        for label, (proc, since) in items:
            if proc.poll() is not None:
                continue
            kb = rss_kb(proc.pid)
            if kb is None:
                continue
            self.series.setdefault(label, []).append((now - since, kb))
            if now - since >= self.warmup:
                self.first.setdefault(label, kb)
                self.last[label] = kb

    def trend(self, label: str, points: int = 8) -> str:
        """A few samples across the broker's life, to tell a plateau from a leak."""
        series = self.series.get(label, [])
        if not series:
            return "-"
        step = max(1, len(series) // points)
        picked = series[::step] + ([series[-1]] if (len(series) - 1) % step else [])
        return " ".join(f"{t:.0f}s:{kb // 1024}M" for t, kb in picked)

    def _run(self) -> None:
        while not self._stop.wait(1.0):  # a sampling period, not a synchronisation
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


class Faults:
    """Injects faults on a seeded schedule until `until`: kill -9 a worker (and start a new
    one), SIGSTOP one for 0.5-3 s, and once, at `restart_at`, restart the broker(s) through
    `restart_broker`. One fault at a time: each waits for the cluster to be whole again."""

    def __init__(self, rng: random.Random, procs: Processes, workers: list[Proc],
                 start_worker: Callable[[], Proc], brokers_up: Callable[[], Iterable[str]],
                 status: Callable[[str], dict[str, Any] | None],
                 restart_broker: Callable[[], None], restart_at: float, until: float) -> None:
        self.rng = rng
        self.procs = procs
        self.workers = workers
        self.start_worker = start_worker
        self.brokers_up = brokers_up
        self.status = status
        self.restart_broker = restart_broker
        self.restart_at = restart_at
        self.until = until
        self.killed: set[int] = set()  # pids this soak killed (any process)
        self.stopped: set[int] = set()  # worker pids this soak SIGSTOPped
        self.counts: Counter[str] = Counter()
        self.log: list[str] = []  # what happened when, printed with the summary
        self.problems: list[str] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._deck: list[str] = []
        self._thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)

    def start(self) -> Faults:
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic() - self.t0:7.2f}s {text}")

    def kill(self, proc: Proc) -> None:
        self.killed.add(proc.pid)
        self.procs.kill(proc)

    def _next_kind(self) -> str:
        """Random but balanced: every two worker faults are one of each, in random order."""
        if not self._deck:
            self._deck = ["kill", "stop"]
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                gap = self.rng.uniform(0.5, 2.0)
                if self._stop.wait(gap):  # a schedule, not a synchronisation
                    break
                now = time.monotonic()
                late = now + 4.0 > self.until  # no time left for another fault to settle
                if self.counts["broker_restart"] == 0 and (late or (
                        now >= self.restart_at and self.counts["worker_kill9"] and self.counts["worker_sigstop"])):
                    self.note("broker restart")
                    self.restart_broker()  # once per phase, however short the phase
                    self.counts["broker_restart"] += 1
                    self.note("broker restart done: every worker registered again")
                    continue
                if late:
                    break
                kind = self._next_kind()
                w = self.rng.choice(self.workers)
                if kind == "kill":
                    self.note(f"kill -9 worker {w.pid}")
                    self.kill(w)
                    self.workers.remove(w)
                    new = self.start_worker()
                    self.workers.append(new)
                    self.counts["worker_kill9"] += 1
                    self.wait_registered(new.pid, f"replacement worker {new.pid}")
                else:
                    pause = self.rng.uniform(0.5, 3.0)
                    self.note(f"SIGSTOP worker {w.pid} for {pause:.2f}s")
                    self.stopped.add(w.pid)
                    self.procs.signal(w, signal.SIGSTOP)
                    try:
                        time.sleep(pause)  # noqa: sleep (the length of the fault itself)
                    finally:
                        self.procs.signal(w, signal.SIGCONT)
                    self.counts["worker_sigstop"] += 1
                    self.wait_registered(w.pid, f"resumed worker {w.pid}")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.problems.append(f"fault thread: {exc!r}")

    def wait_registered(self, pid: int, what: str, timeout: float = 30.0) -> None:
        """Until every broker that is up lists the worker (a resumed or new worker rejoins)."""
        def ok() -> bool:
            for ep in self.brokers_up():
                pids = registered_pids(self.status(ep))
                if pids is None or pid not in pids:
                    return False
            return True

        try:
            wait_until(ok, timeout, interval=0.1, what=f"{what} registered")
        except TimeoutError as exc:
            self.problems.append(str(exc))
            self.note(f"PROBLEM: {exc}")
