"""The client's session on a fake clock: heartbeats, broker liveness, deadlines."""

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrpc._core._frames import CLIENT, ClientReply, ClientRequest, Heartbeat, Status, decode_frames, encode
from zrpc._core._malformed import LOG_EVERY, LOG_FIRST
from zrpc._core._session import Completed, Dropped, Expired, Session, Transmit, settle
from zrpc._errors import ProtocolError, ZrpcError
from zrpc.testing import FakeClock


class F:
    def done(self):
        return False


def make():
    clock = FakeClock()
    return Session(clock, 2, timeout=1.0, interval=0.25, liveness=3), clock


def test_call_goes_to_the_active_broker_with_its_budget():
    s, clock = make()
    call = s.table.prepare("calc", "add", (1, 2), {}, F())
    clock.advance(0.1)
    (t,) = s.submit(call)
    assert isinstance(t, Transmit) and t.broker == 0
    msg = decode_frames(t.frames)
    assert msg.service == "calc" and msg.headers["budget_ms"] == 900


def test_reply_completes_once_and_duplicates_are_dropped():
    s, _ = make()
    call = s.table.prepare("calc", "add", (), {}, F())
    s.submit(call)
    (c,) = s.received(0, ClientReply(call.request_id, Status.OK, b"\x03"))
    assert isinstance(c, Completed) and c.call is call
    assert s.received(0, ClientReply(call.request_id, Status.OK, b"\x03")) == []


def test_deadline_expires_the_call():
    s, clock = make()
    call = s.table.prepare("calc", "add", (), {}, F(), timeout=0.5)
    s.submit(call)
    clock.advance(0.49)
    assert not [o for o in s.tick() if isinstance(o, Expired)]
    clock.advance(0.02)
    assert [o.call for o in s.tick() if isinstance(o, Expired)] == [call]
    assert len(s.table) == 0


def test_heartbeats_every_interval_to_every_broker_and_liveness():
    s, clock = make()
    assert sorted(o.broker for o in s.tick() if isinstance(o, Transmit)) == [0, 1]
    assert [o for o in s.tick() if isinstance(o, Transmit)] == []
    s.received(0, Heartbeat(CLIENT, {"state": "active"}))
    assert s.alive == [True, False] and s.info[0]["state"] == "active"
    clock.advance(0.8)
    s.tick()
    assert s.alive == [False, False]


def test_bad_timeout_is_refused():
    s, _ = make()
    with pytest.raises(ValueError):
        s.table.prepare("calc", "add", (), {}, F(), timeout=0)


# --- failover -----------------------------------------------------------------------------------


def heard(s, b, state="active", epoch=1):
    s.received(b, Heartbeat(CLIENT, {"state": state, "epoch": epoch}))


def test_silent_active_broker_fails_over_and_resends_with_the_resent_flag():
    s, clock = make()
    heard(s, 0)
    heard(s, 1, "passive")
    call = s.table.prepare("calc", "charge", (), {}, F(), timeout=10)
    s.submit(call)
    for _ in range(5):  # the backup keeps answering heartbeats, the primary is gone
        clock.advance(0.25)
        heard(s, 1, "passive")
        s.tick()
    clock.advance(0.3)
    heard(s, 1, "passive")
    out = s.tick()
    assert s.active == 1
    (t,) = [o for o in out if isinstance(o, Transmit) and o.broker == 1 and len(o.frames[1]) > 0]
    msg = decode_frames(t.frames)
    assert msg.request_id == call.request_id and msg.headers["resent"] is True


def test_failover_waits_for_failover_timeout():
    s, clock = make()
    heard(s, 0)
    clock.advance(s.failover_timeout - 0.05)
    s.tick()
    assert s.active == 0


def test_not_active_reply_switches_and_resends_at_once_then_paces():
    s, clock = make()
    call = s.table.prepare("calc", "add", (), {}, F())
    s.submit(call)
    out = s.received(0, ClientReply(call.request_id, Status.NOT_ACTIVE, b""))
    assert s.active == 1 and [o.broker for o in out if isinstance(o, Transmit)] == [1]
    assert "resent" not in decode_frames(out[-1].frames).headers  # it never ran at broker 0
    out = s.received(1, ClientReply(call.request_id, Status.NOT_ACTIVE, b""))
    assert s.active == 0 and not [o for o in out if isinstance(o, Transmit)]
    clock.advance(0.26)
    assert [o.broker for o in s.tick() if isinstance(o, Transmit) and o.frames[1]] == [0]


