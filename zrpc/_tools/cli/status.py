"""`zrpc status`: what the brokers know right now (roles, services, workers, queues, alerts), as
tables or as one JSON object for scripts; for a cluster, every member etcd lists; for brokers
started with --elect, the election (holder, epoch, lease time left)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import click

from zrpc import _defaults as D
from zrpc._errors import ZrpcError
from zrpc._tools.cli._options import (
    brokers_option,
    brokers_or_cluster,
    cluster_name_option,
    cluster_option,
    curve_client_options,
)

TIMEOUT = 2.0
"""Seconds `zrpc status` waits for each broker: a live one answers at once, a dead one must not
hold up the other's answer for long."""


def _ask(ep: str, timeout: float, keys: dict[str, Any]) -> dict[str, Any] | str:
    """One broker's zrpc.status, or why it did not answer."""
    from zrpc._io._client import Client

    with Client([ep], timeout=timeout, **keys) as c:
        try:
            st: dict[str, Any] = c.call("zrpc", "status")
        except ZrpcError as exc:
            return str(exc)
    return st


def fetch_status(endpoints: Sequence[str], timeout: float, **keys: Any) -> dict[str, Any]:
    """Asks each broker for zrpc.status; merges into the `zrpc status --json` shape."""
    brokers: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for ep in endpoints:
        st = _ask(ep, timeout, keys)
        if isinstance(st, str):
            brokers.append({"endpoint": ep, "role": None, "state": "unreachable",
                            "peer_state": None, "error": st})
            continue
        info = dict(st["broker"])
        info["endpoint"] = ep
        info["counters"] = st.get("counters", {})
        for part in ("election", "cluster"):  # an elected broker's, or a cluster member's view
            if part in st:
                info[part] = st[part]
        brokers.append(info)
        if best is None or info.get("state") == "active":
            best = st
    out = {"brokers": brokers, "services": (best or {}).get("services", []),
           "workers": (best or {}).get("workers", []), "alerts": (best or {}).get("alerts", [])}
    election = _election(brokers)
    if election is not None:
        out["election"] = election
    return out


