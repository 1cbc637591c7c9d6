"""Services for tests that run real worker processes (`zrpc worker tests.worker_services:bad`):
handlers whose errors or results cannot be encoded as they are; `twin`, whose processes can be
made slow or wrong (hedged and redundant calls)."""

from __future__ import annotations

import asyncio
import os
import time

import zrpc

bad = zrpc.Service("bad")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception has no text")


@bad.method
def surrogate() -> None:
    raise ValueError(os.fsdecode(b"caf\xe9"))  # a lone surrogate: not valid UTF-8


@bad.method
def unprintable() -> None:
    raise Unprintable()


@bad.method
def surrogate_result() -> object:
    return {"name": os.fsdecode(b"caf\xe9")}


@bad.method
async def async_surrogate() -> None:
    await asyncio.sleep(0)  # noqa: sleep (a real suspension point, as an async handler has)
    raise ValueError(os.fsdecode(b"caf\xe9"))


@bad.method
async def async_unprintable() -> None:
    await asyncio.sleep(0)  # noqa: sleep (a real suspension point, as an async handler has)
    raise Unprintable()


@bad.method
def add(a: int, b: int) -> int:
    return a + b


@bad.method
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)  # noqa: sleep (a real suspension point, as an async handler has)
    return a + b


twin = zrpc.Service("twin")
"""One service, processes that differ by their environment: ZRPC_TEST_DELAY (seconds) makes
`add` and `who` slow, ZRPC_TEST_SKEW (an integer) makes `add` wrong by that much."""


def _delay() -> None:
    delay = float(os.environ.get("ZRPC_TEST_DELAY", "0"))
    if delay:
        time.sleep(delay)  # noqa: sleep (a slow handler is the point)


@twin.method(name="add")
def twin_add(a: int, b: int) -> int:
    _delay()
    return a + b + int(os.environ.get("ZRPC_TEST_SKEW", "0"))


@twin.method
def who() -> int:
    """The process that answered."""
    _delay()
    return os.getpid()


@twin.method(idempotent=False)
def charge(account: str, delay: float = 0.0) -> int:
    """Not idempotent: each run appends a line to the file ZRPC_LEDGER names."""
    with open(os.environ["ZRPC_LEDGER"], "a") as f:
        f.write(f"{account} {os.getpid()}\n")
    time.sleep(delay)  # noqa: sleep (a slow handler is the point)
    return os.getpid()
