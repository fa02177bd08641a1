"""``sqm dead list|replay|purge``: the dead letters of a queue (:mod:`sqm.deadletters`)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ..admin import AdminClient
from .admin import admin_client, queue_command
from .options import config_option, endpoint_option, key_options, one_line_errors, timeout_option


def format_dead(dead: list[dict[str, Any]]) -> list[str]:
    """One row per dead letter, oldest first."""
    lines = [f"{'ID':<34} {'METHOD':<20} {'REASON':<18} {'ATTEMPTS':>8} {'SIZE':>9}  FAILED AT"]
    for d in dead:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["failed_at"]))
        lines.append(f"{d['id'][:34]:<34} {d['method'][:20]:<20} {d['reason'][:18]:<18} "
                     f"{d['attempts']:>8} {d.get('size', 0):>9}  {when}")
    return lines


@click.group("dead")
def dead() -> None:
    """The dead letters: messages that failed without a worker's answer (WorkerLost,
    Expired...), kept by sqm with their payload (`sqm serve --dead-letters N`)."""


@dead.command("list")
@click.argument("queue", required=False)
@endpoint_option
@config_option
@key_options
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list (payloads included, base64) instead of a table.")
@timeout_option(10.0)
@one_line_errors
def dead_list(queue: str | None, endpoint: str | None, config: str | None, as_json: bool,
              timeout: float) -> None:
    """List QUEUE's dead letters, oldest first: id, method, reason, attempts, size, time."""
    client = admin_client(queue, endpoint, config, timeout)
    found = client.dead_list(payloads=as_json)
    if as_json:
        click.echo(json.dumps(found))
    elif found:
        click.echo("\n".join(format_dead(found)))
    else:
        click.echo(f"no dead letters on queue {client.settings.queue}")


@dead.command("replay")
@click.argument("args", nargs=-1, metavar="[QUEUE] [ID...]")
@endpoint_option
@config_option
@key_options
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter of QUEUE.")
@timeout_option(10.0)
@one_line_errors
def dead_replay(args: tuple[str, ...], endpoint: str | None, config: str | None,
                replay_all: bool, timeout: float) -> None:
    """Submit dead letters again: back to their caller if it is still connected (same id
    and mailbox), else oneway. With --all, the one argument is the QUEUE; without it, one
    argument is an ID (queue from $SQM_QUEUE) and with several the first is the QUEUE."""
    queue: str | None
    if replay_all:
        if len(args) > 1:
            raise click.UsageError("with --all give at most the QUEUE, no IDs")
        queue, ids = (args[0] if args else None), None
    elif len(args) == 1:
        queue, ids = None, list(args)
    elif len(args) >= 2:
        queue, ids = args[0], list(args[1:])
    else:
        raise click.UsageError("give the IDs to replay (see 'sqm dead list'), or --all")
    client = admin_client(queue, endpoint, config, timeout)
    answer = client.dead_replay(ids)
    name = client.settings.queue
    for r in answer["replayed"]:
        click.echo(f"queue {name}: replayed {r['id']} "
                   + ("to its caller" if r["to"] == "caller" else "oneway (its caller is gone)"))
    for r in answer["refused"]:
        click.echo(f"queue {name}: {r['id']} refused ({r['error']}), still a dead letter")
    for mid in answer["missing"]:
        click.echo(f"queue {name}: no dead letter {mid}")
    if not answer["replayed"] and not answer["refused"] and not answer["missing"]:
        click.echo(f"queue {name}: no dead letters to replay")
    if answer["refused"] or answer["missing"]:
        raise SystemExit(1)


dead_purge = queue_command(
    "purge",
    "Forget every dead letter of QUEUE (no confirmation).",
    AdminClient.dead_purge,
    lambda q, r: f"queue {q}: purged {r['purged']} dead letter(s)",
)
dead.add_command(dead_purge)
