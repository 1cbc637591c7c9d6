"""Prefork workers (`zrpc worker --processes N`): N worker processes forked from one that imported
the services, each restarted with backoff when it dies, all drained together on SIGTERM.

The fork happens before any socket, zmq context or thread exists: the parent only imports the
services and supervises; each child builds its own Worker (context, sockets, handler threads)
and runs it. A child carries ZRPC_PREFORK=INDEX:RESTARTS, which its READY tells the brokers, so
a restarted process is seen as one. Supervision heals a crash but never hides it: every restart
prints a line with RESTART_MARK (`worker: process 1 exited (killed by SIGKILL): restarting it in
1s (restart 1)`), under the backoff `zrpc pair` uses (Restarts); a process that fails at start-up
five times in a row is left down with the reason printed.

Signals: the first SIGTERM or SIGINT is passed to every child, which drains its calls, and the
parent waits for them (at most the drain timeout plus STOP_GRACE); a second one kills them at
once. A child hears one stop however many copies reach it within SAME_STOP (Ctrl-C reaches
the whole process group and the parent passes it on too; systemd signals every process of a
unit): only a later signal means "at once". A parent that dies, even by SIGKILL, takes its
children with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NoReturn, Protocol

import click

from zrpc._defaults import DRAIN_TIMEOUT
from zrpc._errors import ZrpcError
from zrpc._io._worker import PREFORK_ENV
from zrpc._tools._pair import Restarts, describe_exit, say
from zrpc._tools._procs import RESTART_MARK, _die_with_parent

DEFAULT_PROCESSES = 1
"""One process: the worker runs in the command's own process, with no supervisor (as before
--processes existed)."""
MAX_PROCESSES = 256
"""More processes than this on one machine is a mistake, not a deployment."""
STOP_GRACE = 5.0
"""Seconds past the workers' drain timeout the parent waits for its stopping children before it
kills them: time to close sockets and let the last replies leave."""
SAME_STOP = 0.5
"""Seconds within which further stop signals to a child are copies of the first (the terminal's
and the parent's; systemd's and the parent's), not a request to stop at once."""
TICK = 0.2
"""Seconds between the supervisor's looks at its children (exits, restarts due)."""
CONFIG_EXIT = 78
"""A child's exit code when its Worker could not be built (EX_CONFIG): the configuration is
wrong, not the process."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Servable(Protocol):
    """What a child runs: a Worker (abstract here, so tests can give the supervisor another)."""

    def run(self) -> None: ...

    def stop(self, *, drain: bool = True) -> None: ...


class Plan:
    """Which of the N processes to start when, and what to say when one exits: the supervisor's
    decisions, fed with times (so they are tested without forking or waiting)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.policy = [Restarts() for _ in range(n)]
        self.due: dict[int, float] = dict.fromkeys(range(n), 0.0)  # index -> when to start it
        self.given_up: set[int] = set()

    def start_now(self, now: float) -> list[tuple[int, int]]:
        """(index, restarts so far) of every process to start now; each counts as started."""
        out = []
        for index, at in sorted(self.due.items()):
            if now >= at:
                del self.due[index]
                self.policy[index].started(now)
                out.append((index, self.policy[index].count))
        return out

    def exited(self, index: int, code: int, now: float) -> str:
        """Process `index` ended unasked with `code` (negative: a signal): restart it after a
        backoff, or give up on it when it keeps failing at start-up. The line to print."""
        policy = self.policy[index]
        delay = policy.exited(now)
        if delay is None:
            self.given_up.add(index)
            return (f"process {index} failed at start-up {policy.failures} times in a row (last: "
                    f"{describe_exit(code)}); not restarting it: see its log lines above")
        policy.count += 1
        self.due[index] = now + delay
        return f"process {index} exited ({describe_exit(code)}): {RESTART_MARK} in {delay:g}s (restart {policy.count})"

    @property
    def lost(self) -> bool:
        """Every process was given up: nothing is left to serve."""
        return len(self.given_up) == self.n


def threads_here() -> int:
    """Threads of this process, native ones too (a C library's): only the forking one survives
    a fork, so any other is missing from the children."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


class Prefork:
    """Forks and supervises `n` children, each running the worker `make()` builds in it."""

    def __init__(self, n: int, make: Callable[[], Servable], label: str = "worker",
                 stop_timeout: float = DRAIN_TIMEOUT + STOP_GRACE) -> None:
        if not 1 <= n <= MAX_PROCESSES:
            raise ValueError(f"processes must be between 1 and {MAX_PROCESSES}")
        self.n = n
        self.label = label
        self.stop_timeout = stop_timeout
        self.plan = Plan(n)
        self._make = make
        self._pids: dict[int, int] = {}  # pid -> index
        self._signals = 0  # stop signals received
        self._wake = threading.Event()
        self._parent = os.getpid()

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Runs the children until SIGTERM or Ctrl-C: 0 once they all left (drained, or stopped
        at once by a second signal), 1 when they outlived the stop timeout or none was left to
        run. A worker that cannot be built (its configuration
        is wrong) raises ValueError with its reason before any other child is started;
        `on_ready` runs once the first child built its worker."""
        extra = threads_here() - 1
        if extra > 0:
            say(self.label, f"warning: {extra} thread(s) started while importing the services "
                            "will not exist in the worker processes (start them on first use instead)")
        with self._stop_signals():
            starts = self.plan.start_now(time.monotonic())
            self._first(*starts[0])
            if on_ready is not None:
                on_ready()
            for index, restarts in starts[1:]:
                if self._signals:
                    break
                self._fork(index, restarts)
            say(self.label, f"{len(self._pids)} processes serving (pids "
                            f"{', '.join(str(p) for p in self._pids)}); SIGTERM or Ctrl-C drains them all")
            return self._loop()

    # --- the parent ----------------------------------------------------------------------

    @contextmanager
    def _stop_signals(self) -> Iterator[None]:
        def heard(signum: int, frame: object) -> None:
            self._signals += 1
            self._wake.set()

        old = {sig: signal.signal(sig, heard) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _first(self, index: int, restarts: int) -> None:
        """Starts the first child and waits until it has built its worker: a configuration
        error is then one error here, not one per child."""
        r, w = os.pipe()
        try:
            self._fork(index, restarts, report=w)
        finally:
            os.close(w)
        said = b""
        try:
            while not self._signals:
                ready, _, _ = select.select([r], [], [], TICK)
                if not ready:
                    continue
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                said += chunk
        finally:
            os.close(r)
        if said.startswith(b"-"):  # it could not build its worker, and exits
            pid = next(p for p, i in self._pids.items() if i == index)
            os.waitpid(pid, 0)
            del self._pids[pid]
            raise ValueError(said[1:].decode("utf-8", "replace"))

    def _fork(self, index: int, restarts: int, report: int | None = None) -> int:
        for stream in (sys.stdout, sys.stderr):  # else what is buffered is printed twice
            stream.flush()
        # a stop signal between fork() and the child's own handlers must wait for those
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _child(index, restarts, self._make, report, self._parent, mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._pids[pid] = index
        return pid

    def _loop(self) -> int:
        code = 0
        stop_by: float | None = None
        told: set[int] = set()
        killed = False
        while True:
            now = time.monotonic()
            for pid, index in list(self._pids.items()):
                rc = _reaped(pid)
                if rc is None:
                    continue
                del self._pids[pid]
                if stop_by is None:
                    say(self.label, self.plan.exited(index, rc, now))
            if stop_by is None and (self._signals or self.plan.lost):
                if self.plan.lost:
                    say(self.label, "no process left to run; stopping")
                    code = 1
                else:
                    say(self.label, f"stopping: {len(self._pids)} processes finish their calls in flight "
                                    "(a second signal stops them at once)")
                stop_by = now + self.stop_timeout
            if stop_by is not None:
                if not self._pids:
                    break
                if not killed and (self._signals >= 2 or now >= stop_by):
                    if now >= stop_by:
                        say(self.label, f"{len(self._pids)} processes still running after "
                                        f"{self.stop_timeout:g}s: killing them")
                        code = 1
                    for pid in self._pids:
                        _send(pid, signal.SIGKILL)
                    killed = True
                for pid in self._pids.keys() - told:
                    _send(pid, signal.SIGTERM)
                    told.add(pid)
            else:
                for index, restarts in self.plan.start_now(now):
                    try:
                        pid = self._fork(index, restarts)
                    except OSError as exc:  # no memory or process left for now: try again later
                        say(self.label, f"cannot fork process {index}: {exc.strerror}")
                        say(self.label, self.plan.exited(index, 1, now))
                        continue
                    say(self.label, f"process {index} restarted (pid {pid}, restarts {restarts})")
            self._wake.wait(TICK)
            self._wake.clear()
        say(self.label, "stopped")
        return code


def _reaped(pid: int) -> int | None:
    """The exit code of a child that has ended (negative: killed by that signal), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 1  # reaped elsewhere: it is gone, how is unknown
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it has just exited: the next look reaps it


# --- the child --------------------------------------------------------------------------------


class _Stops:
    """A child's stop signals: copies of one within SAME_STOP are one stop; later ones are
    passed on (the worker's second stop is at once)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.worker: Servable | None = None
        self.pending = False  # a stop came before the worker was built
        self._clock = clock
        self._last: float | None = None

    def heard(self, signum: int, frame: object) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < SAME_STOP:
            return
        self._last = now
        if self.worker is None:
            self.pending = True
        else:
            self.worker.stop()


def _child(index: int, restarts: int, make: Callable[[], Servable], report: int | None, parent: int,
           mask: Iterable[int]) -> NoReturn:
    """The forked child: runs its worker, then leaves at once (never back into the parent's
    code: its click command, its atexit handlers)."""
    code = 1
    try:
        code = _serve(index, restarts, make, report, parent, mask)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a bug of ours: shown, and the process restarted
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001, S110 - leaving regardless
                pass
        os._exit(code)


def _serve(index: int, restarts: int, make: Callable[[], Servable], report: int | None, parent: int,
           mask: Iterable[int]) -> int:
    os.environ[PREFORK_ENV] = f"{index}:{restarts}"
    _die_with_parent()
    stops = _Stops()
    for sig in STOP_SIGNALS:
        signal.signal(sig, stops.heard)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if os.getppid() != parent:  # it died before PDEATHSIG was set: nobody to serve for
        return 0
    try:
        worker = make()
    except (ValueError, TypeError, OSError, ZrpcError) as exc:
        if os.environ.get("ZRPC_DEBUG"):
            traceback.print_exc()
        if report is not None:  # the parent says it, once
            _write_all(report, b"-" + str(exc).encode("utf-8", "replace"))
        else:
            click.echo(f"error: {exc}", err=True)
        return CONFIG_EXIT
    if report is not None:
        _write_all(report, b"+")
        os.close(report)
    if stops.pending:
        return 0
    stops.worker = worker
    failed: list[BaseException] = []

    def loop() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - shown here, and the exit code says so
            failed.append(exc)
            traceback.print_exc()

    # the loop runs on a thread of its own so that this, the main thread, keeps the signals
    # (and their SAME_STOP rule): a Worker run off the main thread installs no handlers
    thread = threading.Thread(target=loop, name="zrpc-worker")
    thread.start()
    while thread.is_alive():
        thread.join(TICK)
    return 1 if failed else 0


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
