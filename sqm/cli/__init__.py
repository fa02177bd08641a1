"""The ``sqm`` command: serve queues, run workers, submit messages, show status.

Every command that talks to a queue takes ``--endpoint`` and ``--config`` and
falls back to ``$SQM_QUEUE`` for the queue name. Errors are one line on
stderr and a non-zero exit status, never a traceback.

Each command group lives in a module of its own (serve, worker, submit,
admin); a new one is a module plus one ``main.add_command(...)`` line below.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from .. import __version__
from ..admin import control_request, fetch_status, require_broker
from ..security.cli import keygen
from ..taskpool.cli import pool
from . import admin, dead, serve, submit, worker
from .submit import batch_summary

__all__ = ["main", "fetch_status", "control_request", "require_broker", "batch_summary"]


class OneLineErrors(click.Group):
    """A click group whose usage errors are one line, not click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help(), err=True)  # `sqm` alone: the help, as click/git do
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "sqm"
            click.echo(f"Error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sqm")
def main() -> None:
    """sqm: a one-of-many queue manager over ZeroMQ.

    Run the broker with `sqm serve QUEUE`, start workers with
    `sqm worker MODULE:ATTR`, send messages with `sqm submit` or the Python
    Sender, and watch it with `sqm status`. With no configuration, a queue
    lives at ipc://<rundir>/<queue>.sock on this host.
    """


main.add_command(serve.serve)
main.add_command(worker.worker)
main.add_command(submit.submit)
main.add_command(pool)
main.add_command(keygen)
for _command in admin.COMMANDS:
    main.add_command(_command)
main.add_command(dead.dead)
