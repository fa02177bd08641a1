"""What every ``sqm`` command shares: common options and one-line errors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click
import zmq

from .. import logs
from ..errors import SQMError

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., object])

endpoint_option = click.option(
    "--endpoint",
    metavar="URL",
    help="tcp://HOST:PORT or ipc:///path (default: $SQM_ENDPOINT, the config, "
    "else ipc://<rundir>/<queue>.sock).",
)
config_option = click.option(
    "--config",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="YAML config file (default: $SQM_CONFIG). See conf/sqm.yaml.",
)
log_level_option = click.option(
    "--log-level",
    type=click.Choice(logs.LEVELS),
    default="info",
    show_default=True,
    help="How much to log on stderr.",
)
log_format_option = click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    default="text",
    show_default=True,
    help="Log lines on stderr as text, or one JSON object per line.",
)


def _to_env(name: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    def store(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value:
            os.environ[name] = value  # Sender, Worker, AdminClient (and child processes) read it
        return value

    return store


def key_options(fn: F) -> F:
    """``--secret-key FILE`` and ``--server-key FILE``: this client's CURVE keys.

    They set ``$SQM_SECRET_KEY`` / ``$SQM_SERVER_KEY`` for the command, so
    every Sender, Worker and admin request it makes (worker processes
    included) uses them; the command functions take no new parameter.
    """
    fn = click.option(
        "--server-key", metavar="FILE", expose_value=False, callback=_to_env("SQM_SERVER_KEY"),
        help="The secured sqm's public key (its .key) [$SQM_SERVER_KEY, config server_key].",
    )(fn)
    fn = click.option(
        "--secret-key", metavar="FILE", expose_value=False, callback=_to_env("SQM_SECRET_KEY"),
        help="This client's CURVE key pair (.key_secret) for a secured sqm "
        "[$SQM_SECRET_KEY, config secret_key].",
    )(fn)
    return fn


def timeout_option(default: float, help: str = "Seconds to wait for sqm.") -> Callable[[F], F]:  # noqa: A002
    """``--timeout SECONDS`` with a per-command default."""
    return click.option("--timeout", type=float, default=default, show_default=True, help=help)


def one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn sqm and ZeroMQ errors into click's one-line 'Error: ...' and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (SQMError, zmq.ZMQError, OSError, ValueError) as exc:
            kind = type(exc).__name__
            raise click.ClickException(f"{kind}: {exc}") from None

    return wrapper
