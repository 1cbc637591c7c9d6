"""Services for tests that run real worker processes (`zrpc worker tests.worker_services:bad`):
handlers whose errors or results cannot be encoded as they are."""

from __future__ import annotations

import asyncio
import os

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
