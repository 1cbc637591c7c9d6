"""`zrpc pair`: a primary and a backup broker on this machine, as supervised children (the
supervision, `supervise`, also runs the members of `zrpc cluster`).

Supervision heals a crash but never hides it: every restart prints a line, and the broker is
started again with `--restarts N`, so it raises a `broker_restarted` alert and shows the count
in `zrpc status`. Restarts back off (1 s doubling to 30 s, reset after a minute up), and a
broker that fails at start-up five times in a row is left down, with the reason printed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import click

from zrpc import _defaults as D
from zrpc._tools._procs import RESTART_MARK, Processes, port_free

DEFAULT_PORTS = {"frontend": D.FRONTEND_PORTS, "state": D.STATE_PORTS, "monitor": D.MONITOR_PORTS}
ROLES = D.ROLES

BACKOFF_FIRST = 1.0
"""Seconds before the first restart of a broker that died."""
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
"""A broker up this long is healthy again: its next restart waits BACKOFF_FIRST."""
STARTUP_WINDOW = 5.0
"""An exit sooner than this after a start is a failure at start-up (a port taken, a bad key)."""
MAX_STARTUP_FAILURES = 5


@dataclass(frozen=True)
class PairPorts:
    frontend: tuple[int, int] = DEFAULT_PORTS["frontend"]
    state: tuple[int, int] = DEFAULT_PORTS["state"]
    monitor: tuple[int, int] = DEFAULT_PORTS["monitor"]


def broker_args(role: str, host: str, ports: PairPorts) -> list[str]:
    """The `zrpc broker` arguments for one side of a pair on `host`."""
    me, peer = (0, 1) if role == "primary" else (1, 0)
    return ["--role", role,
            "--frontend", f"tcp://{host}:{ports.frontend[me]}",
            "--state", f"tcp://{host}:{ports.state[me]}",
            "--peer-state", f"tcp://{host}:{ports.state[peer]}",
            "--monitor", f"tcp://{host}:{ports.monitor[me]}"]


def check_free(host: str, ports: Sequence[int]) -> None:
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise OSError(f"cannot use host {host!r}: {exc.strerror}") from None
    twice = sorted({p for p in ports if list(ports).count(p) > 1})
    if twice:
        raise OSError(f"port {', '.join(map(str, twice))} is given to more than one socket of the "
                      "pair (--frontend-ports, --state-ports and --monitor-ports need six different ports)")
    for port in ports:
        if not port_free(host, port):
            raise OSError(f"port {port} on {host} is in use or cannot be bound (another pair "
                          "running? see `zrpc status`, or choose other ports)")


class Restarts:
    """One broker's restart policy, fed with times (so it is tested without waiting)."""

    def __init__(self) -> None:
        self.count = 0  # restarts so far
        self.failures = 0  # start-up failures in a row
        self._delay = BACKOFF_FIRST
        self._started = 0.0

    def started(self, now: float) -> None:
        self._started = now

    def exited(self, now: float) -> float | None:
        """Seconds to wait before the next start, or None: give up (it keeps failing at
        start-up, so restarting cannot help)."""
        up = now - self._started
        if up >= STABLE_AFTER:
            self._delay = BACKOFF_FIRST
        self.failures = self.failures + 1 if up < STARTUP_WINDOW else 0
        if self.failures >= MAX_STARTUP_FAILURES:
            return None
        delay = self._delay
        self._delay = min(self._delay * 2, BACKOFF_MAX)
        return delay


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def say(label: str, text: str) -> None:
    """One line of a supervisor's own on stderr, beside its children's logs: `LABEL: text`."""
    click.echo(f"{label}: {text}", err=True)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event SIGTERM and Ctrl-C set (instead of ending the process at once), so a supervisor
    stops its children before it exits; the old handlers are back afterwards."""
    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_pair(host: str, ports: PairPorts, extra: Sequence[str], restart: bool) -> int:
    """Runs both brokers until SIGTERM or Ctrl-C. Non-zero when it had to stop because a broker
    died (`--no-restart`) or could not be started again."""
    check_free(host, [*ports.frontend, *ports.state, *ports.monitor])

    def started(children: Mapping[str, subprocess.Popen[bytes]]) -> None:
        eps = ",".join(f"tcp://{host}:{p}" for p in ports.frontend)
        say("pair", f"primary tcp://{host}:{ports.frontend[0]} (pid {children['primary'].pid}), "
                    f"backup tcp://{host}:{ports.frontend[1]} (pid {children['backup'].pid})")
        say("pair", f"clients and workers use ZRPC_BROKERS={eps} (the default); Ctrl-C stops both")

    with stop_on_signals() as stop, Processes() as procs:
        return supervise(procs, "pair", ROLES, lambda role: [*broker_args(role, host, ports), *extra],
                         restart, stop, started)


def supervise(procs: Processes, label: str, names: Sequence[str], argv: Callable[[str], list[str]],
              restart: bool, stop: threading.Event,
              started: Callable[[Mapping[str, subprocess.Popen[bytes]]], None] | None = None,
              failed: Callable[[], str | None] | None = None) -> int:
    """Runs `zrpc broker ARGV(name)` for every name until `stop` is set, each restarted under
    its own Restarts when it dies (with `--restarts N`, and a RESTART_MARK line), then stops
    them in turn. `started` sees the children once all run; `failed`, asked every tick, names
    a reason to stop (something they need has gone). Non-zero when it stopped for a death under
    `--no-restart`, for every child given up, or for `failed`."""
    policy = {name: Restarts() for name in names}
    children: dict[str, subprocess.Popen[bytes]] = {}
    due: dict[str, float] = {}  # name -> when to start it again
    given_up: set[str] = set()
    code = 0

    def start(name: str) -> None:
        args = list(argv(name))
        if policy[name].count:
            args += ["--restarts", str(policy[name].count)]
        children[name] = procs.zrpc("broker", *args, inherit=True, die_with_parent=True)
        policy[name].started(time.monotonic())

    for name in names:
        start(name)
    if started is not None:
        started(children)
    while not stop.wait(0.2):
        now = time.monotonic()
        for name in names:
            proc = children.get(name)
            rc = proc.poll() if proc is not None else None
            if rc is None:
                continue
            del children[name]
            if not restart:
                say(label, f"{name} exited ({describe_exit(rc)}); stopping (--no-restart)")
                code = 1
                stop.set()
                break
            delay = policy[name].exited(now)
            if delay is None:
                say(label, f"{name} failed at start-up {policy[name].failures} times in a row (last: "
                           f"{describe_exit(rc)}); not restarting it: see its log lines above")
                given_up.add(name)
                continue
            say(label, f"{name} exited ({describe_exit(rc)}): {RESTART_MARK} in {delay:g}s "
                       f"(restart {policy[name].count + 1})")
            due[name] = now + delay
        if len(given_up) == len(names):
            say(label, "no broker left to run; stopping")
            code = 1
            stop.set()
        reason = None if stop.is_set() or failed is None else failed()
        if reason is not None:
            say(label, reason)
            code = 1
            stop.set()
        for name, at in list(due.items()):
            if stop.is_set():
                break
            if now >= at:
                del due[name]
                policy[name].count += 1
                start(name)
                say(label, f"{name} restarted (pid {children[name].pid}, restarts {policy[name].count})")
    say(label, "stopping")
    for proc in children.values():
        procs.terminate(proc, timeout=5)
    return code
