"""``keygen NAME [--dir DIR]``: make a CURVE key pair for sqm, a sender or a worker.

A standalone click command, so ``sqm`` can add it with
``cli.add_command(keygen)``; until then ``python -m sqm.security keygen``.
"""

from __future__ import annotations

import os

import click

from ..errors import SQMError
from .keys import generate_keypair


@click.command()
@click.argument("name")
@click.option("--dir", "directory", metavar="DIR", default=".", show_default=True,
              type=click.Path(file_okay=False),
              help="Where to write NAME.key and NAME.key_secret (created owner-only if missing).")
@click.option("--force", is_flag=True, help="Replace an existing pair of that name.")
def keygen(name: str, directory: str, force: bool) -> None:
    """Write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600).

    Give the public .key to the other side (the broker's clients/senders,
    clients/workers or clients/admins folder, or clients' --server-key);
    keep the .key_secret where only its owner can read it.
    """
    try:
        public, secret = generate_keypair(name, directory, overwrite=force)
    except (SQMError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"public key: {os.path.normpath(public)}")
    click.echo(f"secret key: {os.path.normpath(secret)} (mode 0600: keep it private)")


@click.group()
def main() -> None:
    """sqm security tools (until they join the sqm command)."""


main.add_command(keygen)
