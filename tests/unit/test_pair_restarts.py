"""`zrpc pair`'s restart policy: back off 1 s doubling to 30 s, reset after a minute up, give
up on a broker that fails at start-up five times in a row; and the loop that applies it, to a
pair's two brokers or to any number of named children (`zrpc cluster`'s members)."""

from __future__ import annotations

import sys
import threading

import pytest

from zrpc._tools import _pair
from zrpc._tools._pair import (
    MAX_STARTUP_FAILURES,
    PairPorts,
    Restarts,
    describe_exit,
    run_pair,
    supervise,
)
from zrpc._tools._procs import RESTART_MARK, Processes
from zrpc.testing import free_port


def test_backoff_doubles_to_thirty_seconds_while_it_keeps_crashing():
    r, now, delays = Restarts(), 0.0, []
    for _ in range(8):
        r.started(now)
        now += 10.0  # up 10 s each time: a crash, not a failure at start-up
        delay = r.exited(now)
        assert delay is not None
        delays.append(delay)
        now += delay
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_minute_up_resets_the_backoff():
    r = Restarts()
    r.started(0.0)
    assert r.exited(10.0) == 1
    r.started(11.0)
    assert r.exited(20.0) == 2
    r.started(22.0)
    assert r.exited(22.0 + 60.0) == 1
    r.started(100.0)
    assert r.exited(110.0) == 2


def test_gives_up_after_five_failures_at_start_up_in_a_row():
    r, now = Restarts(), 0.0
    for i in range(MAX_STARTUP_FAILURES - 1):
        r.started(now)
        now += 0.3
        delay = r.exited(now)
        assert delay is not None, i
        now += delay
    r.started(now)
    assert r.exited(now + 0.3) is None
    assert r.failures == MAX_STARTUP_FAILURES


def test_a_run_past_start_up_clears_the_failures():
    r, now = Restarts(), 0.0
    for up in (0.2, 0.2, 0.2, 0.2, 30.0, 0.2, 0.2):
        r.started(now)
        now += up
        assert r.exited(now) is not None
        now += 1
    assert r.failures == 2


def test_exit_descriptions():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-200) == "killed by signal 200"


def test_the_pair_stops_restarting_brokers_that_cannot_start(monkeypatch, capfd):
    """The loop itself, with a 'broker' that fails at once: each failure is printed, the
    restarts carry --restarts N, and after five in a row the pair gives up and exits 1."""
    monkeypatch.setattr(_pair, "BACKOFF_FIRST", 0.01)
    started: list[list[str]] = []

    def fake_broker(self, *args, **kw):
        started.append(list(args))
        return self.spawn([sys.executable, "-c", "import sys; print('cannot bind'); sys.exit(1)"], **kw)

    monkeypatch.setattr(Processes, "zrpc", fake_broker)
    ports = PairPorts(*((free_port(), free_port()) for _ in range(3)))
    assert run_pair("127.0.0.1", ports, ["--log-level", "info"], restart=True) == 1
    err = capfd.readouterr().err
    for role in ("primary", "backup"):
        assert err.count(f"pair: {role} exited (exit code 1): {RESTART_MARK}") == MAX_STARTUP_FAILURES - 1
        assert f"pair: {role} failed at start-up {MAX_STARTUP_FAILURES} times in a row" in err
    assert "no broker left to run; stopping" in err
    counts = sorted(a[a.index("--restarts") + 1] for a in started if "--restarts" in a and "primary" in a)
    assert counts == ["1", "2", "3", "4"]
    assert len(started) == 2 * MAX_STARTUP_FAILURES


def test_no_restart_stops_the_pair_with_an_error(monkeypatch, capfd):
    def fake_broker(self, *args, **kw):
        return self.spawn([sys.executable, "-c", "import sys; sys.exit(2)"], **kw)

    monkeypatch.setattr(Processes, "zrpc", fake_broker)
    ports = PairPorts(*((free_port(), free_port()) for _ in range(3)))
    assert run_pair("127.0.0.1", ports, [], restart=False) == 1
    assert "exited (exit code 2); stopping (--no-restart)" in capfd.readouterr().err


def test_an_unknown_host_is_one_clear_error():
    with pytest.raises(OSError, match="cannot use host"):
        run_pair("no-such-host.invalid", PairPorts(), [], restart=True)


def test_free_ports_are_never_handed_out_twice():
    """A pair needs six ports at once: the kernel may hand a just-closed port out again."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_one_port_in_two_options_is_refused_before_any_broker_starts(capfd):
    p = [free_port() for _ in range(5)]
    ports = PairPorts(frontend=(p[0], p[1]), state=(p[2], p[3]), monitor=(p[3], p[4]))
    with pytest.raises(OSError, match=f"port {p[3]} is given to more than one socket"):
        run_pair("127.0.0.1", ports, [], restart=True)
    assert "pair: primary" not in capfd.readouterr().err


def test_the_loop_supervises_any_number_of_named_children(monkeypatch, capfd):
    """Three children: the one that dies is restarted (with --restarts 1, and the pair's line
    shape under the caller's label), the others are left running; a reason from `failed`
    stops them all with exit 1."""
    monkeypatch.setattr(_pair, "BACKOFF_FIRST", 0.01)
    started: list[list[str]] = []
    seen: dict[str, int] = {}

    def fake_broker(self, *args, **kw):
        assert args[0] == "broker"
        started.append(list(args[1:]))
        dies = args[1] == "b2" and "--restarts" not in args
        code = "import sys; sys.exit(3)" if dies else "import time; time.sleep(60)"  # noqa: sleep (a child that idles)
        return self.spawn([sys.executable, "-c", code], **kw)

    def failed() -> str | None:
        return "what they need has gone" if sum(a[0] == "b2" for a in started) == 2 else None

    monkeypatch.setattr(Processes, "zrpc", fake_broker)
    with Processes() as procs:
        code = supervise(procs, "group", ["b1", "b2", "b3"], lambda name: [name, "--x"], True,
                         threading.Event(), lambda children: seen.update((n, p.pid) for n, p in children.items()),
                         failed)
        assert all(p.poll() is not None for p in procs.procs)  # stopped on the way out
    assert code == 1
    assert sorted(seen) == ["b1", "b2", "b3"]
    assert started[:3] == [["b1", "--x"], ["b2", "--x"], ["b3", "--x"]]
    assert started[3:] == [["b2", "--x", "--restarts", "1"]]
    err = capfd.readouterr().err
    assert f"group: b2 exited (exit code 3): {RESTART_MARK} in 0.01s (restart 1)" in err
    assert "group: b2 restarted (pid " in err and ", restarts 1)" in err
    assert err.index("group: what they need has gone") < err.index("group: stopping")
    assert "b1 exited" not in err and "b3 exited" not in err
