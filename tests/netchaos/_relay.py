"""A TCP relay that delays, for kernels without sch_netem: run inside a host, it forwards each
local port to a remote address and, while delaying, holds every chunk delay ± jitter in each
direction (in order: a chunk never overtakes the one before it).

`python -m tests.netchaos._relay --route 15555=10.213.0.1:5555 --delay 0.05 --jitter 0.01`;
it starts without delay, SIGUSR1 turns the delay on, SIGUSR2 off, SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from collections.abc import Awaitable, Callable

CHUNK = 65536


class Delay:
    def __init__(self, seconds: float, jitter: float) -> None:
        self.seconds = seconds
        self.jitter = jitter
        self.on = False
        self.rng = random.Random()

    def next(self) -> float:
        if not self.on:
            return 0.0
        return max(0.0, self.seconds + self.rng.uniform(-self.jitter, self.jitter))


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            at, data = await held.get()
            if not data:
                break
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # noqa: sleep (the delay itself)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(release())
    last = 0.0
    try:
        while data := await reader.read(CHUNK):
            last = max(last, loop.time() + delay.next())
            held.put_nowait((last, data))
    except (ConnectionError, OSError):
        pass
    held.put_nowait((0.0, b""))
    try:
        await sender
    except (ConnectionError, OSError):
        pass
    writer.close()


async def serve(routes: list[tuple[int, str, int]], delay: Delay) -> None:
    async def handler(host: str, target: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, target)
        except OSError:
            w.close()
            return
        try:
            await asyncio.gather(pump(r, uw, delay), pump(ur, w, delay))
        except asyncio.CancelledError:
            # the relay is stopping: end quietly (a cancelled connection task makes asyncio's
            # stream callback log a traceback on 3.11)
            for writer in (w, uw):
                writer.close()

    def serving(host: str, target: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                    Awaitable[None]]:
        return lambda r, w: handler(host, target, r, w)

    servers = [await asyncio.start_server(serving(h, t), "127.0.0.1", p) for p, h, t in routes]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def switch(on: bool) -> None:
        delay.on = on
        print(f"relay: delay {'on' if on else 'off'} ({delay.seconds * 1000:.0f} ms "
              f"± {delay.jitter * 1000:.0f} ms)", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, switch, True)
    loop.add_signal_handler(signal.SIGUSR2, switch, False)
    print("relay: ready " + ", ".join(f"127.0.0.1:{p} -> {h}:{t}" for p, h, t in routes), flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--route", action="append", required=True, help="LOCALPORT=HOST:PORT")
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--jitter", type=float, default=0.01)
    args = ap.parse_args()
    routes = []
    for r in args.route:
        local, _, remote = r.partition("=")
        host, _, port = remote.rpartition(":")
        routes.append((int(local), host, int(port)))
    asyncio.run(serve(routes, Delay(args.delay, args.jitter)))


if __name__ == "__main__":
    main()
