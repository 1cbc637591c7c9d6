"""`zrpc call`: make one call from the shell and print its result (or its error) as JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from zrpc._errors import RemoteError, Timeout, ZrpcError
from zrpc._tools.cli._options import (
    brokers_option,
    brokers_or_cluster,
    cluster_name_option,
    cluster_option,
    curve_client_options,
)

TIMEOUT = 5.0
"""Seconds `zrpc call` waits by default: a person at a shell, not a client riding out a failover."""


def _parse_value(text: str) -> Any:
    """JSON literal if it parses, else the text itself as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@click.command("call")
@click.argument("target", metavar="SERVICE.METHOD")
@click.argument("args", nargs=-1)
@click.option("--kw", "kwargs", multiple=True, metavar="KEY=VALUE",
              help="A keyword argument (VALUE as JSON, else a string); repeatable.")
@brokers_option
@cluster_option
@cluster_name_option
@click.option("--timeout", type=click.FloatRange(0.001, 86400), default=TIMEOUT, show_default=True,
              help="Seconds to wait for the reply.")
@click.option("--json", "as_json", is_flag=True, help='Print {"result": ...} or {"error": {...}}.')
@curve_client_options
def command(target: str, args: tuple[str, ...], kwargs: tuple[str, ...], brokers: str | None,
            cluster: str | None, cluster_name: str, timeout: float, as_json: bool,
            curve_server_key: str | None, curve_secret: str | None) -> None:
    """Call SERVICE.METHOD with ARGS (JSON literals, else strings) and print the result as JSON.

    Example: zrpc call calc.add 1 2 (or, through a cluster's brokers, zrpc call --cluster
    etcd://127.0.0.1:2379 calc.add 1 2)
    """
    from zrpc._io._client import Client

    service, dot, method = target.rpartition(".")
    if not dot or not service or not method:
        raise click.BadParameter(f"{target!r}: expected SERVICE.METHOD, e.g. calc.add",
                                 param_hint="SERVICE.METHOD")
    kw: dict[str, Any] = {}
    for item in kwargs:
        key, eq, val = item.partition("=")
        if not eq or not key.isidentifier():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--kw")
        kw[key] = _parse_value(val)
    eps, url = brokers_or_cluster(brokers, cluster)
    with Client(eps or None, cluster=url, cluster_name=cluster_name, timeout=timeout,
                curve_server_key=curve_server_key, curve_secret=curve_secret) as client:
        try:
            result = client.call(service, method, *[_parse_value(a) for a in args], **kw)
        except ZrpcError as exc:
            kind = exc.remote_type if isinstance(exc, RemoteError) else type(exc).__name__
            message = exc.message if isinstance(exc, RemoteError) else str(exc)
            if isinstance(exc, Timeout):
                where = (f"registered in cluster {cluster_name!r} at {url}" if url
                         else f"running at {', '.join(eps)}")
                message += f" (is a broker {where}?)"
            if as_json:
                click.echo(json.dumps({"error": {"type": kind, "message": message,
                                                 "remote": isinstance(exc, RemoteError)}}))
            else:
                click.echo(f"error: {kind}: {message}", err=True)
            sys.exit(1)
    out = _jsonable(result)
    click.echo(json.dumps({"result": out} if as_json else out))
