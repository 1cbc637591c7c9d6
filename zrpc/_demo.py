"""`zrpc demo`: a broker and workers of examples/calc.py on this machine, calls, and what happened."""

from __future__ import annotations

import collections
import time
from typing import Any

import click

from ._client import Client
from ._errors import RemoteError, ZrpcError
from ._procs import Processes, free_port, wait_until


def _say(plain: bool, text: str, **style: Any) -> None:
    click.echo(text if plain else click.style(text, **style))


def _status(ep: str) -> dict[str, Any] | None:
    try:
        with Client([ep], timeout=0.5) as c:
            return c.call("zrpc", "status")  # type: ignore[no-any-return]
    except ZrpcError:
        return None


def run_demo(plain: bool = False) -> int:
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    with Processes() as procs:
        _say(plain, f"starting a broker on {ep}", bold=True)
        procs.zrpc("broker", "--frontend", ep, "--log-level", "warning")
        wait_until(lambda: _status(ep), 10, what="broker answering")
        _say(plain, "starting 2 workers of examples.calc:calc", bold=True)
        workers = [procs.zrpc("worker", "examples.calc:calc", "--brokers", ep, "--log-level", "warning")
                   for _ in range(2)]
        wait_until(lambda: len((_status(ep) or {}).get("workers", [])) == 2, 10,
                   what="2 workers registered")
        failures = 0
        with Client([ep], timeout=5) as client:
            calc = client.proxy("calc")
            _say(plain, f"calc.add(1, 2) -> {calc.add(1, 2)}")
            t0 = time.perf_counter()
            pids: collections.Counter[int] = collections.Counter()
            for _ in range(10):  # 200 in flight at a time: the broker queues at most 1000
                futures = [calc.whoami.future() for _ in range(200)]
                pids.update(f.result()["pid"] for f in futures)
            dt = time.perf_counter() - t0
            _say(plain, f"2000 pipelined calls in {dt:.2f}s ({2000 / dt:,.0f} calls/s), "
                        f"spread over workers: {dict(pids)}")
            try:
                calc.div(1, 0)
            except RemoteError as exc:
                _say(plain, f"calc.div(1, 0) -> RemoteError {exc.remote_type}: {exc.message}")
            try:
                client.call("nosuch", "thing")
            except ZrpcError as exc:
                _say(plain, f"nosuch.thing() -> {type(exc).__name__}: {exc}")
            slow = [calc.sleep.future(0.5) for _ in range(4)]
            _say(plain, "4 calls of calc.sleep(0.5) in flight; SIGTERM to a worker: it drains them")
            wait_until(lambda: sum(w["outstanding"] for w in (_status(ep) or {}).get("workers", [])) >= 4,
                       5, what="calls in flight")
            procs.terminate(workers[0])
            done = 0
            for f in slow:
                try:
                    f.result()
                    done += 1
                except ZrpcError as exc:
                    failures += 1
                    _say(plain, f"lost: {exc}", fg="red")
            _say(plain, f"{done}/4 slow calls completed across the drain")
            st = _status(ep) or {}
            _say(plain, f"workers now registered: {len(st.get('workers', []))}")
        _say(plain, "stopping everything", bold=True)
        for p in procs.procs:
            procs.terminate(p, timeout=5)
    _say(plain, f"summary: failures={failures}", fg="green" if failures == 0 else "red", bold=True)
    return 0 if failures == 0 else 1
