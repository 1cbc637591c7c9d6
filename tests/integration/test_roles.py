"""Roles of CURVE keys on real processes (keys from `zrpc keygen`, a roles.toml beside them):
a worker key offering a service it may not serve, a client key calling one it may not call,
an admin method refused, SIGHUP granting then revoking, and the caller's key as the broker
stamps it on what a worker receives (a client's own `caller` header never gets through)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import zmq

import zrpc
from tests import REPO
from tests.monitor_tap import MonitorTap
from zrpc._core._frames import (
    WORKER,
    ClientReply,
    ClientRequest,
    Heartbeat,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._serial import pack_call, pack_result, unpack_error
from zrpc._io._security import client_keys, keygen, load_public
from zrpc.testing import free_port, wait_until

INTERVAL = "0.1"  # heartbeats: a refused worker re-invited, a silent one let go, quickly

ROLES = """
[keys.ops]
call = ["*"]
admin = true

[keys.app]
call = ["calc", "whoami"]

[keys.calc-worker]
serve = ["calc", "whoami"]

[keys.rogue]
serve = ["other"]
"""

NAMES = ("ops", "app", "plain", "calc-worker", "rogue", "monitor")

whoami = zrpc.Service("whoami")
"""A worker process serves it (`zrpc worker tests.integration.test_roles:whoami`)."""


@whoami.method
def key() -> object:
    """The caller's key, as the handler sees it."""
    return zrpc.current_call().caller


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """A broker key pair, one per identity in NAMES (all authorized), and ROLES beside them;
    the fixtures' status probe calls with the ops key (zrpc.status is an admin method)."""
    k = {name: keygen(tmp_path / name, name) for name in ("broker", *NAMES)}
    auth = tmp_path / "authorized"
    auth.mkdir()
    for name in NAMES:
        (auth / f"{name}.key").write_bytes(k[name][0].read_bytes())
    (auth / "roles.toml").write_text(ROLES)
    k["authorized"] = auth
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(k))
    return k


def kw(keys, who):
    return {"curve_server_key": str(keys["broker"][0]), "curve_secret": str(keys[who][1])}


def flags(keys, who):
    return ["--curve-server-key", str(keys["broker"][0]), "--curve-secret", str(keys[who][1])]


def z85(keys, who) -> str:
    return load_public(keys[who][0]).decode("ascii")


def _status_with(keys):
    def status(ep, timeout=0.5):
        try:
            with zrpc.Client([ep], timeout=timeout, **kw(keys, "ops")) as c:
                return c.call("zrpc", "status")
        except zrpc.ZrpcError:
            return None
    return status


def status(keys, ep):
    with zrpc.Client([ep], timeout=5, **kw(keys, "ops")) as c:
        return c.call("zrpc", "status")


def start_broker(cluster, keys, *args):
    """(frontend, process, monitor tap)."""
    mon = f"tcp://127.0.0.1:{free_port()}"
    ep = cluster.broker("--curve-secret", str(keys["broker"][1]), "--curve-authorized",
                        str(keys["authorized"]), "--monitor", mon, "--heartbeat-interval", INTERVAL,
                        *args)
    tap = MonitorTap(mon, curve=client_keys(keys["broker"][0], keys["monitor"][1]))
    tap.wait_metrics()
    return ep, cluster.procs.procs[-1], tap


def unauthorized(tap, what, service):
    hits = [e for _, e in tap.alerts("unauthorized", "event")
            if e["detail"].get("what") == what and e["detail"].get("service") == service]
    return hits[0] if hits else None


def test_a_worker_key_offering_a_service_it_may_not_serve_is_refused(cluster, keys):
    ep, _, tap = start_broker(cluster, keys)
    try:
        cluster.worker(ep, *flags(keys, "rogue"), wait=False, name="rogue-worker")
        alert = wait_until(lambda: unauthorized(tap, "serve", "calc"), 10, what="the refusal alerted")
        assert alert["subject"] == "rogue" and alert["detail"]["key"] == z85(keys, "rogue")
        assert "may not serve calc" in alert["detail"]["reason"]
        st = status(keys, ep)
        assert st["workers"] == [] and st["counters"]["unauthorized_workers"] >= 1
        with zrpc.Client([ep], timeout=5, **kw(keys, "app")) as c:
            with pytest.raises(zrpc.ServiceUnavailable):  # the rogue never got the service
                c.proxy("calc").add(1, 2)
        cluster.worker(ep, *flags(keys, "calc-worker"))  # the key that may: registered
        with zrpc.Client([ep], timeout=5, **kw(keys, "app")) as c:
            assert c.proxy("calc").add(1, 2) == 3
        st = status(keys, ep)
        assert [w["name"] for w in st["workers"]] != [] and len(st["workers"]) == 1
        # kept (heartbeated), not reconnecting in a loop: many intervals on, no new refusal
        refusals = st["counters"]["unauthorized_workers"]
        tap.wait_snapshots(2, time.monotonic())
        assert status(keys, ep)["counters"]["unauthorized_workers"] == refusals
    finally:
        tap.close()


