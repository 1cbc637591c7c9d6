"""`zrpc pair`: a primary and a backup broker on this machine, as supervised children.

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
from collections.abc import Sequence
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


def run_pair(host: str, ports: PairPorts, extra: Sequence[str], restart: bool) -> int:
    """Runs both brokers until SIGTERM or Ctrl-C. Non-zero when it had to stop because a broker
    died (`--no-restart`) or could not be started again."""
    check_free(host, [*ports.frontend, *ports.state, *ports.monitor])
    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(host, ports, extra, restart, stop)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _supervise(host: str, ports: PairPorts, extra: Sequence[str], restart: bool,
               stop: threading.Event) -> int:
    policy = {role: Restarts() for role in ROLES}
    children: dict[str, subprocess.Popen[bytes]] = {}
    due: dict[str, float] = {}  # role -> when to start it again
    given_up: set[str] = set()
    code = 0

    def say(text: str) -> None:
        click.echo(f"pair: {text}", err=True)

    with Processes() as procs:
        def start(role: str) -> None:
            argv = [*broker_args(role, host, ports), *extra]
            if policy[role].count:
                argv += ["--restarts", str(policy[role].count)]
            children[role] = procs.zrpc("broker", *argv, inherit=True, die_with_parent=True)
            policy[role].started(time.monotonic())

        for role in ROLES:
            start(role)
        eps = ",".join(f"tcp://{host}:{p}" for p in ports.frontend)
        say(f"primary tcp://{host}:{ports.frontend[0]} (pid {children['primary'].pid}), "
            f"backup tcp://{host}:{ports.frontend[1]} (pid {children['backup'].pid})")
        say(f"clients and workers use ZRPC_BROKERS={eps} (the default); Ctrl-C stops both")
        while not stop.wait(0.2):
            now = time.monotonic()
            for role in ROLES:
                proc = children.get(role)
                rc = proc.poll() if proc is not None else None
                if rc is None:
                    continue
                del children[role]
                if not restart:
                    say(f"{role} exited ({describe_exit(rc)}); stopping (--no-restart)")
                    code = 1
                    stop.set()
                    break
                delay = policy[role].exited(now)
                if delay is None:
                    say(f"{role} failed at start-up {policy[role].failures} times in a row (last: "
                        f"{describe_exit(rc)}); not restarting it: see its log lines above")
                    given_up.add(role)
                    continue
                say(f"{role} exited ({describe_exit(rc)}): {RESTART_MARK} in {delay:g}s "
                    f"(restart {policy[role].count + 1})")
                due[role] = now + delay
            if len(given_up) == len(ROLES):
                say("no broker left to run; stopping")
                code = 1
                stop.set()
            for role, at in list(due.items()):
                if stop.is_set():
                    break
                if now >= at:
                    del due[role]
                    policy[role].count += 1
                    start(role)
                    say(f"{role} restarted (pid {children[role].pid}, restarts {policy[role].count})")
        say("stopping")
        for proc in children.values():
            procs.terminate(proc, timeout=5)
    return code
