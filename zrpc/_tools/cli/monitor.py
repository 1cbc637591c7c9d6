"""`zrpc monitor`: follow the brokers' live alerts and metrics, and hand each alert to a command
or a webhook."""

from __future__ import annotations

import sys

import click

from zrpc import _defaults as D
from zrpc._tools.cli._options import (
    check_endpoint_param,
    cluster_name_option,
    cluster_option,
    curve_client_options,
)


def cluster_monitors(url: str, cluster_name: str) -> list[str]:
    """The monitor endpoints the members of a cluster registered; OSError when etcd is silent."""
    from zrpc._core._membership import brokers_prefix, parse_cluster
    from zrpc._io._etcd import EtcdError, read_members

    try:
        members = read_members(parse_cluster(url), brokers_prefix(cluster_name), timeout=D.ETCD_TIMEOUT)
    except EtcdError as exc:
        raise OSError(f"cannot read cluster {cluster_name!r} from etcd at {url}: {exc}") from None
    return sorted(str(m["monitor"]) for m in members if isinstance(m.get("monitor"), str) and m["monitor"])


@click.command("monitor")
@click.option("--monitors", envvar="ZRPC_MONITORS", show_envvar=True, metavar="EP[,EP]",
              help="Monitor endpoints of the brokers (default: the local pair, "
                   f":{D.MONITOR_PORTS[0]} and :{D.MONITOR_PORTS[1]}).")
@cluster_option
@cluster_name_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Run CMD for each alert, with the alert as JSON on stdin (a failure is reported).")
@click.option("--webhook", metavar="URL", help="POST each alert as JSON to URL (bounded retries).")
@click.option("--metrics/--no-metrics", default=True, show_default=True,
              help="Show the brokers' metrics snapshots (one a second each).")
@click.option("--count", type=click.IntRange(1), help="Stop after this many alerts.")
@click.option("--duration", type=click.FloatRange(0.1), help="Stop after this many seconds.")
@curve_client_options
def command(monitors: str | None, cluster: str | None, cluster_name: str, as_json: bool,
            exec_cmd: str | None, webhook: str | None, metrics: bool, count: int | None,
            duration: float | None, curve_server_key: str | None, curve_secret: str | None) -> None:
    """Show live alerts (worker lost, suspect, failover...) and metrics from both brokers; with
    --cluster, from every member broker etcd lists (members that join are followed)."""
    from functools import partial

    from zrpc._tools._monitor_view import watch

    ctx = click.get_current_context()
    if cluster is not None and monitors is not None and ctx.get_parameter_source(
            "monitors") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--monitors and --cluster: give one of them")
    refresh = partial(cluster_monitors, cluster, cluster_name) if cluster is not None else None
    if refresh is not None:
        eps = refresh()
    else:
        eps = [check_endpoint_param(e, "--monitors")
               for e in (monitors.split(",") if monitors else D.LOCAL_MONITORS)]
    if webhook and not webhook.startswith(("http://", "https://")):
        raise click.BadParameter(f"{webhook!r}: expected an http:// or https:// URL", param_hint="--webhook")
    from zrpc._io._security import client_keys

    keys = client_keys(curve_server_key, curve_secret)
    sys.exit(watch(eps, as_json=as_json, exec_cmd=exec_cmd, webhook=webhook, metrics=metrics,
                   count=count, duration=duration, curve=keys, refresh=refresh))
