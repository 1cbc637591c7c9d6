"""CurveZMQ on real processes: keys, an authorized client and worker, refused strangers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

import zrpc
from tests import REPO
from tests.monitor_tap import MonitorTap
from tests.wire_tap import RecordingRelay
from zrpc._io._security import client_keys, keygen
from zrpc.testing import free_port, wait_until


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zrpc", *args], capture_output=True, text=True,
                          timeout=30, cwd=REPO)


@pytest.fixture
def keys(tmp_path):
    """broker/, authorized/ (client and worker public keys), and a stranger's keys."""
    k = {}
    for name in ("broker", "client", "worker", "monitor", "stranger"):
        k[name] = keygen(tmp_path / name, name)
    auth = tmp_path / "authorized"
    auth.mkdir()
    for name in ("client", "worker", "monitor"):
        (auth / f"{name}.key").write_bytes(k[name][0].read_bytes())
    k["authorized"] = auth
    return k


def test_keygen_cli_writes_a_pair_with_safe_modes(tmp_path):
    p = cli("keygen", str(tmp_path / "new" / "dir"), "--name", "alice")
    assert p.returncode == 0 and "alice.key" in p.stdout and "--curve-server-key" in p.stdout
    secret = tmp_path / "new" / "dir" / "alice.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    import zmq.auth

    public, none = zmq.auth.load_certificate(tmp_path / "new" / "dir" / "alice.key")
    public2, private = zmq.auth.load_certificate(secret)
    assert none is None and private and public == public2  # one pair: the public file is its half
    assert zmq.curve_public(private) == public
    again = cli("keygen", str(tmp_path / "new" / "dir"), "--name", "alice")
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr


def curve_broker(cluster, keys, *args):
    return cluster.broker("--curve-secret", str(keys["broker"][1]),
                          "--curve-authorized", str(keys["authorized"]), *args)


def client_kw(keys, who):
    return {"curve_server_key": str(keys["broker"][0]), "curve_secret": str(keys[who][1])}


def test_authorized_client_and_worker_call_through_a_curve_broker(cluster, keys, client_factory, monkeypatch):
    # the fixtures' status probe is a plain client: give it keys through the environment
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    ep = curve_broker(cluster, keys)
    cluster.worker(ep, "--curve-server-key", str(keys["broker"][0]), "--curve-secret", str(keys["worker"][1]))
    c = client_factory([ep], timeout=5, **client_kw(keys, "client"))
    assert c.proxy("calc").add(20, 22) == 42
    p = cli("call", "calc.add", "1", "2", "--brokers", ep, "--curve-server-key", str(keys["broker"][0]),
            "--curve-secret", str(keys["client"][1]))
    assert p.stdout.strip() == "3", p.stderr


def _status_with(keys):
    def status(ep, timeout=0.5):
        try:
            with zrpc.Client([ep], timeout=timeout, **client_kw(keys, "client")) as c:
                return c.call("zrpc", "status")
        except zrpc.ZrpcError:
            return None
    return status


def test_unknown_key_is_refused_and_raises_an_alert(cluster, keys, monkeypatch):
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    mon = f"tcp://127.0.0.1:{free_port()}"
    ep = curve_broker(cluster, keys, "--monitor", mon)
    curve = client_keys(keys["broker"][0], keys["monitor"][1])
    tap = MonitorTap(mon, curve=curve)
    try:
        tap.wait_metrics()  # the monitor's own key is authorized
        with zrpc.Client([ep], timeout=5, **client_kw(keys, "stranger")) as c:
            t0 = time.monotonic()
            with pytest.raises(zrpc.Unauthorized, match="refused"):
                c.proxy("calc").add(1, 1)
            assert time.monotonic() - t0 < 3  # told, not left to time out
        _, alert = tap.wait("unauthorized", "event")
        assert alert["subject"].startswith("127.0.0.1") and alert["severity"] == "warning"
    finally:
        tap.close()


def test_plain_client_against_a_curve_broker_is_refused(cluster, keys, monkeypatch):
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    ep = curve_broker(cluster, keys)
    # a worker is there: a call that got in would be answered, so a failure means refused
    cluster.worker(ep, "--curve-server-key", str(keys["broker"][0]), "--curve-secret", str(keys["worker"][1]))
    with zrpc.Client([ep], timeout=2) as c:
        with pytest.raises((zrpc.Unauthorized, zrpc.Timeout)):
            c.proxy("calc").add(1, 1)
    p = cli("call", "calc.add", "1", "2", "--brokers", ep, "--timeout", "2")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "Unauthorized" in p.stderr or "Timeout" in p.stderr, p.stderr


def test_half_a_key_configuration_is_a_clear_error(keys):
    with pytest.raises(ValueError, match="both"):
        zrpc.Client(["tcp://127.0.0.1:1"], curve_secret=str(keys["client"][1]))
    p = cli("call", "calc.add", "--curve-secret", str(keys["client"][1]), "--brokers", "tcp://127.0.0.1:1")
    assert p.returncode != 0 and "both" in p.stderr and "Traceback" not in p.stderr
    p = cli("broker", "--curve-secret", str(keys["broker"][1]))
    assert p.returncode != 0 and "go together" in p.stderr
    p = cli("call", "calc.add", "--curve-secret", "/nonexistent", "--curve-server-key", "/nope")
    assert p.returncode != 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr


# --- what an eavesdropper sees: a relay between the parties keeps every byte on the wire ----

MARKER = "plaintext-marker-5f1d2c9a"
"""A call's argument: with keys it must never cross the wire readable; without, it does (which
shows the capture would see it)."""