def test_moves_to_the_broker_that_says_active():
    s, _ = make()
    heard(s, 0, "passive")
    heard(s, 1, "active")
    assert s.active == 1
    heard(s, 0, "active", epoch=3)  # the other took over with a higher epoch
    assert s.active == 0


def test_single_broker_restart_resends_what_it_held():
    clock = FakeClock()
    s = Session(clock, 1, timeout=10.0)
    heard(s, 0)
    call = s.table.prepare("calc", "add", (), {}, F())
    s.submit(call)
    clock.advance(2.0)
    s.tick()
    assert s.lost == [True]
    out = s.received(0, Heartbeat(CLIENT, {"state": "active"}))
    (t,) = [o for o in out if isinstance(o, Transmit)]
    assert decode_frames(t.frames).headers["resent"] is True


# --- hostile input: the session is total over anything that decodes ---------------------------

# what msgpack can carry in a heartbeat's info map (decode uses strict_map_key: str/bytes keys)
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
keys = st.sampled_from(["state", "epoch", "role", "interval_ms", "liveness", "register"]) | st.text(max_size=6)
info_maps = st.dictionaries(keys | st.binary(max_size=4), values, max_size=6)
# the fields the session reads, with values of every shape and a fair chance of "active"
hostile_info = st.fixed_dictionaries(
    {"state": st.just("active") | st.sampled_from(["passive", "backup"]) | values},
    optional={"epoch": st.sampled_from([float("inf"), float("nan"), -1, 2**64 - 1, "7", b"7", [1]]) | values})


class Fut:
    """A future stand-in that records how it was settled."""

    def __init__(self):
        self.outcome = None

    def done(self):
        return self.outcome is not None

    def set_result(self, v):
        self.outcome = ("ok", v)

    def set_exception(self, e):
        self.outcome = ("error", e)


@pytest.mark.parametrize("epoch", ["x", float("inf"), float("nan"), [1], {"a": 1}, b"3", -5, 2**64 - 1, True])
def test_a_heartbeat_epoch_of_any_type_never_raises(epoch):
    s, _ = make()
    heard(s, 0, "active", epoch=1)
    heard(s, 1, "active", epoch=epoch)  # compared with ours: must not raise
    assert s.active in (0, 1)
    heard(s, 0, "active", epoch=epoch)
    heard(s, 1, "active", epoch=2)
    assert s.active in (0, 1)


def test_a_non_integer_epoch_counts_as_no_epoch():
    s, _ = make()
    heard(s, 0, "active", epoch=1)
    heard(s, 1, "active", epoch="99")
    assert s.active == 0  # "99" is no epoch: not higher than ours
    heard(s, 1, "active", epoch=2)
    assert s.active == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), info_maps | hostile_info), max_size=12),
       st.lists(st.floats(0, 2.0), max_size=12))
def test_session_is_total_over_any_heartbeat_info(beats, steps):
    s, clock = make()
    calls = [s.table.prepare("calc", "add", (i,), {}, Fut(), timeout=1.5) for i in range(3)]
    for c in calls:
        s.submit(c)
    for i, (b, info) in enumerate(beats):
        # through the real codec, as the loops receive it
        frames = [msgpack.packb([CLIENT, 4, info], use_bin_type=True), b""]
        s.received(b, decode_frames(frames))
        if i < len(steps):
            clock.advance(steps[i])
        for o in s.tick():
            settle(o)
        assert s.active in (0, 1)
        assert math.isfinite(s.next_deadline())
    clock.advance(2.0)
    for o in s.tick():
        settle(o)
    assert all(c.future.done() for c in calls)  # nothing was lost on the way


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10), st.binary(max_size=40) | values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_a_reply_of_any_status_and_body_settles_its_call(status, body):
    s, _ = make()
    call = s.table.prepare("calc", "add", (), {}, Fut())
    s.submit(call)
    out = s.received(0, ClientReply(call.request_id, status, body))
    for o in out:
        settle(o)
    if status != Status.NOT_ACTIVE:
        assert call.future.done()
        kind, value = call.future.outcome
        assert kind == "ok" or isinstance(value, ZrpcError)