def test_a_client_key_calling_a_service_it_may_not_is_answered_unauthorized(cluster, keys):
    ep, _, tap = start_broker(cluster, keys)
    try:
        cluster.worker(ep, *flags(keys, "calc-worker"))
        with zrpc.Client([ep], timeout=5, **kw(keys, "app")) as c:
            assert c.proxy("calc").add(1, 2) == 3
        before = status(keys, ep)
        with zrpc.Client([ep], timeout=5, **kw(keys, "plain")) as c:
            t0 = time.monotonic()
            with pytest.raises(zrpc.Unauthorized, match="may not call calc"):
                c.proxy("calc").add(1, 2)
            assert time.monotonic() - t0 < 2  # answered, not left to time out
        alert = wait_until(lambda: unauthorized(tap, "call", "calc"), 10, what="the refused call alerted")
        assert alert["subject"] == "plain" and alert["detail"]["key"] == z85(keys, "plain")
        after = status(keys, ep)
        assert after["counters"]["unauthorized_calls"] == 1
        # nothing reached the service: the dispatcher never saw it, the worker served nothing more
        served = [sum(w["served"] for w in s["workers"]) for s in (before, after)]
        assert served[0] == served[1] == 1
        assert after["counters"]["requests"] == before["counters"]["requests"]
    finally:
        tap.close()


def test_admin_methods_need_admin_and_ping_and_health_are_open(cluster, keys):
    ep, _, tap = start_broker(cluster, keys)
    try:
        with zrpc.Client([ep], timeout=5, **kw(keys, "app")) as c:
            with pytest.raises(zrpc.Unauthorized, match="admin method"):
                c.call("zrpc", "status")
            assert c.call("zrpc", "ping") == "pong"
            assert c.call("zrpc", "health")["status"] == "SERVING"
        wait_until(lambda: unauthorized(tap, "admin", "zrpc.status"), 10, what="the admin refusal")
        assert status(keys, ep)["broker"]["state"] == "active"  # ops is admin
    finally:
        tap.close()


def _calls_calc(keys, ep, who) -> bool | str:
    with zrpc.Client([ep], timeout=2, **kw(keys, who)) as c:
        try:
            return c.proxy("calc").add(1, 2) == 3
        except zrpc.Unauthorized:
            return False
        except zrpc.ServiceUnavailable:
            return "unavailable"


def test_sighup_grants_then_revokes_and_a_malformed_file_keeps_the_old_roles(cluster, keys):
    ep, broker, tap = start_broker(cluster, keys)
    roles = keys["authorized"] / "roles.toml"
    try:
        cluster.worker(ep, *flags(keys, "rogue"), wait=False, name="rogue-worker")
        wait_until(lambda: unauthorized(tap, "serve", "calc"), 10, what="the rogue refused")
        assert _calls_calc(keys, ep, "plain") is False
        # grant: plain may call calc, rogue may serve it; the refused rogue is asked back
        roles.write_text(ROLES.replace('serve = ["other"]', 'serve = ["calc"]')
                         + '\n[keys.plain]\ncall = ["calc"]\n')
        cluster.procs.signal(broker, signal.SIGHUP)
        cluster.wait_workers(ep, 1)
        assert status(keys, ep)["workers"][0]["name"]
        wait_until(lambda: _calls_calc(keys, ep, "plain") is True, 10, what="plain may call calc")
        # a malformed file: refused in one line, the roles in force stay
        roles.write_text("[keys.plain\ncall = ")
        cluster.procs.signal(broker, signal.SIGHUP)
        log = cluster.procs.child(broker).log
        wait_until(lambda: "keeping the old authorized keys and roles" in log.read_text(), 10,
                   what="the malformed roles file logged")
        assert _calls_calc(keys, ep, "plain") is True
        # revoke both: the rogue leaves, plain is refused again
        roles.write_text(ROLES)
        cluster.procs.signal(broker, signal.SIGHUP)
        cluster.wait_workers(ep, 0)
        wait_until(lambda: _calls_calc(keys, ep, "plain") is False, 10, what="plain refused again")
    finally:
        tap.close()