def _wire_of_a_call(cluster, keys, client_factory, curve: bool) -> tuple[bytes, bytes]:
    """(client <-> broker bytes, broker <-> worker bytes) of calc.echo(MARKER)."""
    ep = curve_broker(cluster, keys) if curve else cluster.broker()
    port = int(ep.rsplit(":", 1)[1])
    to_client, to_worker = RecordingRelay(free_port(), port), RecordingRelay(free_port(), port)
    try:
        wkeys = ["--curve-server-key", str(keys["broker"][0]), "--curve-secret", str(keys["worker"][1])]
        cluster.worker(ep, "--brokers", to_worker.endpoint, *(wkeys if curve else []))
        c = client_factory([to_client.endpoint], timeout=5, **(client_kw(keys, "client") if curve else {}))
        assert c.proxy("calc").echo(MARKER) == MARKER
        wire = to_client.captured(), to_worker.captured()
    finally:
        to_client.close()
        to_worker.close()
    assert all(len(w) > 200 for w in wire)  # the call did cross both relays
    return wire


def test_calls_are_encrypted_on_the_wire(cluster, keys, monkeypatch, client_factory):
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    for wire in _wire_of_a_call(cluster, keys, client_factory, curve=True):
        assert MARKER.encode() not in wire
        assert b"ZRPC1" not in wire and b"calc" not in wire  # heads are encrypted too


def test_without_keys_calls_are_readable_on_the_wire(cluster, keys, client_factory):
    """The control for the test above: the same capture does see a plaintext call."""
    to_client, to_worker = _wire_of_a_call(cluster, keys, client_factory, curve=False)
    assert MARKER.encode() in to_client and MARKER.encode() in to_worker
    assert b"ZRPC1C" in to_client and b"ZRPC1W" in to_worker


def _wire_of_the_monitor(cluster, keys, curve: bool) -> bytes:
    mon_port = free_port()
    args = ["--monitor", f"tcp://127.0.0.1:{mon_port}"]
    ep = curve_broker(cluster, keys, *args) if curve else cluster.broker(*args)
    relay = RecordingRelay(free_port(), mon_port)
    tap = MonitorTap(relay.endpoint, curve=client_keys(keys["broker"][0], keys["monitor"][1])
                     if curve else None)
    try:
        assert tap.wait_metrics()["broker"] == ep  # events arrive through the relay
        return relay.captured()
    finally:
        tap.close()
        relay.close()


def test_monitor_events_are_encrypted_on_the_wire(cluster, keys, monkeypatch):
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    wire = _wire_of_the_monitor(cluster, keys, curve=True)
    assert b"metrics" not in wire and b"broker_state" not in wire


def test_without_keys_monitor_events_are_readable_on_the_wire(cluster, keys):
    wire = _wire_of_the_monitor(cluster, keys, curve=False)
    assert b"metrics" in wire and b"broker_state" in wire


def _wire_of_a_settled_pair(cluster, monkeypatch, *args: str) -> bytes:
    import tests.conftest as fixtures  # its broker_status, as the test may have patched it

    monkeypatch.setattr(fixtures, "TcpRelay", RecordingRelay)  # pair(relay=True) records
    pair = cluster.pair(*args, relay=True)
    # several state messages have crossed: each broker has heard its peer say where it is
    wait_until(lambda: all((s or {}).get("broker", {}).get("peer_state") in ("active", "passive")
                           for s in (fixtures.broker_status(ep) for ep in pair.endpoints)), 10, what="peers heard")
    return b"".join(r.captured() for r in pair.relays)


def test_curve_pair_settles_over_an_encrypted_state_link(cluster, keys, monkeypatch, client_factory):
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    wire = _wire_of_a_settled_pair(cluster, monkeypatch, "--curve-secret", str(keys["broker"][1]),
                                   "--curve-authorized", str(keys["authorized"]))
    assert len(wire) > 200 and b"ZRPC1S" not in wire and b"passive" not in wire
    pair = cluster.pairs[-1]
    cluster.worker(pair.endpoints[0], "--brokers", pair.brokers, "--curve-server-key", str(keys["broker"][0]),
                   "--curve-secret", str(keys["worker"][1]))
    c = client_factory(pair.endpoints, timeout=5, **client_kw(keys, "client"))
    assert c.proxy("calc").add(1, 2) == 3
    wait_until(lambda: pair.states() == ["active", "passive"], 5)


def test_without_keys_the_state_link_is_readable_on_the_wire(cluster, monkeypatch):
    wire = _wire_of_a_settled_pair(cluster, monkeypatch)
    assert b"ZRPC1S" in wire and b"passive" in wire


def test_refused_worker_says_why_in_its_log(cluster, keys, monkeypatch, tmp_path):
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    ep = curve_broker(cluster, keys)
    cluster.worker(ep, "--curve-server-key", str(keys["broker"][0]), "--curve-secret",
                   str(keys["stranger"][1]), wait=False, name="refused-worker")
    log = cluster.procs.log_dir / "refused-worker.log"
    wait_until(lambda: log.exists() and "refused this worker" in log.read_text(), 10,
               what="the refusal in the worker's log")


def test_async_client_with_an_unknown_key_gets_unauthorized(cluster, keys, monkeypatch):
    import asyncio

    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    ep = curve_broker(cluster, keys)

    async def main():
        async with zrpc.AsyncClient([ep], timeout=5, **client_kw(keys, "stranger")) as c:
            with pytest.raises(zrpc.Unauthorized):
                await c.proxy("calc").add(1, 1)
        async with zrpc.AsyncClient([ep], timeout=5, **client_kw(keys, "client")) as c:
            with pytest.raises(zrpc.ServiceUnavailable):  # let in: no worker, but an answer
                await c.proxy("calc").add(1, 1)

    asyncio.run(main())
