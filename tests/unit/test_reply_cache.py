from zrpc._reply_cache import DONE, NEW, RUNNING, ReplyCache
from zrpc.testing import FakeClock


def test_first_run_then_duplicate_waits_then_cached():
    c = ReplyCache(FakeClock())
    assert c.begin("k", 0) == (NEW, None)
    state, _ = c.begin("k", 1)  # a retry through the other broker while it runs
    assert state == RUNNING
    assert c.finish("k", 0, b"result") == [0, 1]
    state, e = c.begin("k", 0)
    assert state == DONE and (e.status, e.body) == (0, b"result")
    assert c.hits == 2


def test_bounded_by_entries_but_never_evicts_running_calls():
    c = ReplyCache(FakeClock(), max_entries=3)
    c.begin("running", 0)
    for i in range(10):
        c.begin(i, 0)
        c.finish(i, 0, b"x")
    assert len(c) <= 4
    assert c.begin("running", 0)[0] == RUNNING


def test_bounded_by_bytes_and_age():
    clock = FakeClock()
    c = ReplyCache(clock, max_bytes=100, max_age=10)
    for i in range(5):
        c.begin(i, 0)
        c.finish(i, 0, b"x" * 40)
    assert c.nbytes <= 100
    clock.advance(11)
    c.begin("new", 0)
    assert len(c) == 1


def test_finish_twice_is_ignored():
    c = ReplyCache(FakeClock())
    c.begin("k", 0)
    assert c.finish("k", 0, b"a") == [0]
    assert c.finish("k", 0, b"b") == []
