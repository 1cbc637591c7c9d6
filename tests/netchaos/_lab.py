"""The processes of one scenario on the namespace hosts (brokers and their witnesses, workers,
a client load, delay relays), what they recorded, and the rules their records are judged by.

Every process runs inside its host through `Processes.spawn(["ip", "netns", "exec", NS, ...])`,
so a child that dies unasked or logs a traceback fails the test as everywhere in the suite.
Host a runs the primary broker, b the backup, c and d workers, e the clients. Each broker's
witness (tests/netchaos/_watch.py) runs on the broker's own host and reaches it through that
host's loopback route, which no fault touches: the test sees a broker even while it is cut off.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.netchaos._net import Net
from zrpc import _defaults as D
from zrpc._io._internal import MARK as INTERNAL_ERROR
from zrpc._tools._procs import Processes, tail

Proc = subprocess.Popen[bytes]

INTERVAL = D.HEARTBEAT_INTERVAL
LIVENESS = D.LIVENESS
PEER_TIMEOUT = 2 * INTERVAL
"""Binary Star's peer timeout (PEER_INTERVALS intervals, broker/_core/_bstar.py)."""
FAILOVER_TIMEOUT = 2 * INTERVAL * LIVENESS
"""A client's default failover timeout (docs/operations.md §3)."""
WORKER_SILENCE = INTERVAL * LIVENESS
"""A worker silent this long is lost (docs/protocol.md §7 rule 11)."""
SLACK = 2.5
"""Seconds added to every documented bound: the machine is shared and its timings are noisy."""
REJOIN = 8.0 * 1.2 + WORKER_SILENCE + 1.0 + SLACK
"""Seconds after a cut heals, however long it was, by which a worker has registered again: its
reconnect backoff (8 s at most, jittered by 20 %, docs/protocol.md §10), the silence that closes
a link, one SYN retransmission, and slack. The broker may still hold the worker's old connection,
half-open; its ROUTER_HANDOVER lets the new one take the routing id over at once."""


POLL = 0.05
TABLE_WIDTH = 160
SERVICE = "tests.netchaos._services:net"


class Record:
    """A JSON-lines file another process appends to, read as it grows (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._lines: list[dict[str, Any]] = []

    def lines(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
            end = data.rfind(b"\n")
            if end >= 0:
                self._pos += end + 1
                for line in data[: end + 1].splitlines():
                    if line.startswith(b"{"):
                        self._lines.append(json.loads(line))
        return self._lines


class Broker:
    """One broker of the pair, and what its witness saw."""

    def __init__(self, host: str, role: str, endpoint: str, monitor: str, witness: Record) -> None:
        self.host = host
        self.role = role
        self.endpoint = endpoint
        self.monitor = monitor
        self.witness = witness
        self.proc: Proc | None = None

    def statuses(self, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        return [(r["t"], r["status"]) for r in self.witness.lines()
                if "status" in r and "down" not in r["status"] and r["t"] >= since]

    def now(self) -> dict[str, Any]:
        """The latest status its witness saw ({} before the first)."""
        got = self.statuses()
        return got[-1][1] if got else {}

    def state(self) -> str | None:
        return self.now().get("state")

    def first(self, pred: Callable[[dict[str, Any]], bool], since: float = 0.0) -> float | None:
        """When a status first met `pred` (None: never yet)."""
        return next((t for t, s in self.statuses(since) if pred(s)), None)

    def alerts(self, name: str | None = None, state: str | None = None,
               since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        return [(r["t"], r["alert"]) for r in self.witness.lines() if "alert" in r and r["t"] >= since
                and (name is None or r["alert"]["name"] == name)
                and (state is None or r["alert"]["state"] == state)]

    def alert_names(self, since: float = 0.0) -> list[str]:
        return [f"{a['name']} {a['state']}" for _, a in self.alerts(since=since)]

    def __repr__(self) -> str:
        s = self.now()
        return (f"<{self.role} on {self.host}: {s.get('state')} serving={s.get('serving')} epoch={s.get('epoch')} "
                f"peer={s.get('peer_state')} workers={s.get('workers')} alerts={s.get('alerts')}>")


class LoadRun:
    """A client load (tests/netchaos/_load.py) and its outcomes."""

    def __init__(self, lab: Lab, proc: Proc, record: Record, timeout: float) -> None:
        self.lab = lab
        self.proc = proc
        self.record = record
        self.timeout = timeout
        self.stopped = False

    def calls(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.record.lines() if "m" in r and (kind is None or r["m"] == kind)]

    def ok(self, since: float = 0.0, kind: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.calls(kind) if c["out"] == "ok" and c["t1"] >= since]

    def wait_ok(self, n: int, since: float = 0.0, timeout: float = 15.0, kind: str | None = None,
                what: str = "calls answered") -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            got = self.ok(since, kind)
            return got if len(got) >= n else None

        got: list[dict[str, Any]] = self.lab.wait(enough, timeout, what=f"{n} {what}")
        return got

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM: every thread finishes its call; fails if one hung or the load crashed."""
        if not self.stopped:
            self.stopped = True
            self.lab.procs.terminate(self.proc, timeout=self.timeout + 10)
        done = [r for r in self.record.lines() if r.get("done")]
        assert done, f"the load did not finish cleanly:\n{tail(self.lab.procs.child(self.proc).log)}"
        assert done[-1]["hung"] == 0, f"{done[-1]['hung']} load thread(s) hung in a call"
        crashes = [c for c in self.calls() if c["out"].startswith("crash:")]
        assert not crashes, f"the client crashed: {crashes[:3]}"
        return self.calls()


