"""The service the network scenarios call (`zrpc worker tests.netchaos._services:net`): every
result names the worker process that ran it, so a test can tell which host served a call."""

from __future__ import annotations

import os
import time

import zrpc

net = zrpc.Service("net")


@net.method(inline=True)
def add(a: int, b: int) -> dict[str, int]:
    return {"sum": a + b, "pid": os.getpid()}


@net.method
def hold(a: int, b: int, seconds: float) -> dict[str, int]:
    """Keeps a worker slot for `seconds`: calls are in flight when a fault strikes."""
    time.sleep(seconds)  # noqa: sleep (the work itself)
    return {"sum": a + b, "pid": os.getpid()}


@net.method(idempotent=False)
def charge(token: str) -> dict[str, object]:
    """Not idempotent: one line `token pid` per execution in ZRPC_LEDGER, so that a test can
    count executions."""
    ledger = os.environ.get("ZRPC_LEDGER")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{token} {os.getpid()}\n")
    return {"token": token, "pid": os.getpid()}
