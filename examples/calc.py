"""A small service to try zrpc with: `zrpc worker examples.calc:calc`."""

from __future__ import annotations

import asyncio
import os
import time

import zrpc

calc = zrpc.Service("calc")


@calc.method
def add(a: int, b: int) -> int:
    return a + b


@calc.method
def echo(value: object) -> object:
    return value


@calc.method
def div(a: float, b: float) -> float:
    return a / b


@calc.method
def sleep(seconds: float) -> float:
    """Holds a worker slot for `seconds` (for timeouts, queues and drains)."""
    time.sleep(seconds)
    return seconds


@calc.method
def whoami() -> dict:
    return {"pid": os.getpid()}


@calc.method(idempotent=False)
def charge(account: str, cents: int) -> dict:
    """Not idempotent: never executed twice, even across failover. Appends to a ledger
    file when ZRPC_LEDGER is set, so tests can prove it."""
    ledger = os.environ.get("ZRPC_LEDGER")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{account} {cents} {os.getpid()}\n")
    return {"account": account, "charged": cents, "pid": os.getpid()}


@calc.method
async def slow_square(x: float, delay: float = 0.01) -> float:
    await asyncio.sleep(delay)
    return x * x