def test_an_undecodable_result_fails_the_call_with_a_protocol_error():
    s, _ = make()
    call = s.table.prepare("calc", "add", (), {}, Fut())
    s.submit(call)
    for o in s.received(0, ClientReply(call.request_id, Status.OK, b"\xc1")):
        settle(o)
    assert call.future.outcome[0] == "error" and isinstance(call.future.outcome[1], ProtocolError)


def test_malformed_messages_are_counted_with_the_reason():
    s, _ = make()
    assert s.malformed.count == 0
    (d,) = s.frames_received(1, [b"\xc1garbage", b""])
    assert isinstance(d, Dropped) and d.broker == 1 and d.count == 1 and d.reason
    (d,) = s.received(0, ClientRequest(7, "calc", "add", {}, b""))  # no business at a client
    assert d.count == 2 and "ClientRequest" in d.reason
    assert s.malformed.count == 2 and s.malformed.last == d.reason
    settle(d)  # nothing to settle: the loop logs it


def test_a_flood_of_malformed_messages_asks_for_few_log_lines():
    s, _ = make()
    logged = [o for _ in range(3 * LOG_EVERY) for o in s.frames_received(0, [b"x", b"y", b"z"])]
    assert s.malformed.count == 3 * LOG_EVERY
    assert [d.count for d in logged] == [*range(1, LOG_FIRST + 1), LOG_EVERY, 2 * LOG_EVERY, 3 * LOG_EVERY]


# --- headers the client sets -----------------------------------------------------------------


def test_idempotent_is_sent_only_when_the_caller_asks():
    s, clock = make()
    plain = s.table.prepare("calc", "charge", (), {}, F(), timeout=10)
    (t,) = s.submit(plain)
    assert "idempotent" not in decode_frames(t.frames).headers
    asked = s.table.prepare("calc", "add", (), {}, F(), idempotent=False)
    (t,) = s.submit(asked)
    assert decode_frames(t.frames).headers["idempotent"] is False
    # a call re-sent after a failover still carries only what the caller asked
    heard(s, 0)
    heard(s, 1, "passive")
    clock.advance(s.failover_timeout + 0.3)
    heard(s, 1, "passive")
    resent = [decode_frames(o.frames) for o in s.tick() if isinstance(o, Transmit) and o.frames[1]]
    by_id = {m.request_id: m.headers for m in resent}
    assert by_id[plain.request_id]["resent"] is True and "idempotent" not in by_id[plain.request_id]
    assert by_id[asked.request_id]["idempotent"] is False


# --- the deadline heap stays proportional to the calls in flight ------------------------------


def test_deadline_heap_stays_small_after_100k_answered_calls():
    clock = FakeClock()
    s = Session(clock, 1, timeout=60.0)
    table = s.table
    kept = []
    for i in range(100_000):
        call = table.prepare("calc", "add", (), {}, F())
        table.add(call)
        if i % 10_000 == 0:
            kept.append(call)  # a few stay in flight
        else:
            assert table.pop(call.request_id) is call
        clock.advance(0.0001)
    assert len(table) == len(kept)
    assert len(table._deadlines) <= 1000
    # compaction keeps the live calls' deadlines: they still expire, in order
    clock.advance(60.0)
    assert [c.request_id for c in table.expired()] == [c.request_id for c in kept]
    assert table.next_deadline() is None


def test_compaction_leaves_next_deadline_right():
    clock = FakeClock()
    table = Session(clock, 1, timeout=60.0).table
    early = table.prepare("calc", "add", (), {}, F(), timeout=5)
    table.add(early)
    for _ in range(5000):
        c = table.prepare("calc", "add", (), {}, F(), timeout=1)
        table.add(c)
        table.pop(c.request_id)
    assert table.next_deadline() == early.deadline


# --- calls held by a broker that is gone are never left behind ------------------------------


