"""Operator commands: ``sqm status``, ``workers``, ``drain``, ``resume``, ``purge``,
``stop-worker``, ``cancel`` and ``shutdown`` (all through :class:`sqm.admin.AdminClient`)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from ..admin import AdminClient, Answer
from ..config import resolve
from .options import config_option, endpoint_option, key_options, one_line_errors, timeout_option


def admin_client(queue: str | None, endpoint: str | None, config: str | None,
                 timeout: float) -> AdminClient:
    """The AdminClient of QUEUE as the command line names it (every admin command's first step)."""
    return AdminClient(resolve(queue, endpoint=endpoint, config=config), timeout)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 10 else f"{seconds:.0f}s"


def _latency_line(name: str, h: dict[str, Any]) -> str:
    if not h or not h.get("count"):
        return f"{name:<11} no samples yet"
    return (f"{name:<11} p50 {_ms(h['p50'])}   p90 {_ms(h['p90'])}   p99 {_ms(h['p99'])}   "
            f"({h['count']} samples)")


def format_workers(workers: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'WORKER':<34} {'HOST':<14} {'PID':>7} {'STATE':<8} {'IDLE s':>7} {'TASKS':>7} "
        f"{'BUSY s':>8} {'RSS MB':>7} {'NICE':>4}"
    ]
    for w in workers:
        rss = w.get("rss_bytes")
        nice = w.get("nice")
        lines.append(
            f"{w['id'][:34]:<34} {str(w['host'])[:14]:<14} {w['pid']:>7} {w['state']:<8} "
            f"{w['idle_s']:>7.1f} {w['tasks_done']:>7} {w.get('busy_s', 0.0):>8.1f} "
            f"{'-' if rss is None else f'{rss / 1e6:.1f}':>7} {'-' if nice is None else nice:>4}"
        )
    return lines


def format_status(st: Answer) -> str:
    lines = [
        f"queue {st['queue']} at {st.get('endpoint', '?')}   up {st['uptime_s']:.0f} s"
        + ("   DRAINING (not dispatching)" if st.get("draining") else ""),
        f"pending {st['pending']}   in flight {st['in_flight']}   workers {st['workers_current']} "
        f"(ever {st['workers_ever']})   utilization {st['utilization'] * 100:.1f}%",
        f"assigned {st['assigned_total']}   completed {st['completed_total']}   "
        f"failed {st['failed_total']}   expired {st.get('expired_total', 0)}   "
        f"rejected {st.get('rejected_total', 0)}   redelivered {st.get('redelivered_total', 0)}   "
        f"malformed {st.get('malformed_total', 0)}",
    ]
    if st.get("scheduled") or st.get("retried_total") or st.get("cancelled_total") \
            or st.get("time_limited_total"):
        lines.append(f"scheduled {st.get('scheduled', 0)}   retried {st.get('retried_total', 0)}   "
                     f"cancelled {st.get('cancelled_total', 0)}   "
                     f"time-limited {st.get('time_limited_total', 0)}")
    if st.get("denied_total") or st.get("dead_total"):
        lines.append(f"denied {st.get('denied_total', 0)}   dead letters {st.get('dead_letters', 0)} "
                     f"(ever {st.get('dead_total', 0)})")
    latency = st.get("latency") or {}
    if latency:
        lines.append(_latency_line("queue wait", latency.get("queue_wait", {})))
        lines.append(_latency_line("service", latency.get("service", {})))
    methods = st.get("methods") or {}
    if methods:
        lines.append("")
        lines.append(f"{'METHOD':<24} {'ASSIGNED':>9} {'DONE':>9} {'FAILED':>7} "
                     f"{'WAIT p50':>9} {'SERVICE p50':>12} {'p99':>9}")
        for name, m in sorted(methods.items()):
            svc = m["latency"]["service"]
            lines.append(
                f"{name[:24]:<24} {m['assigned_total']:>9} {m['completed_total']:>9} "
                f"{m['failed_total']:>7} {_ms(m['latency']['queue_wait']['p50']):>9} "
                f"{_ms(svc['p50']):>12} {_ms(svc['p99']):>9}"
            )
    if st["workers"]:
        lines.append("")
        lines.extend(format_workers(st["workers"]))
    return "\n".join(lines)


def threading_wait(seconds: float) -> None:
    """Sleep that Ctrl-C interrupts at once (a refresh interval, not synchronization)."""
    threading.Event().wait(seconds)


