from hypothesis import given, settings
from hypothesis import strategies as st

from zrpc._core._reply_cache import DONE, NEW, RUNNING, UNKNOWN, ReplyCache
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


def test_probe_records_nothing_for_an_unknown_call():
    c = ReplyCache(FakeClock())
    assert c.probe("k", 0) == (NEW, None)
    assert len(c) == 0 and c.probe("k", 0) == (NEW, None)
    assert c.begin("k", 0) == (NEW, None)
    assert c.probe("k", 1)[0] == RUNNING
    assert c.finish("k", 0, b"r") == [0, 1]
    assert c.probe("k", 1)[0] == DONE


def test_entry_bound_keeps_exactly_the_newest_replies_and_every_running_call():
    c = ReplyCache(FakeClock(), max_entries=3)
    c.begin("running", 0)
    for i in range(10):
        c.begin(i, 0, idempotent=True)
        c.finish(i, 0, b"x%d" % i)
    assert len(c) == 4 and c.running == 1
    for i in range(7):
        assert c.probe(i, 0) == (NEW, None)  # idempotent: may go without a trace
    for i in range(7, 10):
        state, e = c.probe(i, 0)
        assert state == DONE and e.body == b"x%d" % i
    assert c.begin("running", 1)[0] == RUNNING
    assert c.finish("running", 0, b"r") == [0, 1]
    assert c.tombstones == 0


def test_non_idempotent_calls_evicted_for_room_leave_tombstones():
    c = ReplyCache(FakeClock(), max_entries=3)
    for i in range(10):
        c.begin(i, 0)  # not idempotent (the safe default)
        c.finish(i, 0, b"x")
    assert c.tombstones == 7 and len(c) == 3
    for i in range(7):
        assert c.probe(i, 0) == (UNKNOWN, None)
        assert c.begin(i, 0) == (UNKNOWN, None)  # a retry is never run again
    assert c.running == 0
    for i in range(7, 10):
        assert c.probe(i, 0)[0] == DONE


def test_byte_bound_keeps_exactly_what_fits():
    c = ReplyCache(FakeClock(), max_bytes=100)
    for i in range(5):
        c.begin(i, 0, idempotent=i % 2 == 0)
        c.finish(i, 0, b"x" * 40)
    assert c.nbytes == 80 and len(c) == 2
    assert [c.probe(i, 0)[0] for i in range(5)] == [NEW, UNKNOWN, NEW, DONE, DONE]
    c.begin("big", 0)
    c.finish("big", 0, b"y" * 101)  # larger than the whole budget: only its tombstone stays
    assert c.probe("big", 0)[0] == UNKNOWN
    assert c.nbytes == 80


def test_age_counts_from_the_finish_and_tombstones_outlive_the_reply():
    clock = FakeClock()
    c = ReplyCache(clock, max_age=120, retention=300)
    c.begin("long", 0)
    c.begin("long-idem", 0, idempotent=True)
    clock.advance(119)
    c.finish("long", 0, b"r")
    c.finish("long-idem", 0, b"r")
    clock.advance(119.9)
    assert c.probe("long", 0)[0] == DONE and c.probe("long-idem", 0)[0] == DONE
    clock.advance(0.1)  # 120 s after its finish: the reply goes
    assert c.probe("long-idem", 0) == (NEW, None)
    assert c.probe("long", 0) == (UNKNOWN, None)
    assert c.nbytes == 0 and c.tombstones == 1
    clock.advance(179.9)  # 299.9 s after the finish: still remembered
    assert c.probe("long", 0) == (UNKNOWN, None)
    clock.advance(0.1)
    assert c.probe("long", 0) == (NEW, None)
    assert c.tombstones == 0


def test_running_calls_are_never_evicted_by_age_bytes_or_count():
    clock = FakeClock()
    c = ReplyCache(clock, max_entries=1, max_bytes=10, max_age=1, retention=2)
    c.begin("r", "a")
    for i in range(20):
        clock.advance(5)
        c.begin(i, 0)
        c.finish(i, 0, b"z" * 20)
    assert c.probe("r", "b")[0] == RUNNING
    assert c.finish("r", 0, b"ok") == ["a", "b"]


