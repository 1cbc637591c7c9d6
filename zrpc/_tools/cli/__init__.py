"""The `zrpc` command line (click), one module per command: every command explains itself with
--help and answers a user mistake with one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
from typing import Any

import click

from zrpc import __version__
from zrpc import _defaults as D
from zrpc._errors import ZrpcError
from zrpc._tools.cli import broker, call, cluster, demo, health, keygen, monitor, pair, status, worker
from zrpc._tools.cli._options import SERVING

COMMANDS = (pair, cluster, broker, worker, call, status, health, monitor, demo, keygen)

HELP = f"""zrpc: RPC over ZeroMQ with high availability built in.

A broker (or a primary/backup pair) dispatches calls to workers; clients call services
through it. Every command finds the brokers with --brokers or $ZRPC_BROKERS, else uses
the local pair (tcp://{D.LOCAL_HOST}:{D.FRONTEND_PORTS[0]} and :{D.FRONTEND_PORTS[1]}).
Errors are one line; set ZRPC_DEBUG=1 to see the traceback behind one."""


class _Group(click.Group):
    """Turns expected failures into one line on stderr (exit 1); --help stays click's."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ZrpcError, OSError, ValueError, TypeError, OverflowError) as exc:
            if isinstance(exc, click.ClickException) or os.environ.get("ZRPC_DEBUG") \
                    or ctx.meta.get(SERVING):
                raise  # ZRPC_DEBUG=1 shows the traceback behind a one-line error
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="zrpc")
def main() -> None:
    """The `zrpc` group: its help is HELP (it names the local pair's endpoints)."""


for _module in COMMANDS:
    main.add_command(_module.command)
del _module
