"""A crash cannot hide: the process fixture fails a test whose child died unasked, was restarted
by `zrpc pair` or logged a traceback or an internal error; and `zrpc pair` itself restarts a
dead broker, says so, and starts it with the count its status then shows."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from tests import CHILD_ENV, REPO
from tests.conftest import Cluster, broker_status
from zrpc._io._internal import MARK
from zrpc._tools._procs import RESTART_MARK, TRACEBACK, ProcessError, Processes
from zrpc.testing import free_port, wait_until

pytest_plugins = ["pytester"]

PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def own(tmp_path):
    """A Processes of the test's own, checked by hand (the `procs` fixture would fail)."""
    p = Processes(log_dir=tmp_path / "own-logs", env=CHILD_ENV, cwd=REPO)
    yield p
    p.close(grace=0)


def test_a_child_that_crashes_unasked_is_reported_with_its_log(own):
    p = own.spawn([PY, "-c", "import sys; print('about to go'); sys.exit(3)"], name="crasher")
    p.wait(10)
    found = own.problems()
    assert len(found) == 1
    assert "crasher" in found[0] and "exited unasked with code 3" in found[0]
    assert "about to go" in found[0]  # the log's last lines come with it
    with pytest.raises(ProcessError, match="crasher"):
        own.check()


def test_children_the_test_ends_are_not_problems(own):
    killed = own.spawn(SLEEPER, name="killed")
    own.kill(killed)
    termed = own.spawn(SLEEPER, name="termed")
    own.terminate(termed)
    signalled = own.spawn(SLEEPER, name="signalled")
    own.signal(signalled, signal.SIGKILL)
    signalled.wait(10)
    declared = own.spawn([PY, "-c", "pass"], name="declared")
    own.expect_exit(declared)
    declared.wait(10)
    code, _ = own.run("--version", name="version")
    assert code == 0
    stopped = own.spawn(SLEEPER, name="stopped")
    own.signal(stopped, signal.SIGSTOP)  # a pause is not a request to end
    own.signal(stopped, signal.SIGCONT)
    assert own.problems() == []
    own.close(grace=5)  # what is still running is asked to end by close itself
    assert own.problems() == []


def test_a_child_that_dies_after_a_pause_signal_is_still_a_problem(own):
    p = own.spawn([PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], name="segv")
    own.signal(p, signal.SIGCONT)
    p.wait(10)
    assert "exited unasked with code -11" in own.problems()[0]


def test_a_log_with_a_traceback_is_a_problem_even_when_the_exit_was_expected(own):
    p = own.spawn([PY, "-c", "raise RuntimeError('boom')"], name="raiser")
    own.expect_exit(p)
    p.wait(10)
    found = own.problems()
    assert len(found) == 1 and "raiser" in found[0]
    assert TRACEBACK in found[0] and "RuntimeError: boom" in found[0]


def test_an_internal_error_line_is_a_problem(own):
    code = textwrap.dedent("""
        import logging
        from zrpc._io._internal import InternalErrors
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        errors = InternalErrors(logging.getLogger("x"), "a loop")
        for _ in range(2):
            with errors.contain("a message"):
                raise KeyError("bug")
        """)
    p = own.spawn([PY, "-c", code], name="buggy")
    own.expect_exit(p)
    assert p.wait(10) == 0  # contained: the process carried on and ended normally
    found = own.problems()
    assert len(found) == 1 and MARK in found[0] and "buggy" in found[0]


def test_marks_in_any_log_of_the_log_dir_count(own):
    own.log_dir.mkdir(parents=True, exist_ok=True)
    (own.log_dir / "written-by-hand.log").write_text(f"fine\n{MARK} in a loop: KeyError\n")
    (own.log_dir / "clean.log").write_text("all good\n")
    found = own.problems()
    assert len(found) == 1 and "written-by-hand.log" in found[0]


def test_a_restart_line_fails_unless_declared_and_only_as_often_as_declared(own):
    line = f"pair: primary exited (killed by SIGKILL): {RESTART_MARK} in 1s (restart %d)"
    p = own.spawn([PY, "-c", f"print({line!r} % 1, flush=True)"], name="pair")
    own.expect_exit(p)
    p.wait(10)
    assert RESTART_MARK in own.problems()[0]
    own.expect_in_log(p, RESTART_MARK, times=1)
    assert own.problems() == []
    q = own.spawn([PY, "-c", f"print({line!r} % 1); print({line!r} % 2)"], name="pair")
    own.expect_exit(q)
    own.expect_in_log(q, RESTART_MARK, times=1)
    q.wait(10)
    found = own.problems()
    assert len(found) == 1 and "pair-2" in found[0] and "restart 2" in found[0]