def test_call_at_a_dead_broker_is_resent_after_a_switch_on_the_peers_word():
    """The other broker says it is active before we notice ours went silent: we switch at
    once (nothing re-sent, the old one may still answer), and once the old one counts as
    lost its calls are re-sent, flagged, to the new active broker."""
    clock = FakeClock()
    s = Session(clock, 2, timeout=10.0, interval=0.25, liveness=3)
    s.received(0, Heartbeat(CLIENT, {"state": "active", "epoch": 1}))
    s.received(1, Heartbeat(CLIENT, {"state": "passive", "epoch": 1}))
    call = s.table.prepare("calc", "add", (1, 2), {}, F())
    (t,) = s.submit(call)
    assert t.broker == 0  # ... and broker 0 dies now, holding the call
    clock.advance(0.5)
    s.tick()
    out = s.received(1, Heartbeat(CLIENT, {"state": "active", "epoch": 2}))
    sent = [o for o in out if isinstance(o, Transmit) and o.broker == 1]
    for _ in range(40):  # 4 s: broker 0 stays silent, broker 1 keeps heartbeating
        clock.advance(0.1)
        s.received(1, Heartbeat(CLIENT, {"state": "active", "epoch": 2}))
        out = s.tick()
        sent += [o for o in out if isinstance(o, Transmit) and o.broker == 1]
        assert not [o for o in out if isinstance(o, Expired)]
    resent = [m for m in (decode_frames(o.frames) for o in sent)
              if getattr(m, "request_id", None) == call.request_id]
    assert len(resent) == 1 and resent[0].headers.get("resent") is True


def test_a_broker_that_restarted_between_heartbeats_gets_its_calls_again():
    """A restart faster than failover_timeout: the heartbeat's `boot` changes, so the calls
    that broker held (and lost) are re-sent to it, flagged as re-sent."""
    s, clock = make()
    s = Session(clock, 1, timeout=10.0, interval=0.25, liveness=3)
    s.received(0, Heartbeat(CLIENT, {"state": "active", "boot": "a1"}))
    call = s.table.prepare("calc", "charge", (), {}, F())
    s.submit(call)
    clock.advance(0.3)
    assert [o for o in s.received(0, Heartbeat(CLIENT, {"state": "active", "boot": "a1"}))
            if isinstance(o, Transmit)] == []
    out = s.received(0, Heartbeat(CLIENT, {"state": "active", "boot": "b2"}))
    (again,) = [decode_frames(o.frames) for o in out if isinstance(o, Transmit)]
    assert again.request_id == call.request_id and again.headers.get("resent") is True


def test_frames_that_do_not_decode_are_counted_and_dropped():
    s, _ = make()
    call = s.table.prepare("calc", "add", (), {}, F())
    s.submit(call)
    out = s.frames_received(0, [b"\xc1garbage", b""])
    assert [type(o) for o in out] == [Dropped] and s.malformed.count == 1
    assert call.request_id in s.table.pending  # it matched no call: that one keeps its deadline
    s.frames_received(0, encode(Heartbeat(CLIENT, {"state": "active"})))
    assert s.malformed.count == 1 and s.info[0]["state"] == "active"


# --- what a debugger shows ---------------------------------------------------------------------


def test_repr_shows_the_brokers_the_active_one_and_the_calls():
    s, clock = make()
    assert repr(s) == "<Session brokers=[silent*, silent] calls=0 switches=0 malformed=0>"
    heard(s, 0)
    heard(s, 1, "passive")
    for i in range(3):
        s.submit(s.table.prepare("calc", "add", (i,), {}, F(), timeout=0.5))
    assert repr(s) == "<Session brokers=[active*, passive] calls=3 switches=0 malformed=0>"
    assert repr(s.table) == "<CallTable calls=3 next_deadline_in=0.500s timeout=1s>"
    clock.advance(s.failover_timeout + 0.1)
    heard(s, 1, "passive")
    for o in s.tick():
        settle(o)
    assert repr(s) == "<Session brokers=[lost, passive*] calls=0 switches=1 malformed=0>"
    assert repr(s.table) == "<CallTable calls=0 timeout=1s>"


def test_repr_keeps_a_brokers_odd_state_short():
    s, _ = make()
    heard(s, 0, state="x" * 1000)
    heard(s, 1, state=[1, 2])
    s.handshake(1, "the broker refused this key")
    assert repr(s) == f"<Session brokers=[{'x' * 16}*, refused] calls=0 switches=0 malformed=0>"
