"""BrokerCore's rules on a fake clock: the vote and NOT_ACTIVE, `zrpc.*` on a passive broker,
which alerts go out, the timers, malformed input counted, a bug contained, and its repr."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from zrpc._core._frames import (
    CLIENT,
    WORKER,
    ClientReply,
    ClientRequest,
    Heartbeat,
    Ready,
    Status,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_call, unpack_error, unpack_result
from zrpc._io._internal import InternalErrors
from zrpc.broker._config import BrokerConfig
from zrpc.broker._core._broker import (
    DRAIN_TIMEOUTS,
    Action,
    BrokerCore,
    Log,
    Publish,
    PublishState,
    ReleaseMemory,
    Send,
    SendCall,
)
from zrpc.broker._core._bstar import BStar, encode_state
from zrpc.testing import FakeClock

INTERVAL = 0.25
CLIENT_ID = b"client-1"
SERVICES = {"calc": {"add": True, "charge": False}}


def make(clock: FakeClock, *, pair: bool = False, role: str = "primary", **config: Any) -> BrokerCore:
    if pair:
        config.update(state="tcp://127.0.0.1:1", peer_state="tcp://127.0.0.1:2")
    errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
    core = BrokerCore(BrokerConfig(role=role, heartbeat_interval=INTERVAL, **config), clock, errors)
    core.start()
    return core


def request(rid: int, service: str = "calc", method: str = "add", **headers: Any) -> list[bytes]:
    headers.setdefault("budget_ms", 5000)
    return encode(ClientRequest(rid, service, method, headers, pack_call((1, 2), {})))


def replies(actions: list[Action], peer: bytes = CLIENT_ID) -> list[ClientReply]:
    return [m for a in actions if type(a) is Send and a.peer == peer
            for m in [decode_frames(a.frames)] if isinstance(m, ClientReply)]


def alerts(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.event["name"], a.event["state"]) for a in actions
            if type(a) is Publish and a.topic.startswith("alert.")]


def register(core: BrokerCore, wid: bytes, name: str = "w") -> list[Action]:
    return core.frames_received(wid, encode(Ready(name, SERVICES, 2)))


def backup_passive(clock: FakeClock) -> BrokerCore:
    """A backup that has heard its primary is active: PASSIVE."""
    core = make(clock, pair=True, role="backup")
    core.peer_state_received([encode_state(BStar.ACTIVE, 1, "primary")])
    assert core.state == "passive"
    return core


# --- the vote and NOT_ACTIVE ------------------------------------------------------------------


def test_a_request_to_a_primary_that_has_not_heard_its_peer_is_answered_not_active_then_votes() -> None:
    """The lone-primary rule: a client request is a vote, and counts once the peer has been
    silent for a peer timeout; before that the answer is NOT_ACTIVE (counted)."""
    clock = FakeClock()
    core = make(clock, pair=True)
    (r,) = replies(core.frames_received(CLIENT_ID, request(1)))
    assert r.status == Status.NOT_ACTIVE and unpack_error(r.body)["type"] == "NotActive"
    assert "broker is primary" in unpack_error(r.body)["message"]
    assert core.counters["not_active"] == 1 and core.state == "primary"
    clock.advance(2 * INTERVAL)
    out = core.frames_received(CLIENT_ID, request(2))
    assert core.state == "active" and core.serving and not replies(out)  # queued: no worker yet
    assert [a for a in out if type(a) is PublishState]  # the peer is told at once
    assert core.counters["not_active"] == 1


def test_a_passive_broker_takes_over_only_on_a_vote_after_its_peer_went_silent() -> None:
    clock = FakeClock()
    core = backup_passive(clock)
    (r,) = replies(core.frames_received(CLIENT_ID, request(1)))
    assert r.status == Status.NOT_ACTIVE and "broker is passive" in unpack_error(r.body)["message"]
    clock.advance(2 * INTERVAL)
    out = core.frames_received(CLIENT_ID, request(2))
    assert core.state == "active" and core.bstar is not None and core.bstar.epoch == 2
    assert ("failover", "raised") in alerts(out)


def test_an_active_broker_steps_down_when_a_worker_reports_a_higher_epoch() -> None:
    clock = FakeClock()
    core = make(clock, pair=True)
    clock.advance(2 * INTERVAL)
    core.frames_received(CLIENT_ID, request(1))
    register(core, b"w1")
    core.frames_received(b"w1", encode(Heartbeat(WORKER, {"active_epoch": 1})))
    assert core.state == "active"  # our own epoch: nothing newer
    core.frames_received(b"w1", encode(Heartbeat(WORKER, {"active_epoch": 5})))
    assert core.state == "passive" and not core.serving


# --- zrpc.* -----------------------------------------------------------------------------------


def test_zrpc_requests_are_answered_by_a_passive_broker_and_are_never_a_vote() -> None:
    clock = FakeClock()
    core = backup_passive(clock)
    clock.advance(10 * INTERVAL)  # its peer is silent: any client request would be a vote
    out: list[Action] = []
    for rid, method in enumerate(("ping", "status", "services", "nope"), 1):
        out += core.frames_received(CLIENT_ID, request(rid, "zrpc", method))
    ping, status, services, nope = replies(out)
    assert unpack_result(ping.body) == "pong"
    st = unpack_result(status.body)
    assert st["broker"]["state"] == "passive" and st["broker"]["role"] == "backup"
    assert st["counters"]["received"] == 2 and st["counters"]["not_active"] == 0
    assert unpack_result(services.body) == {}
    assert nope.status == Status.METHOD_NOT_FOUND
    assert core.state == "passive"  # no vote was cast


# --- alerts chosen ----------------------------------------------------------------------------


def test_a_passive_broker_publishes_no_worker_alerts_but_those_about_itself() -> None:
    clock = FakeClock()
    core = backup_passive(clock)
    out = register(core, b"w1")
    assert ("worker_joined", "event") not in alerts(out)
    assert any(type(a) is Log and a.level == logging.DEBUG and a.args[0] == "worker_joined" for a in out)
    assert alerts(core.refused("tcp://10.0.0.9", "KEY", "no such key")) == [("unauthorized", "event")]


def test_an_active_broker_publishes_worker_alerts_stamped_with_its_identity() -> None:
    clock = FakeClock()
    core = make(clock, frontend="tcp://127.0.0.1:7000")
    out = register(core, b"w1", "alpha")
    (pub,) = [a for a in out if type(a) is Publish]
    assert pub.topic == "alert.worker_joined" and pub.event["subject"] == "alpha"
    assert pub.event["broker"] == "tcp://127.0.0.1:7000" and pub.event["broker_state"] == "active"


def test_a_restarted_broker_raises_broker_restarted_and_resolves_it_a_minute_later() -> None:
    clock = FakeClock()
    errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
    core = BrokerCore(BrokerConfig(heartbeat_interval=INTERVAL, restarts=2), clock, errors)
    assert ("broker_restarted", "raised") in alerts(core.start())
    seen: list[tuple[str, str]] = []
    for _ in range(61):
        clock.advance(1.0)
        seen += alerts(core.tick())
    assert seen.count(("broker_restarted", "resolved")) == 1


# --- timers -----------------------------------------------------------------------------------


def test_workers_are_sent_heartbeats_every_interval_and_metrics_go_out_every_second() -> None:
    clock = FakeClock()
    core = make(clock)
    register(core, b"w1")
    beats = metrics = trims = 0
    for _ in range(45):  # 2.25 s in steps of 50 ms
        clock.advance(0.05)
        core.frames_received(b"w1", encode(Heartbeat(WORKER, {})))
        out = core.tick()
        beats += sum(1 for a in out if type(a) is Send and a.peer == b"w1")
        metrics += sum(1 for a in out if type(a) is Publish and a.topic == "metrics")
        trims += sum(1 for a in out if type(a) is ReleaseMemory)
        nxt = core.next_deadline()
        assert nxt is not None and nxt - clock() <= INTERVAL
    assert 8 <= beats <= 9 and metrics == 2 and trims == 2  # one per interval (float steps)
    assert core.last_status["broker"]["state"] == "active"


def test_a_silent_worker_is_lost_after_its_liveness_and_forgotten() -> None:
    clock = FakeClock()
    core = make(clock)
    register(core, b"w1")
    clock.advance(0.2)
    core.tick()
    assert core.dispatcher.has_worker(b"w1")
    for _ in range(12):
        clock.advance(0.05)
        out = core.tick()
        if not core.dispatcher.has_worker(b"w1"):
            break
    assert not core.dispatcher.has_worker(b"w1")
    assert ("worker_lost", "raised") in alerts(out)
    assert b"w1" not in core.liveness


def test_after_a_stall_of_our_own_nobody_is_judged_until_the_frontend_is_drained() -> None:
    clock = FakeClock()
    core = make(clock)
    register(core, b"w1")
    clock.advance(5.0)  # we were stopped: the worker's heartbeats wait in our socket
    out = core.checkpoint(0.1)
    assert any(type(a) is Log and a.level == logging.WARNING and "stalled" in a.msg for a in out)
    clock.advance(1.0)  # the backlog is read slowly; the worker is silent all the while
    core.tick()
    assert core.dispatcher.has_worker(b"w1")
    core.drained()
    core.tick()
    assert not core.dispatcher.has_worker(b"w1")


def test_a_flood_that_never_drains_does_not_hide_a_dead_worker_for_ever() -> None:
    clock = FakeClock()
    core = make(clock)
    register(core, b"w1")
    clock.advance(5.0)
    core.checkpoint()
    timeout = core.liveness.timeout
    while clock() < 1005.0 + DRAIN_TIMEOUTS * timeout and core.dispatcher.has_worker(b"w1"):
        clock.advance(0.05)
        core.checkpoint(0.05)
        core.tick()
    assert not core.dispatcher.has_worker(b"w1")


def test_a_call_that_did_not_go_out_loses_the_worker_and_is_retried_on_another() -> None:
    clock = FakeClock()
    core = make(clock)
    register(core, b"w1", "a")
    register(core, b"w2", "b")
    (first,) = [a for a in core.frames_received(CLIENT_ID, request(1)) if type(a) is SendCall]
    out = core.call_not_sent(first.worker, full=True)
    (retry,) = [a for a in out if type(a) is SendCall]
    assert retry.worker != first.worker and not core.dispatcher.has_worker(first.worker)
    msg = decode_frames(retry.frames)
    assert isinstance(msg, WorkerRequest) and msg.request_id == 1


# --- malformed input and bugs -----------------------------------------------------------------


def test_malformed_input_is_counted_logged_and_a_readable_request_answered() -> None:
    clock = FakeClock()
    core = make(clock)
    assert core.frames_received(CLIENT_ID, [b"one frame"])
    bad = request(7)
    bad[0] = bad[0][:-3] + b"\xc1\xc1\xc1"  # the request id readable, the headers not
    (r,) = replies(core.frames_received(CLIENT_ID, bad))
    assert r.request_id == 7 and r.status == Status.PROTOCOL_ERROR
    core.frames_received(CLIENT_ID, encode(ClientReply(1, Status.OK, b"")))  # not for a broker
    core.peer_state_received([[b"not a state message"]])  # a lone broker ignores its link
    assert core.counters["malformed"] == 3 and core.malformed.count == 3
    assert "ClientReply is not sent to a broker" in core.malformed.last


def test_logging_of_malformed_input_is_rate_limited() -> None:
    core = make(FakeClock())
    logged = sum(1 for _ in range(50) for a in core.frames_received(CLIENT_ID, [b"x"]) if type(a) is Log)
    assert logged == 10 and core.counters["malformed"] == 50


def test_a_garbled_state_message_is_counted() -> None:
    core = make(FakeClock(), pair=True)
    core.peer_state_received([[b"\x93\x01\x02\x03"], encode_state(BStar.BACKUP, 0, "backup")])
    assert core.counters["malformed"] == 1 and core.state == "active"  # the good one was heard


def test_a_bug_costs_one_message_answered_internal_error_and_alerted_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL)  # the traceback is expected here
    clock = FakeClock()
    core = make(clock)

    def boom(event: Any) -> list[Any]:
        raise RuntimeError("a bug in the dispatcher")

    monkeypatch.setattr(core.dispatcher, "handle", boom)
    (r,) = replies(core.frames_received(CLIENT_ID, request(1)))
    assert r.status == Status.ERROR and unpack_error(r.body)["type"] == "InternalError"
    monkeypatch.undo()
    assert ("internal_error", "event") in alerts(core.tick())
    assert ("internal_error", "event") not in alerts(core.tick())
    assert core.status()["counters"]["internal_errors"] == 1


def test_a_client_heartbeat_is_answered_with_the_brokers_info() -> None:
    core = make(FakeClock(), pair=True, role="backup")
    (a,) = core.frames_received(CLIENT_ID, encode(Heartbeat(CLIENT, {})))
    msg = decode_frames(a.frames) if type(a) is Send else None
    assert isinstance(msg, Heartbeat) and msg.info["state"] == "backup" and msg.info["role"] == "backup"


# --- repr -------------------------------------------------------------------------------------


def test_repr_shows_role_state_epoch_workers_and_queue() -> None:
    clock = FakeClock()
    core = make(clock, pair=True)
    assert repr(core) == "<BrokerCore primary PRIMARY epoch=0 workers=0 queued=0>"
    clock.advance(2 * INTERVAL)
    core.frames_received(CLIENT_ID, request(1))
    register(core, b"w1")
    core.frames_received(CLIENT_ID, request(2, "other"))
    assert repr(core) == "<BrokerCore primary ACTIVE epoch=1 workers=1 queued=1>"
    clock.advance(1.0)
    core.checkpoint()  # stalled for a peer timeout: in doubt until it hears its peer
    assert repr(core).startswith("<BrokerCore primary ACTIVE in-doubt epoch=1")


def test_state_and_peer_state_go_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        BrokerCore(BrokerConfig(state="tcp://127.0.0.1:1"), FakeClock(),
                   InternalErrors(logging.getLogger("zrpc.broker.test"), "broker"))
