"""A client whose constructor fails leaves nothing behind: no socket (its context terminates:
`term()` would block on one left open), no thread, no etcd follower."""

from __future__ import annotations

import asyncio
import threading

import pytest

import zrpc
from zrpc._io import _async_client, _client


class Broken:
    stopped = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def start(self) -> None:
        raise RuntimeError("etcd follower could not start")

    def stop(self) -> None:
        Broken.stopped += 1


@pytest.mark.parametrize("module", [_client, _async_client])
def test_a_failed_constructor_releases_what_it_made(monkeypatch, module):
    monkeypatch.setattr(module, "ClusterFollower", Broken)
    before = threading.active_count()
    Broken.stopped = 0

    def make() -> None:
        if module is _client:
            with pytest.raises(RuntimeError, match="could not start"):
                zrpc.Client(cluster="etcd://127.0.0.1:1")
        else:
            async def main() -> None:
                with pytest.raises(RuntimeError, match="could not start"):
                    zrpc.AsyncClient(cluster="etcd://127.0.0.1:1")

            asyncio.run(main())

    runner = threading.Thread(target=make, daemon=True)
    runner.start()
    runner.join(10)  # a socket left open would block its context's term() forever
    assert not runner.is_alive(), "the failed constructor left a socket open"
    assert Broken.stopped == 1
    assert threading.active_count() <= before