@click.command()
@click.argument("queue", required=False)
@endpoint_option
@config_option
@key_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@timeout_option(3.0)
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.05), default=1.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="With --watch, stop after this many refreshes.")
@one_line_errors
def status(queue: str | None, endpoint: str | None, config: str | None, as_json: bool,
           timeout: float, watch: bool, interval: float, count: int | None) -> None:
    """Print QUEUE's live metrics (queue from $SQM_QUEUE when omitted).

    The table shows counts, queue-wait and service latency percentiles
    (overall and per method) and one row per worker; --json prints the same
    as one object (one per line with --watch).
    """
    client = admin_client(queue, endpoint, config, timeout)
    if not watch:
        st = client.status()
        click.echo(json.dumps(st) if as_json else format_status(st))
        return
    in_place = sys.stdout.isatty() and not as_json
    done = 0
    try:
        while count is None or done < count:
            if done:
                threading_wait(interval)
            st = client.status()
            if as_json:
                click.echo(json.dumps(st))
            elif in_place:
                click.echo("\x1b[H\x1b[2J" + format_status(st))  # home, clear screen
            else:
                click.echo(format_status(st) + "\n")
            done += 1
    except KeyboardInterrupt:
        return


@click.command("workers")
@click.argument("queue", required=False)
@endpoint_option
@config_option
@key_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@timeout_option(3.0)
@one_line_errors
def workers(queue: str | None, endpoint: str | None, config: str | None, as_json: bool,
            timeout: float) -> None:
    """List QUEUE's registered workers: id, host, pid, state, idle time, tasks, busy time,
    memory and nice value (the worker ID is what `sqm stop-worker` takes)."""
    client = admin_client(queue, endpoint, config, timeout)
    found = client.workers()
    if as_json:
        click.echo(json.dumps(found))
    elif found:
        click.echo("\n".join(format_workers(found)))
    else:
        click.echo(f"no workers on queue {client.settings.queue}")


def queue_command(name: str, summary: str, call: Callable[[AdminClient], Answer],
                  render: Callable[[str, Answer], str]) -> click.Command:
    """`sqm NAME [QUEUE]`: one control command, one line of output."""

    @click.argument("queue", required=False)
    @endpoint_option
    @config_option
    @key_options
    @timeout_option(3.0)
    @one_line_errors
    def command(queue: str | None, endpoint: str | None, config: str | None,
                timeout: float) -> None:
        client = admin_client(queue, endpoint, config, timeout)
        click.echo(render(client.settings.queue, call(client)))

    command.__doc__ = summary
    return click.command(name)(command)


drain = queue_command(
    "drain",
    "Stop dispatching QUEUE's messages; pending ones stay and new ones are still accepted.",
    AdminClient.drain,
    lambda q, r: f"queue {q}: draining, {r['pending']} pending (sqm resume {q} to continue)",
)
resume = queue_command(
    "resume",
    "Dispatch QUEUE's messages again after `sqm drain`.",
    AdminClient.resume,
    lambda q, r: f"queue {q}: dispatching again, {r['pending']} were pending",
)
purge = queue_command(
    "purge",
    "Drop every pending message of QUEUE (no confirmation); each originator gets a Purged error.",
    AdminClient.purge,
    lambda q, r: f"queue {q}: purged {r['purged']} pending message(s)",
)
shutdown = queue_command(
    "shutdown",
    "Stop QUEUE's sqm as SIGTERM would (pending messages failed back, or kept with --journal).",
    AdminClient.shutdown,
    lambda q, r: f"queue {q}: sqm is shutting down",
)


@click.command("stop-worker")
@click.argument("args", nargs=-1, metavar="[QUEUE] ID")
@endpoint_option
@config_option
@key_options
@timeout_option(3.0)
@one_line_errors
def stop_worker(args: tuple[str, ...], endpoint: str | None, config: str | None,
                timeout: float) -> None:
    """Ask worker ID (as `sqm status`/`sqm workers` show it) to finish its message and exit 0."""
    queue: str | None
    if len(args) == 2:
        queue, wid = args
    elif len(args) == 1:
        queue, wid = None, args[0]
    else:
        raise click.UsageError("expected [QUEUE] ID")
    client = admin_client(queue, endpoint, config, timeout)
    client.stop_worker(wid)
    click.echo(f"queue {client.settings.queue}: asked worker {wid} to stop")



@click.command("cancel")
@click.argument("args", nargs=-1, metavar="[QUEUE] ID")
@endpoint_option
@config_option
@key_options
@timeout_option(3.0)
@one_line_errors
def cancel(args: tuple[str, ...], endpoint: str | None, config: str | None,
           timeout: float) -> None:
    """End message ID (scheduled, pending or running) with Cancelled; its sender is told.

    Exits 1 when the message had already ended or is unknown.
    """
    queue: str | None
    if len(args) == 2:
        queue, mid = args
    elif len(args) == 1:
        queue, mid = None, args[0]
    else:
        raise click.UsageError("expected [QUEUE] ID")
    client = admin_client(queue, endpoint, config, timeout)
    if not client.cancel(mid).get("cancelled"):
        click.echo(f"queue {client.settings.queue}: no message {mid} still to cancel "
                   "(ended or unknown)", err=True)
        sys.exit(1)
    click.echo(f"queue {client.settings.queue}: cancelled message {mid}")


#: Every command of this module, in the order `sqm --help` lists them.
COMMANDS = (status, workers, drain, resume, purge, stop_worker, cancel, shutdown)
