"""`zrpc keygen`: make the CURVE key pair a broker, worker or client needs to encrypt and
authenticate its sockets."""

from __future__ import annotations

import click


@click.command("keygen")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="zrpc", show_default=True, help="Base name of the two files.")
def command(directory: str, name: str) -> None:
    """Create a CURVE key pair in DIRECTORY: NAME.key (public) and NAME.key_secret (0600)."""
    from zrpc._io._security import keygen as make_keys

    try:
        public, secret = make_keys(directory, name)
    except OSError as exc:
        raise click.ClickException(f"cannot write keys in {directory}: {exc.strerror or exc}") from None
    click.echo(f"wrote {public} (public: give it to peers) and {secret} (secret: keep it, mode 0600)")
    click.echo("broker:          zrpc broker --curve-secret BROKER.key_secret --curve-authorized DIR_OF_CLIENT_KEYS")
    click.echo("client, worker:  --curve-secret OWN.key_secret --curve-server-key BROKER.key "
               "(and copy OWN.key into the broker's authorized directory)")
