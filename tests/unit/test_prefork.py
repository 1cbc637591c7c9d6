"""The prefork supervisor's decisions (`zrpc worker --processes N`): all N start at once, one that
dies is restarted after `zrpc pair`'s backoff with its own count, one that keeps failing at
start-up is given up, and a child hears copies of one stop signal as one stop."""

from __future__ import annotations

import pytest

from zrpc._tools._pair import MAX_STARTUP_FAILURES
from zrpc._tools._prefork import MAX_PROCESSES, SAME_STOP, Plan, Prefork, _Stops, threads_here
from zrpc._tools._procs import RESTART_MARK
from zrpc.testing import FakeClock


def test_every_process_starts_at_once_with_no_restarts():
    plan = Plan(3)
    assert plan.start_now(0.0) == [(0, 0), (1, 0), (2, 0)]
    assert plan.start_now(100.0) == []  # all running: nothing more to start
    assert not plan.lost


def test_a_dead_process_is_restarted_after_the_backoff_with_its_count():
    plan = Plan(3)
    plan.start_now(0.0)
    line = plan.exited(1, -9, 10.0)
    assert line == f"process 1 exited (killed by SIGKILL): {RESTART_MARK} in 1s (restart 1)"
    assert plan.start_now(10.5) == []  # not before its backoff
    assert plan.start_now(11.0) == [(1, 1)]  # ZRPC_PREFORK=1:1
    assert "in 2s (restart 2)" in plan.exited(1, 1, 20.0)  # crashed again soon: twice as long
    assert plan.start_now(22.0) == [(1, 2)]


def test_each_process_has_its_own_backoff_and_count():
    plan = Plan(2)
    plan.start_now(0.0)
    plan.exited(0, 1, 10.0)
    plan.start_now(11.0)
    plan.exited(0, 1, 20.0)
    assert "in 1s (restart 1)" in plan.exited(1, -15, 20.0)  # the other one's first restart
    assert plan.start_now(21.0) == [(1, 1)]
    assert plan.start_now(22.0) == [(0, 2)]


def test_a_minute_up_resets_the_backoff():
    plan = Plan(1)
    plan.start_now(0.0)
    plan.exited(0, 1, 10.0)
    plan.start_now(11.0)
    plan.exited(0, 1, 20.0)
    plan.start_now(22.0)
    assert "in 1s (restart 3)" in plan.exited(0, 1, 22.0 + 61)


def test_a_process_failing_at_start_up_is_given_up():
    plan = Plan(2)
    now = 0.0
    plan.start_now(now)
    for n in range(1, MAX_STARTUP_FAILURES):
        line = plan.exited(0, 78, now + 0.1)
        assert RESTART_MARK in line and f"(restart {n})" in line
        now = min(plan.due.values())
        assert plan.start_now(now) == [(0, n)]
    line = plan.exited(0, 78, now + 0.1)
    assert line == (f"process 0 failed at start-up {MAX_STARTUP_FAILURES} times in a row (last: "
                    "exit code 78); not restarting it: see its log lines above")
    assert plan.start_now(now + 1000) == [] and plan.given_up == {0}
    assert not plan.lost  # process 1 still serves
    plan.exited(1, 1, now + 1.0)  # 1 s up: a failure at start-up too, but its first
    assert not plan.lost


def test_lost_once_every_process_is_given_up():
    plan = Plan(1)
    now = 0.0
    plan.start_now(now)
    for _ in range(MAX_STARTUP_FAILURES):
        plan.exited(0, 1, now)
        if plan.due:
            now = plan.due[0]
            plan.start_now(now)
    assert plan.lost


class FakeWorker:
    def __init__(self) -> None:
        self.stops = 0

    def run(self) -> None:
        raise AssertionError("not run here")

    def stop(self, *, drain: bool = True) -> None:
        self.stops += 1


def test_copies_of_one_stop_signal_are_one_stop():
    clock = FakeClock()
    stops, worker = _Stops(clock), FakeWorker()
    stops.worker = worker
    stops.heard(15, None)
    clock.advance(SAME_STOP / 10)
    stops.heard(2, None)  # the terminal's SIGINT and the parent's SIGTERM: one request
    assert worker.stops == 1
    clock.advance(SAME_STOP)
    stops.heard(15, None)  # later: a second request, which the worker takes as "at once"
    assert worker.stops == 2


def test_a_stop_before_the_worker_exists_is_kept():
    stops = _Stops(FakeClock())
    stops.heard(15, None)
    assert stops.pending


@pytest.mark.parametrize("n", [0, MAX_PROCESSES + 1])
def test_the_number_of_processes_is_bounded(n):
    with pytest.raises(ValueError, match="between 1 and"):
        Prefork(n, FakeWorker)


def test_threads_here_counts_this_thread():
    assert threads_here() >= 1