def _election(brokers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The election as the brokers see it (--elect): the holder's own view if it answered,
    else the freshest one (the highest epoch); None when no broker stands in one."""
    views = [b["election"] for b in brokers if isinstance(b.get("election"), dict)]
    if not views:
        return None
    held = [v for v in views if v.get("state") == "active"]
    best = held[0] if held else max(views, key=lambda v: v.get("epoch") or 0)
    return {k: best.get(k) for k in ("name", "holder", "epoch", "lease_left_s", "state")} | {
        "active": len(held), "key": best.get("key")}


SUMMED = ("workers", "outstanding", "queued", "calls", "errors")
"""A service's figures that add up over the members of a cluster."""


def fetch_cluster_status(url: str, cluster_name: str, timeout: float, **keys: Any) -> dict[str, Any]:
    """Every member etcd lists, each asked for zrpc.status: one entry per member under
    `brokers` (with its lease), services summed over the members, every member's workers and
    alerts (each naming its broker). OSError when etcd does not answer."""
    from zrpc._core._membership import brokers_prefix, parse_cluster
    from zrpc._io._etcd import EtcdError, read_members

    try:
        members = read_members(parse_cluster(url), brokers_prefix(cluster_name),
                               timeout=min(timeout, D.ETCD_TIMEOUT))
    except EtcdError as exc:
        raise OSError(f"cannot read cluster {cluster_name!r} from etcd at {url}: {exc}") from None
    brokers: list[dict[str, Any]] = []
    services: dict[str, dict[str, Any]] = {}
    workers: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    for m in sorted(members, key=lambda m: str(m["name"])):
        name, ep = str(m["name"]), str(m.get("frontend") or "")
        lease = {"lease_ttl_s": m.get("lease_ttl_s"), "lease_age_s": m.get("lease_age_s")}
        st = _ask(ep, timeout, keys) if ep else "registered without a frontend"
        if isinstance(st, str):
            brokers.append({"name": name, "endpoint": ep, "role": None, "state": "unreachable",
                            "peer_state": None, **lease, "error": st})
            continue
        info = {**st["broker"], "name": name, "endpoint": ep, **lease,
                "etcd": st.get("cluster", {}).get("etcd"),
                "members": st.get("cluster", {}).get("members"), "counters": st.get("counters", {})}
        brokers.append(info)
        for svc in st.get("services", []):
            total = services.get(svc["name"])
            if total is None:
                services[svc["name"]] = {**svc, "brokers": [name]}
                continue
            total["brokers"].append(name)
            for k in SUMMED:
                if isinstance(svc.get(k), int) and isinstance(total.get(k), int):
                    total[k] += svc[k]
        workers.extend({**w, "broker": name} for w in st.get("workers", []))
        alerts.extend({**a, "broker": name} for a in st.get("alerts", []))
    return {"cluster": {"name": cluster_name, "etcd": url, "members": [b["name"] for b in brokers]},
            "brokers": brokers, "services": sorted(services.values(), key=lambda s: str(s["name"])),
            "workers": workers, "alerts": alerts}


@click.command("status")
@brokers_option
@cluster_option
@cluster_name_option
@click.option("--timeout", type=click.FloatRange(0.01, 600), default=TIMEOUT, show_default=True,
              help="Seconds to wait for each broker.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--watch", "watch_s", type=click.FloatRange(0.2, 3600), is_flag=False, flag_value=1.0,
              default=None, metavar="[SECONDS]", help="Refresh every SECONDS (default 1) until Ctrl-C.")
@curve_client_options
def command(brokers: str | None, cluster: str | None, cluster_name: str, timeout: float,
            as_json: bool, watch_s: float | None, curve_server_key: str | None,
            curve_secret: str | None) -> None:
    """Show brokers (role, state, peer), services, workers (outstanding calls, latency,
    phi suspicion), queues and the alerts in force; with --cluster, every member broker
    etcd lists (with its lease) and the services and workers of them all."""
    keys = {"curve_server_key": curve_server_key, "curve_secret": curve_secret}
    fetch: Callable[[], dict[str, Any]]
    eps, url = brokers_or_cluster(brokers, cluster)
    if url is not None:
        where = f"in cluster {cluster_name!r} at {url}"
        fetch = partial(fetch_cluster_status, url, cluster_name, timeout, **keys)
    else:
        where = f"at {', '.join(eps)}"
        fetch = partial(fetch_status, eps, timeout, **keys)
    if watch_s is not None and not as_json:
        _watch_status(fetch, watch_s)
        return
    st = fetch()
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        from rich.console import Console

        Console().print(status_view(st))
    if not st["brokers"]:
        click.echo(f"error: no broker is registered {where}", err=True)
        sys.exit(1)
    if all(b["state"] == "unreachable" for b in st["brokers"]):
        click.echo(f"error: no broker answered {where} within {timeout:g}s "
                   "(is one running? see `zrpc pair --help`)", err=True)
        sys.exit(1)


def _watch_status(fetch: Callable[[], dict[str, Any]], every: float) -> None:
    import time

    from rich.live import Live

    try:
        with Live(status_view(fetch()), auto_refresh=False) as live:
            while True:
                time.sleep(every)  # noqa: sleep (the refresh period)
                live.update(status_view(fetch()), refresh=True)
    except KeyboardInterrupt:
        pass


def _election_view(st: dict[str, Any]) -> Any:
    """One row per elected broker: its view of the election (--elect)."""
    from rich.table import Table

    name = (st.get("election") or {}).get("name", "")
    t = Table(title=f"election {name}", title_justify="left")
    for col in ("endpoint", "role", "election state", "holder", "epoch", "lease left", "etcd"):
        t.add_column(col)
    for b in st["brokers"]:
        e = b.get("election")
        if not isinstance(e, dict):
            continue
        state = str(e.get("state"))
        style = {"active": "green", "fenced": "red"}.get(state, "")
        left = e.get("lease_left_s")
        etcd = str(e.get("etcd") or "-")
        t.add_row(b["endpoint"], str(b.get("role") or "-"), f"[{style}]{state}[/]" if style else state,
                  str(e.get("holder") or "-"), str(e.get("epoch") if e.get("epoch") is not None else "-"),
                  "-" if left is None else f"{left:.1f}s",
                  f"[red]{etcd}[/]" if etcd == "unreachable" else etcd)
    return t


def status_view(st: dict[str, Any]) -> Any:
    """The `zrpc status` tables (rich) for the merged status."""
    from rich.console import Group
    from rich.table import Table

    cluster = "cluster" in st
    t = Table(title=f"brokers of cluster {st['cluster']['name']}" if cluster else "brokers",
              title_justify="left")
    cols = ("member", "endpoint", "state", "etcd", "lease age", "uptime", "internal errors") if cluster \
        else ("endpoint", "role", "state", "peer", "epoch", "pid", "uptime", "restarts", "internal errors")
    for col in cols:
        t.add_column(col)
    for b in st["brokers"]:
        style = {"active": "green", "unreachable": "red"}.get(str(b["state"]), "")
        restarts = b.get("restarts")
        internal = b.get("counters", {}).get("internal_errors")
        state = f"[{style}]{b['state']}[/]" if style else str(b["state"])
        uptime = f"{b['uptime_s']:.0f}s" if "uptime_s" in b else "-"
        errors = "-" if internal is None else f"[red]{internal}[/]" if internal else "0"
        if cluster:
            age = b.get("lease_age_s")
            etcd = str(b.get("etcd") or "-")
            t.add_row(str(b.get("name")), b["endpoint"], state,
                      f"[red]{etcd}[/]" if etcd == "unreachable" else etcd,
                      "-" if age is None else f"{age}s", uptime, errors)
            continue
        t.add_row(b["endpoint"], str(b.get("role") or "-"), state, str(b.get("peer_state") or "-"),
                  str(b.get("epoch") if b.get("epoch") is not None else "-"), str(b.get("pid", "-")),
                  uptime, "-" if restarts is None else f"[yellow]{restarts}[/]" if restarts else "0",
                  errors)
    parts: list[Any] = [t]
    if any(isinstance(b.get("election"), dict) for b in st["brokers"]):
        parts.append(_election_view(st))
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
        where = f" @{w['broker']}" if cluster and w.get("broker") else ""
        t.add_row(w["name"] + flags + where, ",".join(w["services"]), str(w["capacity"]), str(w["outstanding"]),
                  f"{w['ewma_ms']:.2f}", f"{w.get('phi', 0):.1f}", str(w["served"]), str(w["errors"]))
    parts.append(t)
    if st.get("alerts"):
        t = Table(title="alerts in force", title_justify="left")
        for col in ("severity", "alert", "subject", "detail"):
            t.add_column(col)
        for a in st["alerts"]:
            subject = f"{a['subject']} @{a['broker']}" if cluster and a.get("broker") else a["subject"]
            t.add_row(a["severity"], a["name"], subject,
                      " ".join(f"{k}={v}" for k, v in a.get("detail", {}).items()))
        parts.append(t)
    return Group(*parts)
