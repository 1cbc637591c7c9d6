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
