"""Scenario 7: both brokers started with the same `--role` on their two hosts. Neither serves
(two backups never do; two primaries do not while they hear each other), and each says why:
a `role_conflict` alert on its monitor socket and among the alerts in force of its zrpc.status,
which `zrpc status` prints; a call ends in Timeout instead of hanging silently."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.netchaos._lab import PEER_TIMEOUT, SLACK, Broker, Lab

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CALL_TIMEOUT = 2.0


@pytest.mark.parametrize("role", ["primary", "backup"])
def test_two_brokers_with_one_role_say_role_conflict(lab: Lab, role: str) -> None:
    t0 = time.monotonic()
    a, b = lab.pair((role, role), settle=False)
    lab.worker("d")

    def published(x: Broker) -> list[tuple[float, dict[str, Any]]]:
        # in_force: raised before its witness's subscription reached the broker (a PUB drops
        # what it sent before a subscriber joined; the broker repeats what is in force to it)
        return [r for r in x.alerts("role_conflict") if r[1]["state"] in ("raised", "in_force")]

    lab.wait(lambda: all(any(x.startswith("role_conflict:") for x in y.now().get("alerts", [])) for y in (a, b)),
             PEER_TIMEOUT + SLACK, what="role_conflict in force on both brokers")
    # the alert may reach a witness after the status that shows it in force: each its own way
    lab.wait(lambda: all(published(x) for x in (a, b)), SLACK, what="role_conflict published by both brokers")
    for x in (a, b):
        raised = published(x)
        assert raised[0][1]["detail"]["peer_role"] == role

    code, out = lab.once("e", "call", "net.add", "1", "2", "--brokers", ",".join(lab.endpoints), "--timeout",
                         str(CALL_TIMEOUT), "--json", name="call")
    answer = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and answer["error"]["type"] == "Timeout", out

    code, shown = lab.once("e", "status", "--brokers", ",".join(lab.endpoints), name="status")
    assert code == 0, shown
    assert "role_conflict" in shown, shown
    code, raw = lab.once("e", "status", "--json", "--brokers", ",".join(lab.endpoints), name="status-json")
    st = json.loads(raw[raw.index("{"):])
    states = [x["state"] for x in st["brokers"]]
    assert states == [role, role], states
    for x in (a, b):
        assert x.first(lambda s: s["serving"] or s["state"] in ("active", "passive"), t0) is None, \
            f"{x.host} served or changed state: {x!r}"
    print(f"\ntwo {role} brokers: both stay {role}, never serving; role_conflict in force on both; a call ends "
          f"Timeout after {CALL_TIMEOUT:g}s; `zrpc status` shows:\n{shown}")
