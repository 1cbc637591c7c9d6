"""The client's session in cluster mode (spread) on a fake clock: two choices over a changing
set of brokers, re-sending what a silent or departed broker held, and never losing a call.

The model test drives the real Session through joins, leaves, silences, replies and time, and
checks after every step that each call in flight is either on a live broker the session may
use, or parked because none is; that the per-broker load it balances on is exact; and that a
call is answered at most once."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zrpc._core._frames import CLIENT, H_RESENT, NO_WORKER, ClientReply, Heartbeat, Status, decode_frames
from zrpc._core._serial import pack_error
from zrpc._core._session import Completed, Expired, Session, Transmit
from zrpc.testing import FakeClock

NO_WORKER_BODY = pack_error("ServiceUnavailable", f"{NO_WORKER} 'only'")


class F:
    def done(self) -> bool:
        return False


def make(brokers: int = 3, seed: int = 1) -> tuple[Session, FakeClock]:
    clock = FakeClock()
    return Session(clock, brokers, timeout=5.0, interval=0.25, liveness=3, spread=True,
                   rng=random.Random(seed)), clock


def sent(outputs: list) -> list[Transmit]:
    return [o for o in outputs if isinstance(o, Transmit) and decode_frames(o.frames).__class__.__name__
            == "ClientRequest"]


def test_calls_spread_over_every_broker_by_two_choices():
    s, _ = make(3)
    counts: Counter[int] = Counter()
    for _ in range(300):
        (t,) = s.submit(s.table.prepare("calc", "add", (1, 2), {}, F()))
        counts[t.broker] += 1
    assert set(counts) == {0, 1, 2}
    assert max(counts.values()) - min(counts.values()) <= 2  # nobody answers: loads stay level
    assert s.load == [counts[0], counts[1], counts[2]]


def test_the_lighter_broker_gets_the_next_call():
    s, _ = make(2)
    first = [s.submit(s.table.prepare("calc", "add", (), {}, F()))[0] for _ in range(4)]
    for t in first:  # broker 0's calls are all answered: it carries nothing now
        if t.broker == 0:
            s.received(0, ClientReply(decode_frames(t.frames).request_id, Status.OK, b"\x01"))
    assert s.load[0] == 0 and s.load[1] > 0
    (t,) = s.submit(s.table.prepare("calc", "add", (), {}, F()))
    assert t.broker == 0


def test_a_silent_broker_s_calls_move_to_another_marked_resent():
    s, clock = make(2)
    calls = [s.table.prepare("calc", "add", (), {}, F()) for _ in range(6)]
    on = {c.request_id: s.submit(c)[0].broker for c in calls}
    for _ in range(10):  # broker 1 heartbeats, broker 0 says nothing
        clock.advance(0.2)
        s.received(1, Heartbeat(CLIENT, {"state": "active"}))
        out = s.tick()
        if s.lost[0]:
            break
    assert s.lost[0]
    moved = sent(out)
    assert {t.broker for t in moved} == {1}
    assert len(moved) == sum(1 for b in on.values() if b == 0)
    assert all(decode_frames(t.frames).headers.get(H_RESENT) is True for t in moved)
    assert s.load == [0, 6]
    (t,) = s.submit(s.table.prepare("calc", "add", (), {}, F()))  # new calls avoid it
    assert t.broker == 1


def test_a_broker_that_leaves_hands_its_calls_to_the_others_and_is_never_used_again():
    s, _ = make(3)
    calls = [s.table.prepare("calc", "add", (), {}, F()) for _ in range(9)]
    for c in calls:
        s.submit(c)
    held = [c for c in calls if c.broker == 2]
    out = s.remove_broker(2)
    assert len(sent(out)) == len(held) and {t.broker for t in sent(out)} <= {0, 1}
    assert s.load[2] == 0 and sum(s.load) == 9
    for _ in range(50):
        (t,) = s.submit(s.table.prepare("calc", "add", (), {}, F()))
        assert t.broker != 2
    late = ClientReply(held[0].request_id, Status.OK, b"\x01") if held else None
    if late is not None:  # its late reply is ignored: the call was re-sent elsewhere
        assert s.received(2, late) == []


def test_calls_wait_for_a_broker_and_go_when_one_joins():
    s, clock = make(0)
    call = s.table.prepare("calc", "add", (), {}, F())
    assert s.submit(call) == []
    assert s.tick() == [] or not sent(s.tick())
    b = s.add_broker()
    (t,) = sent(s.tick())
    assert t.broker == b and call.broker == b


def test_a_parked_call_still_expires_at_its_deadline():
    s, clock = make(0)
    call = s.table.prepare("calc", "add", (), {}, F(), timeout=0.5)
    s.submit(call)
    clock.advance(0.6)
    assert [o.call for o in s.tick() if isinstance(o, Expired)] == [call]
    s.add_broker()
    assert sent(s.tick()) == []  # it is gone: nothing is sent for it


def test_not_active_moves_the_call_to_another_broker_at_once():
    s, _ = make(2)
    call = s.table.prepare("calc", "add", (), {}, F())
    (t,) = s.submit(call)
    out = s.received(t.broker, ClientReply(call.request_id, Status.NOT_ACTIVE, b""))
    (again,) = sent(out)
    assert again.broker == 1 - t.broker
    assert s.load[t.broker] == 0 and s.load[again.broker] == 1


# --- the model --------------------------------------------------------------------------


class SpreadModel(RuleBasedStateMachine):
    """Joins, leaves, silences and replies in any order: no call is lost or answered twice."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.s = Session(self.clock, 0, timeout=3.0, interval=0.25, liveness=3, spread=True,
                         rng=random.Random(7))
        self.quiet: set[int] = set()  # brokers that stopped talking
        self.calls: dict[int, object] = {}
        self.answered: Counter[int] = Counter()
        self.expired: set[int] = set()

    def _apply(self, outputs: list) -> None:
        for o in outputs:
            if isinstance(o, Completed):
                self.answered[o.call.request_id] += 1
            elif isinstance(o, Expired):
                self.expired.add(o.call.request_id)

    @rule()
    def join(self) -> None:
        self.s.add_broker()

    @precondition(lambda self: self.s.brokers > 0)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        b = data.draw(st.integers(0, self.s.brokers - 1))
        self._apply(self.s.remove_broker(b))

    @precondition(lambda self: self.s.brokers > 0)
    @rule(data=st.data(), quiet=st.booleans())
    def hush(self, data: st.DataObject, quiet: bool) -> None:
        b = data.draw(st.integers(0, self.s.brokers - 1))
        (self.quiet.add if quiet else self.quiet.discard)(b)

    @rule()
    def call(self) -> None:
        c = self.s.table.prepare("calc", "add", (), {}, F())
        self.calls[c.request_id] = c
        self._apply(self.s.submit(c))

    @rule(data=st.data(), status=st.sampled_from([Status.OK, Status.NOT_ACTIVE]))
    def reply(self, data: st.DataObject, status: int) -> None:
        held = [c for c in self.s.table if c.broker >= 0 and c.broker not in self.quiet]
        if held:
            c = data.draw(st.sampled_from(held))
            self._apply(self.s.received(c.broker, ClientReply(c.request_id, status, b"\x01")))

    @rule(dt=st.floats(0.01, 1.0))
    def time_passes(self, dt: float) -> None:
        self.clock.advance(dt)
        for b in range(self.s.brokers):
            if b not in self.quiet and not self.s.gone[b]:
                self._apply(self.s.received(b, Heartbeat(CLIENT, {"state": "active"})))
        self._apply(self.s.tick())
        # after a tick nothing waits while a broker could take it
        assert not self.s._parked or self.s.pick() is None

    @invariant()
    def every_call_is_somewhere(self) -> None:
        s = self.s
        parked = {c.request_id for c in s._parked}
        for c in s.table:
            if c.broker >= 0:
                assert not s.gone[c.broker], c
            else:
                assert c.request_id in parked or any(c is b for _, b in s._bounced), c
        counts = Counter(c.broker for c in s.table if c.broker >= 0)
        assert s.load == [counts[b] for b in range(s.brokers)]

    @invariant()
    def answered_at_most_once(self) -> None:
        assert all(n == 1 for n in self.answered.values())
        assert not (set(self.answered) & self.expired)

    def teardown(self) -> None:
        # let everything end: a live broker answers, or the deadline does
        self.quiet.clear()
        self.s.add_broker()
        for _ in range(20):
            self.time_passes(0.25)
            for c in [c for c in self.s.table if c.broker >= 0]:
                self._apply(self.s.received(c.broker, ClientReply(c.request_id, Status.OK, b"\x01")))
        assert len(self.s.table) == 0
        assert set(self.calls) == set(self.answered) | self.expired


