"""BrokerCore's rules on a fake clock: the vote and NOT_ACTIVE, `zrpc.*` on a passive broker,
which alerts go out, the timers, malformed input counted, a bug contained, its repr, the
caller's key and the roles of keys, zrpc.health and worker_restarted."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from zrpc._core._frames import (
    CLIENT,
    WORKER,
    ClientReply,
    ClientRequest,
    Disconnect,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_call, unpack_error, unpack_result
from zrpc._io._internal import InternalErrors
from zrpc._io._security import Role, Roles
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
from zrpc.broker._core._dispatch import Dispatcher
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


def test_a_cluster_members_events_name_it() -> None:
    clock = FakeClock()
    core = make(clock, cluster="etcd://127.0.0.1:2379", name="b1")
    (pub,) = [a for a in register(core, b"w1", "alpha") if type(a) is Publish]
    assert pub.event["member"] == "b1"
    assert "member" not in [a for a in register(make(clock), b"w1") if type(a) is Publish][0].event


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


def test_a_late_monitor_subscriber_hears_the_alerts_in_force_and_nothing_else() -> None:
    clock = FakeClock()
    errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
    core = BrokerCore(BrokerConfig(heartbeat_interval=INTERVAL, restarts=1), clock, errors)
    core.start()
    register(core, b"w1", "alpha")  # worker_joined: an event, over once published
    for prefix in (b"alert.", b"", b"alert.broker_restarted", b"al"):
        (pub,) = [a for a in core.subscribed(prefix) if type(a) is Publish]
        assert pub.topic == "alert.broker_restarted"
        assert pub.event["state"] == "in_force" and not pub.event["resolved"]
        assert pub.event["detail"]["restarts"] == 1 and pub.event["broker_state"] == "active"
    assert core.subscribed(b"metrics") == [] and core.subscribed(b"alert.x") == []
    for _ in range(61):
        clock.advance(1.0)
        core.tick()
    # broker_restarted resolved; the silent worker is lost
    assert [a.event["name"] for a in core.subscribed(b"alert.") if type(a) is Publish] == ["worker_lost"]


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


# --- who calls, and the roles of the keys (rules 13, 14) ------------------------------------

APP, OPS, GOOD, ROGUE, STRANGER = (f"{n:<5}".replace(" ", "0") * 8 for n in
                                   ("app", "ops", "good", "rogue", "who"))  # 40-character "keys"


def with_roles(core: BrokerCore, **extra: Any) -> Roles:
    roles = Roles("roles.toml", {APP: Role(call=frozenset({"calc"})),
                                 OPS: Role(call=frozenset({"*"}), admin=True),
                                 GOOD: Role(serve=frozenset({"calc"})),
                                 **extra},
                  names={APP: "app", GOOD: "good", ROGUE: "rogue"})
    assert core.authorize(roles) == []
    return roles


def sent_to(actions: list[Action], peer: bytes) -> list[Any]:
    return [decode_frames(a.frames) for a in actions if type(a) in (Send, SendCall)
            and (a.peer if type(a) is Send else a.worker) == peer]


def ready(core: BrokerCore, wid: bytes, key: str | None, name: str = "w",
          services: dict[str, dict[str, bool]] | None = None, **info: Any) -> list[Action]:
    return core.frames_received(wid, encode(Ready(name, services or SERVICES, 2, 1.0, info)), key)


def test_the_broker_stamps_the_callers_key_and_drops_one_a_client_claims() -> None:
    core = make(FakeClock())
    ready(core, b"w1", GOOD)
    out = core.frames_received(CLIENT_ID, request(1, caller=OPS), APP)
    (call,) = [m for m in sent_to(out, b"w1") if isinstance(m, WorkerRequest)]
    assert call.headers["caller"] == APP
    out = core.frames_received(CLIENT_ID, request(2, caller=OPS))  # no keys: no caller at all
    (call,) = [m for m in sent_to(out, b"w1") if isinstance(m, WorkerRequest)]
    assert "caller" not in call.headers


def test_a_ready_outside_its_keys_role_is_refused_told_why_kept_and_alerted() -> None:
    clock = FakeClock()
    core = make(clock)
    with_roles(core)
    out = ready(core, b"w1", ROGUE, "rogue-1")
    assert not core.dispatcher.has_worker(b"w1")
    (hb,) = sent_to(out, b"w1")
    assert isinstance(hb, Heartbeat) and hb.info["refused"].startswith("the key rogue may not serve calc")
    (pub,) = [a for a in out if type(a) is Publish]
    assert pub.topic == "alert.unauthorized" and pub.event["subject"] == "rogue"
    assert pub.event["detail"] | {"reason": "-"} == {"key": ROGUE, "what": "serve", "service": "calc",
                                                     "worker": "rogue-1", "reason": "-"}
    assert core.counters["unauthorized_workers"] == 1
    # its heartbeats keep it, and are answered with the reason: it is never asked to register
    for _ in range(8):
        clock.advance(INTERVAL / 2)
        assert not any("register" in m.info for m in sent_to(
            core.frames_received(b"w1", encode(Heartbeat(WORKER, {})), ROGUE), b"w1"))
        beats = [m for m in sent_to(core.tick(), b"w1") if isinstance(m, Heartbeat)]
        assert all(m.info["refused"] == hb.info["refused"] for m in beats)
    assert core.counters["unauthorized_workers"] == 1
    # silent for its liveness timeout: let go (no more heartbeats)
    clock.advance(core.liveness.timeout + INTERVAL)
    core.tick()
    clock.advance(INTERVAL)
    assert sent_to(core.tick(), b"w1") == []


def test_a_call_outside_its_keys_role_is_answered_unauthorized_and_never_dispatched() -> None:
    core = make(FakeClock())
    with_roles(core)
    ready(core, b"w1", GOOD)
    requests = core.dispatcher.counters["requests"]
    out = core.frames_received(CLIENT_ID, request(1, "billing", "charge"), APP)
    (r,) = replies(out)
    assert r.status == Status.UNAUTHORIZED
    err = unpack_error(r.body)
    assert err["type"] == "Unauthorized" and "the key app may not call billing" in err["message"]
    assert not [a for a in out if type(a) is SendCall]
    assert core.dispatcher.counters["requests"] == requests and core.counters["unauthorized_calls"] == 1
    assert ("unauthorized", "event") in alerts(out)
    (r,) = replies(core.frames_received(CLIENT_ID, request(2), STRANGER))  # named nowhere: nothing
    assert r.status == Status.UNAUTHORIZED and STRANGER in unpack_error(r.body)["message"]
    assert [a for a in core.frames_received(CLIENT_ID, request(3), APP) if type(a) is SendCall]


def test_a_refused_call_to_a_passive_broker_is_not_a_vote() -> None:
    clock = FakeClock()
    core = backup_passive(clock)
    with_roles(core)
    clock.advance(10 * INTERVAL)  # its peer is silent: an allowed request would be a vote
    (r,) = replies(core.frames_received(CLIENT_ID, request(1), STRANGER))
    assert r.status == Status.UNAUTHORIZED and core.state == "passive"


def test_admin_methods_need_admin_and_ping_and_health_do_not() -> None:
    core = make(FakeClock())
    with_roles(core)
    out: list[Action] = []
    for rid, method in enumerate(("status", "services", "ping", "health", "nope"), 1):
        out += core.frames_received(CLIENT_ID, encode(ClientRequest(rid, "zrpc", method, {}, pack_call(
            (), {}))), APP)
    status, services, ping, health, nope = replies(out)
    assert status.status == services.status == nope.status == Status.UNAUTHORIZED
    assert "an admin method" in unpack_error(status.body)["message"]
    assert ping.status == health.status == Status.OK
    (st,) = replies(core.frames_received(CLIENT_ID, request(9, "zrpc", "status"), OPS))
    assert st.status == Status.OK and unpack_result(st.body)["counters"]["unauthorized_calls"] == 3


def test_new_roles_ask_a_refused_worker_back_and_make_a_revoked_one_leave() -> None:
    clock = FakeClock()
    core = make(clock)
    with_roles(core)
    ready(core, b"w1", ROGUE, "rogue-1")
    ready(core, b"w2", GOOD, "good-1")
    (call,) = [a for a in core.frames_received(CLIENT_ID, request(1), APP) if type(a) is SendCall]
    assert call.worker == b"w2"
    # grant: the refused one is asked to register, and is let in when it does
    out = core.authorize(Roles(
        "roles.toml", {APP: Role(call=frozenset({"calc"})), ROGUE: Role(serve=frozenset({"calc"}))},
        names={ROGUE: "rogue"}))
    (hb,) = sent_to(out, b"w1")
    assert isinstance(hb, Heartbeat) and hb.info["register"] is True
    ready(core, b"w1", ROGUE, "rogue-1")
    assert core.dispatcher.has_worker(b"w1")
    # ...and good, no longer named, now leaves: its call in flight still completes
    assert core.dispatcher.workers[b"w2"].leaving
    assert ("worker_leaving", "event") in alerts(out) and ("unauthorized", "event") in alerts(out)
    done = core.frames_received(b"w2", encode(WorkerReply(CLIENT_ID, 1, Status.OK, b"\x03")), GOOD)
    (r,) = replies(done)
    assert r.status == Status.OK and not core.dispatcher.has_worker(b"w2")
    # no roles at all: everything is allowed again
    core.authorize(None)
    (r,) = replies(core.frames_received(CLIENT_ID, request(2, "zrpc", "status"), STRANGER))
    assert r.status == Status.OK


def test_a_ready_the_dispatcher_refuses_is_answered_with_the_reason() -> None:
    clock = FakeClock()
    errors = InternalErrors(logging.getLogger("zrpc.broker.test"), "broker")
    core = BrokerCore(BrokerConfig(heartbeat_interval=INTERVAL), clock, errors,
                      dispatcher=Dispatcher(clock, max_services=1))
    core.start()
    (hb,) = sent_to(ready(core, b"w1", None, services={"a": {}, "b": {}}), b"w1")
    assert isinstance(hb, Heartbeat) and "at most 1" in hb.info["refused"]
    (hb,) = sent_to(ready(core, b"w2", None, services={"a": {}}), b"w2")
    assert isinstance(hb, Heartbeat) and "refused" not in hb.info


# --- zrpc.health (rule 15) ----------------------------------------------------------------------


def health(core: BrokerCore, *args: Any, **kwargs: Any) -> Any:
    req = encode(ClientRequest(1, "zrpc", "health", {}, pack_call(args, kwargs)))
    (r,) = replies(core.frames_received(CLIENT_ID, req))
    return unpack_result(r.body) if r.status == Status.OK else r.status


def test_health_says_serving_not_serving_or_unknown_as_grpc_does() -> None:
    clock = FakeClock()
    core = make(clock)
    assert health(core) == {"status": "SERVING", "service": None, "state": "active"}
    assert health(core, "calc")["status"] == "UNKNOWN"
    register(core, b"w1")
    assert health(core, "calc")["status"] == "SERVING"
    assert health(core, service="calc")["status"] == "SERVING"
    core.frames_received(b"w1", encode(Disconnect()))  # leaving: no longer serving
    assert health(core, "calc")["status"] == "NOT_SERVING"
    assert health(core, "other")["status"] == "UNKNOWN"
    assert health(core, 1) == health(core, "a", "b") == health(core, what="x") == Status.PROTOCOL_ERROR
    (r,) = replies(core.frames_received(CLIENT_ID, encode(ClientRequest(2, "zrpc", "health", {}, b""))))
    assert unpack_result(r.body)["status"] == "SERVING"  # an empty body: the broker itself


def test_a_passive_broker_is_not_serving_whatever_its_workers() -> None:
    core = backup_passive(FakeClock())
    register(core, b"w1")
    assert health(core)["status"] == health(core, "calc")["status"] == "NOT_SERVING"
    assert health(core, "other")["status"] == "UNKNOWN"


# --- worker_restarted (rule 16) -------------------------------------------------------------------


def test_a_ready_with_more_restarts_than_last_seen_is_a_worker_restarted_alert() -> None:
    core = make(FakeClock())
    info = {"host": "h", "pid": 7, "prefork": 2}
    assert ("worker_restarted", "event") not in alerts(ready(core, b"w1", None, "w-2", restarts=0, **info))
    out = ready(core, b"w2", None, "w-2", restarts=1, **info)
    (pub,) = [a for a in out if type(a) is Publish and a.topic == "alert.worker_restarted"]
    assert pub.event["subject"] == "w-2"
    assert pub.event["detail"] == {"restarts": 1, "prefork": 2, "host": "h", "pid": 7}
    assert ("worker_restarted", "event") not in alerts(ready(core, b"w2", None, "w-2", restarts=1, **info))
    assert ("worker_restarted", "event") in alerts(ready(core, b"w3", None, "w-3", restarts=4, **info))
    assert ("worker_restarted", "event") not in alerts(ready(core, b"w4", None, "w-4", **info))