class Lab:
    """One scenario's hosts and processes."""

    def __init__(self, net: Net, procs: Processes, tmp: Path) -> None:
        self.net = net
        self.procs = procs
        self.tmp = tmp
        self.ledger = tmp / "ledger.txt"
        self.brokers: list[Broker] = []
        self.t0 = time.monotonic()

    # --- processes -----------------------------------------------------------------------

    def spawn(self, host: str, argv: Sequence[str], name: str, env: dict[str, str] | None = None) -> Proc:
        return self.procs.spawn(self.net.exec_argv(host, argv), name=name, env=env, die_with_parent=True)

    def relay(self, host: str, routes: dict[int, str], delay: float, jitter: float) -> Proc:
        """A delay relay (tests/netchaos/_relay.py) in `host`: local port -> host:port, ready
        when this returns; `delaying(proc, True)` turns the delay on."""
        proc = self.python(host, "tests.netchaos._relay", *(a for port, target in routes.items()
                                                             for a in ("--route", f"{port}={target}")),
                           "--delay", str(delay), "--jitter", str(jitter), name=f"relay-{host}")
        log = self.procs.child(proc).log
        self.wait(lambda: "relay: ready" in tail(log), 20, what="the delay relay listening")
        return proc

    def delaying(self, relay: Proc, on: bool) -> None:
        self.procs.signal(relay, signal.SIGUSR1 if on else signal.SIGUSR2)

    def python(self, host: str, module: str, *args: str, name: str, env: dict[str, str] | None = None) -> Proc:
        return self.spawn(host, [sys.executable, "-m", module, *args], name=name, env=env)

    def pair(self, roles: tuple[str, str] = ("primary", "backup"), settle: bool = True,
             extra: Sequence[str] = ()) -> tuple[Broker, Broker]:
        """Brokers on a and b (their witnesses first, so that no alert is missed: one raised
        before a witness's subscription arrived comes to it as `in_force`); with
        `settle`, until a is active and b passive, each hearing the other."""
        hosts = ("a", "b")
        made = []
        for i, (host, role) in enumerate(zip(hosts, roles)):
            ip = self.net.ip(host)
            b = Broker(host, role, f"tcp://{ip}:{D.FRONTEND_PORTS[i]}", f"tcp://{ip}:{D.MONITOR_PORTS[i]}",
                       Record(self.tmp / f"witness-{host}.jsonl"))
            self.python(host, "tests.netchaos._watch", "--broker", b.endpoint, "--monitor", b.monitor,
                        "--out", str(b.witness.path), name=f"witness-{host}")
            made.append(b)
        self.brokers = made
        self.wait(lambda: all(any(r.get("hello") for r in b.witness.lines()) for b in made), 20,
                  what="witnesses up")
        for i, (b, host) in enumerate(zip(made, hosts)):
            peer = hosts[1 - i]
            b.proc = self.python(host, "zrpc", "broker", "--role", b.role, "--frontend", b.endpoint,
                                 "--state", f"tcp://{self.net.ip(host)}:{D.STATE_PORTS[i]}",
                                 "--peer-state", f"tcp://{self.net.ip(peer)}:{D.STATE_PORTS[1 - i]}",
                                 "--monitor", b.monitor, "--log-level", "debug", *extra, name=f"broker-{host}")
        self.wait(lambda: all(b.now() for b in made), 20, what="both brokers answering")
        if settle:
            self.wait(lambda: self.states() == ["active", "passive"]
                      and made[0].now().get("peer_state") == "passive"
                      and made[1].now().get("peer_state") == "active", 15, what="pair settled")
        return made[0], made[1]

    @property
    def endpoints(self) -> list[str]:
        return [b.endpoint for b in self.brokers]

    def states(self) -> list[str | None]:
        return [b.state() for b in self.brokers]

    def worker(self, host: str, *args: str, brokers: Sequence[str] | None = None, name: str | None = None) -> Proc:
        eps = ",".join(brokers or self.endpoints)
        return self.python(host, "zrpc", "worker", SERVICE, "--brokers", eps, "--log-level", "debug", *args,
                           name=name or f"worker-{host}", env={"ZRPC_LEDGER": str(self.ledger)})

    def wait_registered(self, pids: Iterable[int], brokers: Sequence[Broker] | None = None,
                        timeout: float = 20.0) -> None:
        want = set(pids)
        on = list(brokers or self.brokers)
        self.wait(lambda: all(want <= set(b.now().get("workers", [])) for b in on), timeout,
                  what=f"workers {sorted(want)} registered on {', '.join(b.host for b in on)}")

    def load(self, mix: str, *, host: str = "e", timeout: float = D.CALL_TIMEOUT, pace: float = 0.01,
             hold: float = 0.3, brokers: Sequence[str] | None = None, name: str = "load") -> LoadRun:
        rec = Record(self.tmp / f"{name}.jsonl")
        proc = self.python(host, "tests.netchaos._load", "--brokers", ",".join(brokers or self.endpoints),
                           "--out", str(rec.path), "--mix", mix, "--timeout", str(timeout), "--pace", str(pace),
                           "--hold", str(hold), name=name)
        return LoadRun(self, proc, rec, timeout)

    def once(self, host: str, *args: str, timeout: float = 30.0, name: str = "cli") -> tuple[int, str]:
        """A `zrpc` command run to its end inside `host`: (exit code, its output, tables as
        wide as a wide terminal's)."""
        proc = self.python(host, "zrpc", *args, name=name, env={"COLUMNS": str(TABLE_WIDTH)})
        self.procs.expect_exit(proc)
        if args[:1] == ("status",) and "--json" not in args:
            # its brokers table has a column "internal errors": a header, not a logged error
            self.procs.expect_in_log(proc, INTERNAL_ERROR, 1)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs.kill(proc)
            raise
        return code, tail(self.procs.child(proc).log, 10**9)

    # --- waiting -----------------------------------------------------------------------

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        """Polls `pred` until truthy; fails at once if a process died unasked, and on timeout
        says what each broker was doing."""
        deadline = time.monotonic() + timeout
        while True:
            self.procs.assert_running()
            value = pred()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: not within {timeout:g}s\n{self.describe()}")
            time.sleep(POLL)  # noqa: sleep (polling with a deadline)

    def hold(self, seconds: float, invariant: Callable[[], None] | None = None) -> None:
        """Lets a fault last `seconds`, checking `invariant` (it raises) all along."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.procs.assert_running()
            if invariant is not None:
                invariant()
            time.sleep(POLL)  # noqa: sleep (the length of the fault itself)

    def describe(self) -> str:
        lines = [repr(b) for b in self.brokers]
        lines += [f"fault: {f}" for f in self.net.faults]
        lines.append("faults made: " + ", ".join(f"{self.t(t)} {what}" for t, what in self.net.history))
        for b in self.brokers:
            lines.append(f"alerts of {b.host}: {b.alert_names()[-12:]}")
        return "\n".join(lines)

    def t(self, when: float | None) -> str:
        return "never" if when is None else f"{when - self.t0:.2f}s"


# --- the rules records are judged by (pure) ----------------------------------------------


def ledger_runs(path: Path) -> Counter[str]:
    """Executions per charge token (one ledger line `token pid` each)."""
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())


def judge_charges(calls: Iterable[dict[str, Any]], runs: Counter[str]) -> tuple[list[str], Counter[str]]:
    """Each charge ran at most once; one answered ok ran exactly once; nothing ran that was not
    asked for; outcomes other than ok and CallStateUnknown are problems. Returns the broken
    rules and the outcomes counted."""
    problems: list[str] = []
    outcomes: Counter[str] = Counter()
    asked = set()
    for c in calls:
        if c["m"] != "charge":
            continue
        asked.add(c["k"])
        outcomes[c["out"]] += 1
        if c["out"] == "ok" and runs[c["k"]] != 1:
            problems.append(f"charge {c['k']} answered ok but ran {runs[c['k']]} times")
        elif c["out"] not in ("ok", "CallStateUnknown"):
            problems.append(f"charge {c['k']} ended {c['out']}: {c.get('detail')}")
    twice = sorted(k for k, n in runs.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} charges ran more than once, e.g. {twice[:5]}")
    strangers = sorted(set(runs) - asked)
    if strangers:
        problems.append(f"charges ran that nobody asked for: {strangers[:5]}")
    return problems, outcomes


def not_ok(calls: Iterable[dict[str, Any]], kinds: Sequence[str] = ("add", "hold")) -> list[dict[str, Any]]:
    """Idempotent calls that did not end with their right result: each one is a lost call."""
    return [c for c in calls if c["m"] in kinds and c["out"] != "ok"]


def longest_gap(calls: Iterable[dict[str, Any]], since: float, until: float) -> float:
    """The longest time in [since, until] without an answered call."""
    times: list[float] = sorted(c["t1"] for c in calls if c["out"] == "ok" and since <= c["t1"] <= until)
    edges = [since, *times, until]
    return max(b - a for a, b in zip(edges, edges[1:]))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
