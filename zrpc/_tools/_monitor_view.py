"""`zrpc monitor`: live alerts and metrics from both brokers' monitor sockets, shown as
coloured lines or JSON, and handed to a command (--exec) or a webhook (--webhook)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import msgpack
import zmq

from zrpc import _defaults as D
from zrpc._io._security import CurveKeys
from zrpc._io._sockets import SocketOptions, make_socket

LOCAL_MONITORS = D.LOCAL_MONITORS


class EventFeed:
    """Subscribes to monitor endpoints in a background thread and keeps every event with its
    arrival time (for `zrpc demo` and tests)."""

    def __init__(self, *endpoints: str, curve: CurveKeys | None = None) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sub = make_socket(self._ctx, zmq.SUB, options=SocketOptions(curve=curve))
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        for ep in endpoints:
            self._sub.connect(ep)
        self._thread = threading.Thread(target=self._run, name="zrpc-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sub.poll(50):
                continue
            frames = self._sub.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                ev = msgpack.unpackb(frames[1], raw=False)
            except Exception:
                continue
            with self._lock:
                self.events.append((time.monotonic(), frames[0].decode(errors="replace"), ev))

    def alerts(self, name: str | None = None, state: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, e) for t, topic, e in self.events if topic.startswith("alert.")
                    and (name is None or topic == "alert." + name) and (state is None or e.get("state") == state)]

    def latest_metrics(self) -> dict[str, Any] | None:
        with self._lock:
            for _, topic, e in self.events[::-1]:  # (reversed() loses the type)
                if topic == "metrics" and e.get("broker_state") == "active":
                    return e
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sub.close(linger=0)
        self._ctx.term()
STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def run_exec(cmd: str, event: dict[str, Any], timeout: float = 10.0) -> str | None:
    """Runs CMD with the event as JSON on stdin; returns an error description or None."""
    try:
        p = subprocess.run(cmd, shell=True, input=json.dumps(event).encode(), capture_output=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"--exec {cmd!r} ran longer than {timeout:g}s"
    except OSError as exc:
        return f"--exec {cmd!r}: {exc}"
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"--exec {cmd!r} exited {p.returncode}: {err[0]}"
    return None


def post_webhook(url: str, event: dict[str, Any], timeout: float = 5.0, attempts: int = 3) -> str | None:
    """POSTs the event as JSON; bounded retries with backoff; returns an error or None."""
    data = json.dumps(event).encode()
    last = ""
    for attempt in range(attempts):
        req = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if 200 <= resp.status < 300:
                    return None
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.5 * 2**attempt)  # noqa: sleep (retry backoff)
    return f"--webhook {url}: {last} after {attempts} attempts"


def _line(topic: str, ev: dict[str, Any]) -> tuple[str, str]:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.get("time", time.time())))
    where = f"[{ev.get('member') or ev.get('role')}/{ev.get('broker_state')}]"  # as the broker logs
    if topic == "metrics":
        parts = [f"{name} {s['calls_s']:.0f}/s p99 {s['p99_ms'] if s['p99_ms'] is not None else '-'}ms "
                 f"q{s['queued']} w{s['workers']}" for name, s in sorted(ev.get("services", {}).items())]
        return f"{stamp} metrics {where} " + (" | ".join(parts) or "no services"), "dim"
    state = ev.get("state", "")
    detail = " ".join(f"{k}={v}" for k, v in ev.get("detail", {}).items())
    style = "green" if state == "resolved" else STYLE.get(ev.get("severity", ""), "")
    return (f"{stamp} {ev.get('severity', '').upper():8} {ev.get('name', topic):20} {state:8} "
            f"{ev.get('subject', '')} {where} {detail}", style)


REFRESH_EVERY = 2.0
"""Seconds between two looks at a cluster's members (`zrpc monitor --cluster`)."""


def watch(endpoints: Sequence[str], *, as_json: bool, exec_cmd: str | None, webhook: str | None,
          metrics: bool, count: int | None, duration: float | None, curve: CurveKeys | None = None,
          refresh: Callable[[], Sequence[str]] | None = None) -> int:
    """Prints the brokers' events until Ctrl-C, `count` alerts or `duration`; `refresh` (a
    cluster's monitor endpoints, read again every REFRESH_EVERY) follows members that join
    and leave (an OSError from it keeps the endpoints last seen)."""
    from rich.console import Console

    console = Console(highlight=False)
    ctx = zmq.Context()
    sub = make_socket(ctx, zmq.SUB, options=SocketOptions(curve=curve))
    sub.setsockopt(zmq.SUBSCRIBE, b"alert.")
    if metrics:
        sub.setsockopt(zmq.SUBSCRIBE, b"metrics")
    for ep in endpoints:
        sub.connect(ep)
    click.echo(f"monitor: listening to {', '.join(endpoints) or 'no broker yet'} (Ctrl-C stops)", err=True)
    listening = set(endpoints)
    next_refresh = time.monotonic() + REFRESH_EVERY
    refresh_failed = False
    pool = ThreadPoolExecutor(4) if exec_cmd or webhook else None
    seen_alerts = 0
    deadline = time.monotonic() + duration if duration else None

    def hand_off(ev: dict[str, Any]) -> None:
        for err in (run_exec(exec_cmd, ev) if exec_cmd else None,
                    post_webhook(webhook, ev) if webhook else None):
            if err:
                click.echo(f"monitor: {err}", err=True)

    try:
        while count is None or seen_alerts < count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if refresh is not None and time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + REFRESH_EVERY
                try:
                    now = set(refresh())
                except OSError as exc:
                    if not refresh_failed:
                        click.echo(f"monitor: {exc}; listening to the brokers last seen", err=True)
                    refresh_failed = True
                else:
                    refresh_failed = False
                    for ep in sorted(now - listening):
                        sub.connect(ep)
                        click.echo(f"monitor: a broker joined: listening to {ep} too", err=True)
                    for ep in sorted(listening - now):
                        sub.disconnect(ep)
                        click.echo(f"monitor: the broker at {ep} left the cluster", err=True)
                    listening = now
            if not sub.poll(200 if left is None else int(min(left, 0.2) * 1000) + 1):
                continue
            frames = sub.recv_multipart()
            if len(frames) != 2:
                continue
            topic = frames[0].decode(errors="replace")
            try:
                ev = msgpack.unpackb(frames[1], raw=False)
            except Exception:
                click.echo("monitor: dropped an undecodable event", err=True)
                continue
            if not isinstance(ev, dict):
                continue
            if as_json:
                click.echo(json.dumps({"topic": topic, **ev}, default=str))
                sys.stdout.flush()
            else:
                text, style = _line(topic, ev)
                console.print(text, style=style, soft_wrap=True)
            if topic.startswith("alert."):
                seen_alerts += 1
                if pool is not None:
                    pool.submit(hand_off, ev)
    except KeyboardInterrupt:
        pass
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        sub.close(linger=0)
        ctx.term()
    return 0