def test_cluster_waits_fail_at_once_when_the_broker_dies(own):
    """A broker that cannot start (its port is taken) is reported with its own words, not
    as a 15 s timeout waiting for it to answer."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ProcessError) as err:
            Cluster(own).broker(port=taken.getsockname()[1])
    assert "exited unasked with code 1" in str(err.value)
    assert "cannot bind" in str(err.value) and TRACEBACK not in str(err.value)


def test_the_procs_fixture_fails_the_test(pytester):
    """The fixture as tests use it: a crash fails the test, a kill does not."""
    pytester.makeconftest("from tests.conftest import procs  # noqa: F401\n")
    pytester.makepyfile(textwrap.dedent(f"""
        import signal, sys
        PY = sys.executable

        def test_crash(procs):
            procs.spawn([PY, "-c", "import sys; sys.exit(7)"], name="crasher").wait(10)

        def test_killed(procs):
            p = procs.spawn({SLEEPER!r}, name="victim")
            procs.signal(p, signal.SIGKILL)
            p.wait(10)

        def test_traceback(procs):
            p = procs.spawn([PY, "-c", "1/0"], name="raiser")
            procs.expect_exit(p)
            p.wait(10)

        def test_left_running(procs):
            procs.spawn({SLEEPER!r}, name="sleeper")
        """))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    out = result.stdout.str()
    assert "ERROR at teardown of test_crash" in out and "exited unasked with code 7" in out
    assert "ERROR at teardown of test_traceback" in out and "ZeroDivisionError" in out
    assert "test_killed" not in out.split("short test summary")[-1]


def _pair_ports() -> tuple[list[str], list[str]]:
    ports = [free_port() for _ in range(6)]
    return ["--frontend-ports", f"{ports[0]},{ports[1]}", "--state-ports", f"{ports[2]},{ports[3]}",
            "--monitor-ports", f"{ports[4]},{ports[5]}"], [f"tcp://127.0.0.1:{p}" for p in ports[:2]]


@pytest.mark.slow
def test_pair_restarts_a_killed_broker_and_reports_it(procs):
    args, eps = _pair_ports()
    pair = procs.zrpc("pair", *args, "--log-level", "debug", name="pair")
    cluster = Cluster(procs)
    cluster.wait(lambda: all(broker_status(ep) for ep in eps), 20, what="both brokers answering")
    first = broker_status(eps[0])
    assert first["broker"].get("restarts", 0) == 0

    procs.expect_in_log(pair, RESTART_MARK, times=1)  # the one restart this test causes
    os.kill(first["broker"]["pid"], signal.SIGKILL)
    again = cluster.wait(lambda: (lambda s: s if s and s["broker"]["pid"] != first["broker"]["pid"]
                                  else None)(broker_status(eps[0])), 20, what="the primary restarted")
    log = (procs.log_dir / "pair.log").read_text()
    assert "pair: primary exited (killed by SIGKILL): restarting it in 1s (restart 1)" in log
    assert f"pair: primary restarted (pid {again['broker']['pid']}, restarts 1)" in log
    assert again["broker"]["restarts"] == 1
    assert broker_status(eps[1])["broker"].get("restarts", 0) == 0  # the backup was not touched
    # the broker raised the alert (its log shows every alert it publishes, subscribers or not)
    wait_until(lambda: re.search(r"alert broker_restarted (raised|event)",
                                 (procs.log_dir / "pair.log").read_text()), 10,
               what="the broker_restarted alert")

    p = subprocess.run([sys.executable, "-m", "zrpc", "status", "--json", "--brokers", ",".join(eps)],
                       capture_output=True, text=True, timeout=30, cwd=REPO, env=procs.env)
    st = json.loads(p.stdout)
    assert [b.get("restarts") for b in st["brokers"]] == [1, 0]
    p = subprocess.run([sys.executable, "-m", "zrpc", "status", "--brokers", ",".join(eps)],
                       capture_output=True, text=True, timeout=30, cwd=REPO, env={**procs.env, "COLUMNS": "200"})
    assert "restarts" in p.stdout
    assert procs.terminate(pair) == 0
    wait_until(lambda: not broker_status(eps[0], timeout=0.2) and not broker_status(eps[1], timeout=0.2),
               10, what="the pair's brokers stopped with it")


def test_pair_refuses_a_key_file_its_brokers_could_not_read(procs, tmp_path):
    """Checked before any broker starts: no restart loop, one line."""
    args, _ = _pair_ports()
    secret = tmp_path / "nokey.key_secret"
    secret.write_text("not a key\n")
    (tmp_path / "auth").mkdir()
    code, out = procs.run("pair", *args, "--curve-secret", str(secret), "--curve-authorized",
                          str(tmp_path / "auth"), name="pair-bad-key")
    assert code != 0 and "not a zmq.auth key file" in out, out
    assert TRACEBACK not in out and RESTART_MARK not in out