TestSpreadModel = SpreadModel.TestCase
TestSpreadModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_service_unavailable_tries_the_brokers_not_tried_then_gives_the_answer():
    s, _ = make(3)
    call = s.table.prepare("only", "x", (), {}, F())
    (t,) = s.submit(call)
    tried = [t.broker]
    for _ in range(2):  # two more brokers to try
        (t,) = sent(s.received(tried[-1], ClientReply(call.request_id, Status.SERVICE_UNAVAILABLE, NO_WORKER_BODY)))
        assert t.broker not in tried
        tried.append(t.broker)
    (done,) = s.received(tried[-1], ClientReply(call.request_id, Status.SERVICE_UNAVAILABLE, NO_WORKER_BODY))
    assert isinstance(done, Completed) and done.status == Status.SERVICE_UNAVAILABLE
    assert sorted(tried) == [0, 1, 2] and sum(s.load) == 0


def test_a_broker_without_the_service_is_skipped_for_it_a_while():
    s, clock = make(2)
    call = s.table.prepare("only", "x", (), {}, F())
    (t,) = s.submit(call)
    (t2,) = sent(s.received(t.broker, ClientReply(call.request_id, Status.SERVICE_UNAVAILABLE, NO_WORKER_BODY)))
    for _ in range(30):  # the same service avoids it; another service does not
        (n,) = s.submit(s.table.prepare("only", "x", (), {}, F()))
        assert n.broker == t2.broker
    others = {s.submit(s.table.prepare("calc", "add", (), {}, F()))[0].broker for _ in range(30)}
    assert t.broker in others  # (the lighter one, too: the other holds the 31 calls above)
    clock.advance(1.1)
    again = {s.submit(s.table.prepare("only", "x", (), {}, F()))[0].broker for _ in range(60)}
    assert t.broker in again


