"""Child zrpc processes (brokers, workers) for `zrpc demo`, `zrpc pair` and tests: started in
their own process group, and always killed, even when the parent fails.

They also keep a record of what each child was asked to do, so that a crash cannot hide: a
child that exits when nobody asked it to, a broker that `zrpc pair` had to restart, or a log
that shows a traceback or an internal error is a problem `problems()` reports (tests fail on
it, the demo exits non-zero). Supervision heals crashes in production; it never hides them.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from zrpc import _defaults as D
from zrpc._io._internal import MARK as INTERNAL_ERROR

TRACEBACK = "Traceback (most recent call last)"
RESTART_MARK = "restarting it"
"""`zrpc pair` (and `zrpc cluster`) prints a line with it for every restart of a broker (`pair: primary exited
(-9): restarting it in 1s (restart 1)`)."""
LOG_MARKS = (TRACEBACK, INTERNAL_ERROR, RESTART_MARK)
"""A log line holding one of these is a problem unless the test declared it."""
TAIL_LINES = 30
EXIT_SIGNALS = frozenset({signal.SIGTERM, signal.SIGKILL, signal.SIGINT})
"""Signals that ask a process to end: sending one makes its exit expected."""


_HANDED_OUT: set[int] = set()
_PICK = random.Random()
LISTEN_PORTS_FROM = 20000
"""Ports for tests and local pairs come from here up to the kernel's ephemeral range."""


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems: the check in free_port still applies


