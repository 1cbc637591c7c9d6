"""CurveZMQ on real processes: keys, an authorized client and worker, refused strangers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

import zrpc
from tests.monitor_tap import MonitorTap
from zrpc._procs import REPO
from zrpc._security import keygen
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
    curve = zrpc._security.client_keys(keys["broker"][0], keys["monitor"][1])
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
    with zrpc.Client([ep], timeout=2) as c:
        with pytest.raises((zrpc.Unauthorized, zrpc.Timeout)):
            c.proxy("calc").add(1, 1)
    p = cli("call", "calc.add", "1", "2", "--brokers", ep, "--timeout", "2")
    assert p.returncode != 0 and "Traceback" not in p.stderr


def test_half_a_key_configuration_is_a_clear_error(keys):
    with pytest.raises(ValueError, match="both"):
        zrpc.Client(["tcp://127.0.0.1:1"], curve_secret=str(keys["client"][1]))
    p = cli("call", "calc.add", "--curve-secret", str(keys["client"][1]), "--brokers", "tcp://127.0.0.1:1")
    assert p.returncode != 0 and "both" in p.stderr and "Traceback" not in p.stderr
    p = cli("broker", "--curve-secret", str(keys["broker"][1]))
    assert p.returncode != 0 and "go together" in p.stderr
    p = cli("call", "calc.add", "--curve-secret", "/nonexistent", "--curve-server-key", "/nope")
    assert p.returncode != 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_curve_pair_settles_over_an_encrypted_state_link(cluster, keys, monkeypatch, client_factory):
    monkeypatch.setattr("tests.conftest.broker_status", _status_with(keys))
    pair = cluster.pair("--curve-secret", str(keys["broker"][1]), "--curve-authorized", str(keys["authorized"]))
    cluster.worker(pair.endpoints[0], "--brokers", pair.brokers, "--curve-server-key", str(keys["broker"][0]),
                   "--curve-secret", str(keys["worker"][1]))
    c = client_factory(pair.endpoints, timeout=5, **client_kw(keys, "client"))
    assert c.proxy("calc").add(1, 2) == 3
    wait_until(lambda: pair.states() == ["active", "passive"], 5)


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