def test_a_call_that_never_found_a_broker_says_so_in_its_timeout():
    import pytest

    from zrpc._core._session import settle
    from zrpc._errors import Timeout

    class Fut:
        def __init__(self) -> None:
            self.exc: BaseException | None = None

        def done(self) -> bool:
            return self.exc is not None

        def set_exception(self, exc: BaseException) -> None:
            self.exc = exc

    s, clock = make(0)
    fut = Fut()
    call = s.table.prepare("calc", "add", (), {}, fut, timeout=0.5)
    s.submit(call)
    clock.advance(0.6)
    (e,) = [o for o in s.tick() if isinstance(o, Expired)]
    settle(e)
    assert isinstance(fut.exc, Timeout) and "no broker of the cluster is known" in str(fut.exc)
    with pytest.raises(Timeout):
        raise fut.exc


def test_a_lost_worker_s_call_not_retried_is_the_caller_s_answer_not_moved():
    """The broker's retry budget said no: moving the call would get round it."""
    s, _ = make(3)
    call = s.table.prepare("calc", "add", (), {}, F())
    (t,) = s.submit(call)
    body = pack_error("ServiceUnavailable", "worker lost; retry budget exhausted")
    (done,) = s.received(t.broker, ClientReply(call.request_id, Status.SERVICE_UNAVAILABLE, body))
    assert isinstance(done, Completed) and done.status == Status.SERVICE_UNAVAILABLE


def test_a_late_refusal_from_a_broker_the_call_left_moves_nothing():
    s, clock = make(2)
    call = s.table.prepare("only", "x", (), {}, F())
    (t,) = s.submit(call)
    (t2,) = sent(s.received(t.broker, ClientReply(call.request_id, Status.SERVICE_UNAVAILABLE, NO_WORKER_BODY)))
    for status in (Status.SERVICE_UNAVAILABLE, Status.NOT_ACTIVE):  # t.broker again, late
        assert sent(s.received(t.broker, ClientReply(call.request_id, status, NO_WORKER_BODY))) == []
    assert call.broker == t2.broker and s.load[t2.broker] == 1


def test_a_member_that_cannot_be_dialled_costs_itself_only():
    from zrpc._io._follow import Changes, apply_changes

    s, _ = make(0)
    members: dict[str, int] = {}
    dialled: list[tuple[int, str]] = []

    def connect(b: int, endpoint: str) -> None:
        if "bad" in endpoint:
            raise OSError("cannot dial")
        dialled.append((b, endpoint))

    changes = Changes(joined={"a": "tcp://h:1", "bad": "tcp://bad:2", "c": "tcp://h:3"})
    assert apply_changes(changes, s, members, connect, lambda b: None) == []
    assert members == {"a": 0, "c": 2} and s.gone == [False, True, False]
    assert dialled == [(0, "tcp://h:1"), (2, "tcp://h:3")]
    assert {s.submit(s.table.prepare("calc", "add", (), {}, F()))[0].broker for _ in range(40)} == {0, 2}


def test_a_member_refusing_our_key_hands_its_calls_to_another():
    from zrpc._core._session import Refused

    s, _ = make(2)
    calls = [s.table.prepare("calc", "add", (), {}, F()) for _ in range(10)]
    on = [s.submit(c)[0].broker for c in calls]
    out = s.handshake(0, "key refused")
    assert not [o for o in out if isinstance(o, Refused)]
    assert {t.broker for t in sent(out)} == {1} and len(sent(out)) == on.count(0)
    out = s.handshake(1, "key refused")  # nobody takes our key: now the calls fail
    assert len([o for o in out if isinstance(o, Refused)]) == 10