def free_port() -> int:
    """A loopback port nothing uses, and one this process has not handed out before.

    It comes from below the kernel's ephemeral range: there, a port the kernel gives to an
    outgoing connection (a worker dialling a broker) can never take a port that a broker
    about to start was promised; and two calls in a row never return the same number (the
    kernel may give a just-closed port out again at once).
    """
    top = _ephemeral_start()
    for _ in range(1000):
        if top - LISTEN_PORTS_FROM >= 1000:
            port = _PICK.randrange(LISTEN_PORTS_FROM, top)
        else:  # a wide ephemeral range leaves no room below it: let the kernel choose
            with socket.socket() as s:
                s.bind((D.LOCAL_HOST, 0))
                port = int(s.getsockname()[1])
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((D.LOCAL_HOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise OSError("no free loopback port left that this process has not handed out already")


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("terminated")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux/glibc: the supervisor's own cleanup is all there is


def port_free(host: str, port: int) -> bool:
    """Whether a broker could bind it (SO_REUSEADDR as libzmq sets it: TIME_WAIT is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.02,
               what: str = "condition") -> object:
    """Polls `pred` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:g}s")
        time.sleep(interval)  # noqa: sleep (polling with a deadline)


def tail(path: Path | None, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' when there is none)."""
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def marked_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, mark, line) for every line of a log that holds one of LOG_MARKS."""
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            for mark in LOG_MARKS:
                if mark in line:
                    yield n, mark, line.rstrip("\n")
                    break


class ProcessError(AssertionError):
    """A child process did something no test asked for (died, was restarted, logged a
    traceback or an internal error)."""


@dataclass
class Child:
    """What we know about one child: its log, and whether its end was asked for."""

    proc: subprocess.Popen[bytes]
    name: str
    argv: list[str]
    log: Path | None
    exit_expected: bool = False
    allowed: dict[str, int] = field(default_factory=dict)  # log mark -> lines tolerated (-1: any)

    def describe(self) -> str:
        code = self.proc.poll()
        status = "running" if code is None else f"exit code {code}"
        return f"{self.name} (pid {self.proc.pid}, {status}): {' '.join(self.argv[2:])}"


class Processes:
    """Starts `python -m zrpc ...` children, stops every one on close(), and reports any child
    that ended unasked or logged a problem (`problems()`, `check()`)."""

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None):
        """Children run in `cwd` (default: ours) with our environment plus `env`."""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.children: list[Child] = []
        self.log_dir = Path(log_dir) if log_dir else None
        self.cwd = None if cwd is None else str(cwd)
        self.env = {**os.environ, **(env or {})}
        self.env.pop("ZRPC_BROKERS", None)
        self.env.pop("ZRPC_CLUSTER", None)
        self._names: set[str] = set()

    # --- starting ------------------------------------------------------------------------

    def zrpc(self, *args: str, name: str | None = None, env: dict[str, str] | None = None,
             inherit: bool = False, die_with_parent: bool = False) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, "-m", "zrpc", *args], name=name, env=env, inherit=inherit,
                          die_with_parent=die_with_parent)

    def spawn(self, argv: Sequence[str], name: str | None = None, env: dict[str, str] | None = None,
              inherit: bool = False, die_with_parent: bool = False) -> subprocess.Popen[bytes]:
        """Output goes to LOG_DIR/NAME.log, to our own stdout/stderr (`inherit`), or nowhere.
        Each child gets a log of its own: a second NAME becomes NAME-2. With `die_with_parent`
        (Linux; call it from the main thread) the child gets SIGTERM when this process dies,
        even by SIGKILL: a supervisor killed outright leaves no broker behind."""
        label = self._unique(name or f"p{len(self.procs)}")
        out: IO[bytes] | int | None = None if inherit else subprocess.DEVNULL
        log: Path | None = None
        if self.log_dir is not None and not inherit:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / f"{label}.log"
            out = open(log, "ab")
        try:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                                    env={**self.env, **(env or {})}, start_new_session=True,
                                    preexec_fn=_die_with_parent if die_with_parent else None)
        finally:
            if not isinstance(out, int) and out is not None:
                out.close()
        self.procs.append(proc)
        self.children.append(Child(proc, label, list(argv), log))
        return proc

    def run(self, *args: str, timeout: float = 30.0, name: str | None = None,
            env: dict[str, str] | None = None) -> tuple[int, str]:
        """A short-lived `zrpc` command the caller waits for: (exit code, its output). Its exit
        is expected; what it logs is still checked."""
        proc = self.zrpc(*args, name=name, env=env)
        self.expect_exit(proc)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise
        return code, tail(self.child(proc).log, 10**9)

    def _unique(self, name: str) -> str:
        label, n = name, 1
        while label in self._names:
            n += 1
            label = f"{name}-{n}"
        self._names.add(label)
        return label

    def child(self, proc: subprocess.Popen[bytes]) -> Child:
        for c in self.children:
            if c.proc is proc:
                return c
        raise KeyError(f"pid {proc.pid} was not started here")

    # --- what the caller says it expects ---------------------------------------------------

    def expect_exit(self, proc: subprocess.Popen[bytes]) -> None:
        """This child is meant to end (a test kills it, or waits for a command to finish)."""
        self.child(proc).exit_expected = True

    def expect_in_log(self, proc: subprocess.Popen[bytes], mark: str, times: int = -1) -> None:
        """This child's log may hold `mark` (one of LOG_MARKS) on up to `times` lines (-1: any
        number), e.g. a `zrpc pair` whose broker the test kills logs one restart."""
        self.child(proc).allowed[mark] = times

    # --- signals ---------------------------------------------------------------------------

    def signal(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        """Sends `sig`; SIGTERM, SIGKILL and SIGINT make the child's exit expected."""
        if sig in EXIT_SIGNALS:
            self._expect(proc)
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _expect(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            self.expect_exit(proc)
        except KeyError:
            pass  # not one of ours: nothing to record

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        self.signal(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            return None

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        self._expect(proc)
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process must die too
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    # --- checking ----------------------------------------------------------------------------

    def _report(self, child: Child | None, what: str, log: Path | None) -> str:
        head = f"{child.describe()}\n  {what}" if child is not None else what
        text = tail(log)
        if text:
            head += f"\n  last {TAIL_LINES} lines of {log}:\n" + "\n".join(f"    | {t}" for t in text.splitlines())
        return head

    def exit_problems(self, children: Sequence[Child] | None = None) -> list[str]:
        """Every child (of `children`, default all) that has ended without being asked to."""
        out = []
        for c in self.children if children is None else children:
            code = c.proc.poll()
            if code is not None and not c.exit_expected:
                out.append(self._report(c, f"exited unasked with code {code}", c.log))
        return out

    def log_problems(self) -> list[str]:
        """Every log in LOG_DIR (ours or not) with a traceback, an internal error or a restart
        that its child was not declared to log."""
        if self.log_dir is None or not self.log_dir.is_dir():
            return []
        by_log = {c.log: c for c in self.children if c.log is not None}
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            child = by_log.get(log)
            allowed = dict(child.allowed) if child is not None else {}
            seen: dict[str, int] = {}
            bad: list[str] = []
            for n, mark, line in marked_lines(log):
                seen[mark] = seen.get(mark, 0) + 1
                limit = allowed.get(mark, 0)
                if limit < 0 or seen[mark] <= limit:
                    continue
                bad.append(f"line {n}: {line.strip()[:300]}")
            if bad:
                what = f"its log {log.name} shows {len(bad)} problem line(s), first: {bad[0]}"
                out.append(self._report(child, what, log) if child is not None
                           else self._report(None, f"{log}: {what}", log))
        return out

    def problems(self) -> list[str]:
        return self.exit_problems() + self.log_problems()

    def check(self) -> None:
        """Raises ProcessError describing every problem (exits first, then logs)."""
        found = self.problems()
        if found:
            raise ProcessError(f"{len(found)} child process problem(s):\n\n" + "\n\n".join(found))

    def assert_running(self, *procs: subprocess.Popen[bytes]) -> None:
        """Fails at once, with the log tail, if any of `procs` (default: every child) has ended
        unasked: a wait on a dead broker says so instead of timing out."""
        children = [self.child(p) for p in procs] if procs else self.children
        found = self.exit_problems(children)
        if found:
            raise ProcessError("\n\n".join(found))

    # --- ending ------------------------------------------------------------------------------

    def close(self, grace: float = 2.0) -> None:
        """Asks every child still running to stop (SIGTERM, so a supervisor stops its own
        children and shutdown paths run), then kills what is left after `grace` seconds."""
        alive = [p for p in self.procs if p.poll() is None]
        for p in alive:
            self._expect(p)
            for sig in (signal.SIGCONT, signal.SIGTERM):  # a stopped process must hear it
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(p)
        self.procs.clear()

    def __enter__(self) -> Processes:
        # SIGTERM would end this process without unwinding, leaving the children (in their
        # own sessions) running: turn it into an exception so close() runs
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _terminated)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
