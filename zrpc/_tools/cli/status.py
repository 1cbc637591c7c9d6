"""`zrpc status`: what the brokers know right now (roles, services, workers, queues, alerts), as
tables or as one JSON object for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from zrpc._errors import ZrpcError
from zrpc._tools.cli._options import broker_endpoints, brokers_option, curve_client_options

TIMEOUT = 2.0
"""Seconds `zrpc status` waits for each broker: a live one answers at once, a dead one must not
hold up the other's answer for long."""


def fetch_status(endpoints: Sequence[str], timeout: float, **keys: Any) -> dict[str, Any]:
    """Asks each broker for zrpc.status; merges into the `zrpc status --json` shape."""
    from zrpc._io._client import Client

    brokers: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for ep in endpoints:
        with Client([ep], timeout=timeout, **keys) as c:
            try:
                st = c.call("zrpc", "status")
            except ZrpcError as exc:
                brokers.append({"endpoint": ep, "role": None, "state": "unreachable",
                                "peer_state": None, "error": str(exc)})
                continue
        info = dict(st["broker"])
        info["endpoint"] = ep
        info["counters"] = st.get("counters", {})
        brokers.append(info)
        if best is None or info.get("state") == "active":
            best = st
    return {"brokers": brokers, "services": (best or {}).get("services", []),
            "workers": (best or {}).get("workers", []), "alerts": (best or {}).get("alerts", [])}


@click.command("status")
@brokers_option
@click.option("--timeout", type=click.FloatRange(0.01, 600), default=TIMEOUT, show_default=True,
              help="Seconds to wait for each broker.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--watch", "watch_s", type=click.FloatRange(0.2, 3600), is_flag=False, flag_value=1.0,
              default=None, metavar="[SECONDS]", help="Refresh every SECONDS (default 1) until Ctrl-C.")
@curve_client_options
def command(brokers: str | None, timeout: float, as_json: bool, watch_s: float | None,
            curve_server_key: str | None, curve_secret: str | None) -> None:
    """Show brokers (role, state, peer), services, workers (outstanding calls, latency,
    phi suspicion), queues and the alerts in force."""
    eps = broker_endpoints(brokers)
    keys = {"curve_server_key": curve_server_key, "curve_secret": curve_secret}
    if watch_s is not None and not as_json:
        _watch_status(eps, timeout, watch_s, keys)
        return
    st = fetch_status(eps, timeout, **keys)
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        from rich.console import Console

        Console().print(status_view(st))
    if all(b["state"] == "unreachable" for b in st["brokers"]):
        click.echo(f"error: no broker answered at {', '.join(eps)} within {timeout:g}s "
                   "(is one running? see `zrpc pair --help`)", err=True)
        sys.exit(1)


def _watch_status(eps: list[str], timeout: float, every: float, keys: dict[str, Any]) -> None:
    import time

    from rich.live import Live

    try:
        with Live(status_view(fetch_status(eps, timeout, **keys)), auto_refresh=False) as live:
            while True:
                time.sleep(every)  # noqa: sleep (the refresh period)
                live.update(status_view(fetch_status(eps, timeout, **keys)), refresh=True)
    except KeyboardInterrupt:
        pass


def status_view(st: dict[str, Any]) -> Any:
    """The `zrpc status` tables (rich) for the merged status."""
    from rich.console import Group
    from rich.table import Table

    t = Table(title="brokers", title_justify="left")
    for col in ("endpoint", "role", "state", "peer", "epoch", "pid", "uptime", "restarts",
                "internal errors"):
        t.add_column(col)
    for b in st["brokers"]:
        style = {"active": "green", "unreachable": "red"}.get(str(b["state"]), "")
        restarts = b.get("restarts")
        internal = b.get("counters", {}).get("internal_errors")
        t.add_row(b["endpoint"], str(b.get("role") or "-"), f"[{style}]{b['state']}[/]" if style else str(b["state"]),
                  str(b.get("peer_state") or "-"), str(b.get("epoch") if b.get("epoch") is not None else "-"),
                  str(b.get("pid", "-")), f"{b['uptime_s']:.0f}s" if "uptime_s" in b else "-",
                  "-" if restarts is None else f"[yellow]{restarts}[/]" if restarts else "0",
                  "-" if internal is None else f"[red]{internal}[/]" if internal else "0")
    parts: list[Any] = [t]
    t = Table(title="services", title_justify="left")
    for col in ("service", "workers", "outstanding", "queued", "calls", "errors"):
        t.add_column(col, justify="left" if col == "service" else "right")
    for s in st["services"]:
        t.add_row(s["name"], str(s["workers"]), str(s["outstanding"]), str(s["queued"]),
                  str(s.get("calls", "-")), str(s.get("errors", "-")))
    parts.append(t)
    t = Table(title="workers", title_justify="left")
    for col in ("worker", "services", "capacity", "outstanding", "ewma ms", "phi", "served", "errors"):
        t.add_column(col, justify="left" if col in ("worker", "services") else "right")
    for w in st["workers"]:
        flags = "".join(f" ({f})" for f in ("leaving", "ejected") if w.get(f))
        t.add_row(w["name"] + flags, ",".join(w["services"]), str(w["capacity"]), str(w["outstanding"]),
                  f"{w['ewma_ms']:.2f}", f"{w.get('phi', 0):.1f}", str(w["served"]), str(w["errors"]))
    parts.append(t)
    if st.get("alerts"):
        t = Table(title="alerts in force", title_justify="left")
        for col in ("severity", "alert", "subject", "detail"):
            t.add_column(col)
        for a in st["alerts"]:
            t.add_row(a["severity"], a["name"], a["subject"],
                      " ".join(f"{k}={v}" for k, v in a.get("detail", {}).items()))
        parts.append(t)
    return Group(*parts)