def test_too_many_tombstones_make_probes_inconclusive_never_new():
    clock = FakeClock()
    c = ReplyCache(clock, max_entries=0, max_tombstones=2, retention=300)
    for i in range(3):
        c.begin(i, 0)
        c.finish(i, 0, b"x")
    assert c.tombstones == 2 and c.tombstones_dropped == 1
    assert c.probe(0, 0) == (UNKNOWN, None)  # its tombstone was dropped: cannot tell
    assert c.probe("never-seen", 0) == (UNKNOWN, None)  # nor for any other call
    assert c.begin("fresh", 0) == (NEW, None)  # a real dispatch still runs
    clock.advance(300)
    assert c.probe("never-seen", 0) == (NEW, None)
    assert c.tombstones == 0


def test_finish_twice_is_ignored():
    c = ReplyCache(FakeClock())
    c.begin("k", 0)
    assert c.finish("k", 0, b"a") == [0]
    assert c.finish("k", 0, b"b") == []
    assert c.begin("k", 0)[1].body == b"a"


def test_finish_of_an_unknown_call_is_ignored():
    c = ReplyCache(FakeClock())
    assert c.finish("k", 0, b"a") == []
    assert len(c) == 0 and c.probe("k", 0) == (NEW, None)


# --- properties -------------------------------------------------------------------------------

KEYS = 3

_op = st.one_of(
    st.tuples(st.just("begin"), st.integers(0, KEYS - 1)),
    st.tuples(st.just("probe"), st.integers(0, KEYS - 1)),
    st.tuples(st.just("finish"), st.integers(0, KEYS - 1), st.integers(0, 300)),
    st.tuples(st.just("advance"), st.one_of(st.floats(0, 10, allow_nan=False),
                                           st.floats(0, 500, allow_nan=False))),
)


@settings(max_examples=1500, deadline=None)
@given(
    max_entries=st.integers(0, 6),
    max_bytes=st.integers(0, 600),
    max_age=st.floats(0, 200, allow_nan=False),
    extra_retention=st.floats(0, 300, allow_nan=False),
    max_tombstones=st.integers(0, 4),
    idempotent=st.lists(st.booleans(), min_size=KEYS, max_size=KEYS),
    ops=st.lists(_op, max_size=80),
)
def test_a_call_that_finished_within_retention_is_never_new(
        max_entries, max_bytes, max_age, extra_retention, max_tombstones, idempotent, ops):
    clock = FakeClock()
    retention = max_age + extra_retention
    c = ReplyCache(clock, max_entries=max_entries, max_bytes=max_bytes, max_age=max_age,
                   retention=retention, max_tombstones=max_tombstones)
    running: set[int] = set()
    finished: dict[int, tuple[float, bytes]] = {}  # key -> (when, reply) of its latest run
    for op in ops:
        if op[0] == "advance":
            clock.advance(op[1])
            continue
        k = op[1]
        now = clock()
        remembered = (k in finished and not idempotent[k] and now - finished[k][0] < retention)
        if op[0] == "finish":
            waiters = c.finish(k, 0, b"r" * op[2])
            assert (waiters != []) == (k in running)
            if k in running:
                running.discard(k)
                finished[k] = (now, b"r" * op[2])
        else:
            state, e = (c.probe(k, "p") if op[0] == "probe" else
                        c.begin(k, "b", idempotent=idempotent[k]))
            if k in running:
                assert state == RUNNING
            elif remembered and (op[0] == "probe" or not c.tombstones_dropped):
                # a probe never says NEW for it; nor does a retry while no tombstone was
                # dropped for room (a real dispatch cannot be refused for that)
                assert state in (DONE, UNKNOWN), (k, state)
            if state == DONE:
                assert e is not None and e.body == finished[k][1]
            if state == NEW and op[0] == "begin":
                running.add(k)
        assert len(c) - c.running <= max_entries
        assert c.nbytes <= max_bytes
        assert c.tombstones <= max_tombstones
        assert c.running == len(running)