def test_a_malformed_roles_file_stops_the_start_with_one_line(keys):
    (keys["authorized"] / "roles.toml").write_text('[keys.nobody]\ncall = ["calc"]\n')
    p = subprocess.run([sys.executable, "-m", "zrpc", "broker", "--frontend",
                        f"tcp://127.0.0.1:{free_port()}", "--curve-secret", str(keys["broker"][1]),
                        "--curve-authorized", str(keys["authorized"])],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert "roles.toml" in line and "no nobody.key" in line


# --- the caller's key, on the wire -----------------------------------------------------------


class RawPeer:
    """A DEALER speaking ZRPC/1 with a key of the fixture (a worker or a client written from
    docs/protocol.md)."""

    def __init__(self, ctx, keys, who, ep):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        client_keys(keys["broker"][0], keys[who][1]).apply(self.sock)
        self.sock.connect(ep)

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(msg))

    def recv(self, kind, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = decode_frames(self.sock.recv_multipart())
                if isinstance(msg, kind):
                    return msg
        raise TimeoutError(f"no {kind.__name__} within {timeout}s")


def test_the_worker_sees_the_callers_key_and_never_a_claimed_one(cluster, keys):
    ep, _, tap = start_broker(cluster, keys)
    ctx = zmq.Context()
    try:
        worker = RawPeer(ctx, keys, "calc-worker", ep)
        worker.send(Ready("raw-calc", {"calc": {"add": True}}, 1, 1.0, {}))
        cluster.wait_workers(ep, 1)
        client = RawPeer(ctx, keys, "app", ep)
        for rid, headers in enumerate(({}, {"caller": z85(keys, "ops")}, {"caller": "anyone"}), 1):
            client.send(ClientRequest(rid, "calc", "add", {"budget_ms": 5000, **headers},
                                      pack_call((1, 2), {})))
            req = worker.recv(WorkerRequest)
            assert req.headers["caller"] == z85(keys, "app")  # the sender's key, whatever it said
            worker.send(WorkerReply(req.client_id, req.request_id, Status.OK, pack_result(3)))
            reply = client.recv(ClientReply)
            assert reply.request_id == rid and reply.status == Status.OK
        # a refused READY is answered with the reason, in a heartbeat
        rogue = RawPeer(ctx, keys, "rogue", ep)
        rogue.send(Ready("raw-rogue", {"calc": {"add": True}}, 1, 1.0, {}))
        hb = rogue.recv(Heartbeat)
        assert hb.sender == WORKER and "may not serve calc" in hb.info["refused"]
        client.send(ClientRequest(9, "billing", "charge", {"budget_ms": 5000}, pack_call((), {})))
        reply = client.recv(ClientReply)
        assert reply.status == Status.UNAUTHORIZED
        assert "may not call billing" in unpack_error(reply.body)["message"]
    finally:
        ctx.destroy(linger=0)
        tap.close()


def test_a_handler_sees_the_callers_key(cluster, keys):
    ep, _, tap = start_broker(cluster, keys)
    try:
        cluster.worker(ep, *flags(keys, "calc-worker"), spec="tests.integration.test_roles:whoami")
        with zrpc.Client([ep], timeout=5, **kw(keys, "app")) as c:
            assert c.call("whoami", "key") == z85(keys, "app")
        with zrpc.Client([ep], timeout=5, **kw(keys, "ops")) as c:
            assert c.call("whoami", "key") == z85(keys, "ops")
    finally:
        tap.close()


def test_a_key_removed_from_the_directory_is_cut_off_on_its_open_connection(cluster, keys):
    """ZAP judges a key at the handshake only: after SIGHUP the broker refuses what a removed
    key sends on the connection it already has (no roles file: every key may do everything)."""
    (keys["authorized"] / "roles.toml").unlink()
    ep, broker, tap = start_broker(cluster, keys)
    try:
        cluster.worker(ep, *flags(keys, "calc-worker"))
        with zrpc.Client([ep], timeout=3, **kw(keys, "app")) as c:
            assert c.proxy("calc").add(1, 2) == 3  # connected, and allowed
            (keys["authorized"] / "app.key").unlink()
            cluster.procs.signal(broker, signal.SIGHUP)
            log = cluster.procs.child(broker).log
            wait_until(lambda: log.read_text().count("reloaded") >= 1, 10, what="the keys reloaded")

            def refused() -> bool:
                try:
                    c.proxy("calc").add(1, 2)
                except zrpc.Unauthorized:
                    return True
                return False

            wait_until(refused, 10, what="the removed key refused on its open connection")
        assert _calls_calc(keys, ep, "plain") is True  # the others go on
    finally:
        tap.close()
