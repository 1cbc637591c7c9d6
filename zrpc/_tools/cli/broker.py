"""`zrpc broker`: run one broker, alone, as one side of a Binary Star pair, as a candidate of an
etcd election (`--elect`), or as a member of an etcd cluster; its options are BrokerConfig's
fields."""

from __future__ import annotations

import signal
from typing import Any

import click
from click.core import ParameterSource

from zrpc._core._config import is_loopback
from zrpc._core._membership import check_name
from zrpc._tools.cli._options import ConfigOptions, log_option, serving, setup_logging
from zrpc.broker._config import HELP_ORDER, BrokerConfig, local_frontend

OPTIONS = ConfigOptions(BrokerConfig, order=HELP_ORDER)


@click.command("broker")
@OPTIONS
@log_option
def command(log_level: str, **settings: Any) -> None:
    """Run a broker: routes calls from clients to workers until SIGTERM or Ctrl-C."""
    from zrpc.broker import Broker

    _check_elect(click.get_current_context(), settings)
    _check_cluster(click.get_current_context(), settings)
    setup_logging(log_level)
    keywords = OPTIONS.keywords(settings)
    keywords.setdefault("frontend", local_frontend(keywords["role"]))
    config = BrokerConfig(**keywords)
    if not is_loopback(config.frontend) and config.curve_secret is None:
        click.echo(f"warning: {config.frontend} is reachable from other hosts and no CURVE keys "
                   "are set: anyone who can connect can call and serve.", err=True)
    b = Broker(config)
    b.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: b.stop())
    signal.signal(signal.SIGHUP, lambda *_: b.reload_keys())
    serving()
    b.run()


PAIR_ONLY = ("role", "state", "peer_state")
"""Options of a Binary Star pair, which a cluster member (no pair: etcd decides membership)
does not take."""


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _check_elect(ctx: click.Context, settings: dict[str, Any]) -> None:
    """--elect with Binary Star's link or --cluster, without --role, or --election without
    --elect: a usage error."""
    if settings.get("elect") is None:
        if _given(ctx, "election"):
            raise click.UsageError("--election names the election of --elect etcd://HOST:PORT: "
                                   "it needs --elect")
        return
    if settings.get("cluster") is not None:
        raise click.UsageError("--elect and --cluster: an elected broker is one of a pair, not a "
                               "cluster member; give one of them")
    link = [f"--{n.replace('_', '-')}" for n in ("state", "peer_state") if _given(ctx, n)]
    if link:
        raise click.UsageError(f"--elect replaces the Binary Star link (etcd is the link): drop "
                               f"{' and '.join(link)}")
    if not _given(ctx, "role"):
        raise click.UsageError("--elect needs --role primary|backup (it orders who tries first)")
    try:
        check_name(settings["election"], "--election")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--election") from None


def _check_cluster(ctx: click.Context, settings: dict[str, Any]) -> None:
    """--cluster with pair options, or cluster options without --cluster: a usage error."""
    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)

    if settings.get("cluster") is not None:
        pair = [f"--{n.replace('_', '-')}" for n in PAIR_ONLY if given(n)]
        if pair:
            raise click.UsageError(f"--cluster makes a cluster member, not one of a pair: drop "
                                   f"{' and '.join(pair)}")
        if not settings.get("name"):
            raise click.UsageError("--cluster needs --name (this member's name in the cluster)")
    else:
        for n in ("name", "cluster_name"):
            if given(n):
                raise click.UsageError(f"--{n.replace('_', '-')} is for a cluster member: it "
                                       "needs --cluster etcd://HOST:PORT")
