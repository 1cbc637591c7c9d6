"""The client's session on a fake clock: heartbeats, broker liveness, deadlines."""

import pytest

from zrpc._frames import CLIENT, ClientReply, Heartbeat, Status, decode_frames
from zrpc._session import Completed, Expired, Session, Transmit
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
