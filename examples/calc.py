"""A small service to try zrpc with: `zrpc worker examples.calc:calc`."""

from __future__ import annotations

import asyncio
import os
import time

import zrpc

calc = zrpc.Service("calc")


@calc.method(inline=True)  # microseconds, no I/O: run on the worker's I/O thread
def add(a: int, b: int) -> int:
    return a + b


@calc.method(inline=True)
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
def slow_add(a: int, b: int, delay: float = 0.1) -> int:
    time.sleep(delay)
    return a + b


@calc.method
def burn(seconds: float) -> int:
    """Pure-Python CPU work (holds the GIL between switches): a busy worker, not a dead one."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


@calc.method
def whoami() -> dict[str, int]:
    return {"pid": os.getpid()}


@calc.method(idempotent=False)
def charge(account: str, cents: int, delay: float = 0.0) -> dict[str, object]:
    """Not idempotent: never executed twice, even across failover. Appends to a ledger
    file when ZRPC_LEDGER is set, so tests can prove it."""
    ledger = os.environ.get("ZRPC_LEDGER")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{account} {cents} {os.getpid()}\n")
    time.sleep(delay)
    return {"account": account, "charged": cents, "pid": os.getpid()}


@calc.method
async def slow_square(x: float, delay: float = 0.01) -> float:
    await asyncio.sleep(delay)
    return x * x
