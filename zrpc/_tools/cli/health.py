"""`zrpc health`: whether a service has a serving worker on an active broker (the exit code,
for probes and scripts), asking every broker at once, each for `zrpc.health`, as gRPC's
health protocol answers."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import click

from zrpc import _defaults as D
from zrpc._core._config import MAX_WORKER_BROKERS
from zrpc._errors import MethodNotFound, Timeout, ZrpcError
from zrpc._tools.cli._options import (
    brokers_option,
    brokers_or_cluster,
    cluster_name_option,
    cluster_option,
    curve_client_options,
)

TIMEOUT = 0.5
"""Seconds each broker is given: a live one answers within milliseconds, and a probe (a load
balancer's, Kubernetes') wants its answer well within a second even when a broker is down."""

SERVING, NOT_SERVING, UNKNOWN = "SERVING", "NOT_SERVING", "UNKNOWN"
"""The answers, gRPC's names (the broker's `zrpc.health`)."""


def ask_brokers(endpoints: Sequence[str], service: str | None, timeout: float,
                **keys: Any) -> list[dict[str, Any]]:
    """Every broker's `zrpc.health(service)`, asked at once: one entry per endpoint, with its
    `status` (and the broker's `state`) or the `error` that stood for it."""
    from zrpc._io._client import Client

    clients: list[Client] = []
    try:
        for ep in endpoints:  # made inside the try: one that fails leaves none open
            clients.append(Client([ep], timeout=timeout, **keys))
        args = () if service is None else (service,)
        futures: list[Future[Any]] = [c.future("zrpc", "health", *args) for c in clients]
        out = []
        for ep, fut in zip(endpoints, futures, strict=True):
            try:
                answer = fut.result(timeout=timeout + 1.0)  # the client answers at its deadline
            except (ZrpcError, TimeoutError) as exc:
                out.append({"endpoint": ep, "status": None, "error": _why(exc, timeout)})
                continue
            if not isinstance(answer, dict) or answer.get("status") not in (SERVING, NOT_SERVING, UNKNOWN):
                out.append({"endpoint": ep, "status": None, "error": f"unexpected answer {answer!r}"})
                continue
            out.append({"endpoint": ep, "status": answer["status"], "state": answer.get("state")})
        return out
    finally:
        for c in clients:
            c.close()


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, (Timeout, TimeoutError)):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, MethodNotFound):
        return "this broker has no zrpc.health (an older zrpc)"
    return f"{type(exc).__name__}: {exc}"


def member_endpoints(url: str, cluster_name: str, timeout: float) -> list[str]:
    """The frontends of the members etcd lists (as `zrpc status --cluster` reads them); OSError
    when etcd does not answer."""
    from zrpc._core._membership import brokers_prefix, parse_cluster
    from zrpc._io._etcd import EtcdError, read_members

    try:
        members = read_members(parse_cluster(url), brokers_prefix(cluster_name),
                               timeout=min(timeout, D.ETCD_TIMEOUT))
    except EtcdError as exc:
        raise OSError(f"cannot read cluster {cluster_name!r} from etcd at {url}: {exc}") from None
    return [str(m["frontend"]) for m in sorted(members, key=lambda m: str(m["name"]))
            if m.get("frontend")]


def overall(answers: Sequence[dict[str, Any]]) -> str:
    """SERVING when any broker says so (only an active one does); else NOT_SERVING when any
    knows the service; else UNKNOWN."""
    said = {a["status"] for a in answers}
    return SERVING if SERVING in said else NOT_SERVING if NOT_SERVING in said else UNKNOWN


@click.command("health")
@click.argument("service", required=False)
@brokers_option
@cluster_option
@cluster_name_option
@click.option("--timeout", type=click.FloatRange(0.01, 60), default=TIMEOUT, show_default=True,
              help="Seconds to wait for each broker (they are asked at once).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@curve_client_options
def command(service: str | None, brokers: str | None, cluster: str | None, cluster_name: str,
            timeout: float, as_json: bool, curve_server_key: str | None,
            curve_secret: str | None) -> None:
    """Exit 0 when SERVICE has a serving worker on an active broker, else 1 (without SERVICE:
    when a broker is active). Prints SERVING, NOT_SERVING (known, but no worker serves it, or
    no active broker answered) or UNKNOWN (no broker has seen it).

    Example: zrpc health calc --brokers tcp://10.0.0.1:5555,tcp://10.0.0.2:5555
    """
    keys = {"curve_server_key": curve_server_key, "curve_secret": curve_secret}
    eps, url = brokers_or_cluster(brokers, cluster, most=MAX_WORKER_BROKERS)
    if url is not None:
        eps = member_endpoints(url, cluster_name, timeout)
        where = f"in cluster {cluster_name!r} at {url}"
    else:
        where = f"at {', '.join(eps)}"
    answers = ask_brokers(eps, service, timeout, **keys) if eps else []
    status = overall(answers)
    what = service if service is not None else "broker"
    if as_json:
        click.echo(json.dumps({"service": service, "status": status, "brokers": answers}))
    else:
        click.echo(f"{what}: {status}")
        for a in answers:
            said = a["status"] or "unreachable"
            detail = f" ({a['state']})" if a.get("state") else f": {a['error']}" if a.get("error") else ""
            click.echo(f"  {a['endpoint']}: {said}{detail}")
    if not answers:
        click.echo(f"error: no broker is registered {where}", err=True)
    elif all(a["status"] is None for a in answers):
        click.echo(f"error: no broker answered {where} within {timeout:g}s", err=True)
    sys.exit(0 if status == SERVING else 1)
