"""``sqm serve``: run the broker in the foreground."""

from __future__ import annotations

import logging
import os

import click

from .. import __version__, logs, protocol
from ..config import prepare_ipc, queue_limits, resolve
from ..errors import SQMError
from .options import config_option, log_format_option, log_level_option, one_line_errors

log = logging.getLogger("sqm.cli")


@click.command()
@click.argument("queues", nargs=-1)
@click.option(
    "--endpoint",
    "endpoints",
    metavar="URL",
    multiple=True,
    help="Where to listen; repeat once per queue, in order (default: as resolved for each queue).",
)
@config_option
@click.option("--heartbeat", type=float, default=None, help="Seconds between heartbeats [1.0].")
@click.option(
    "--max-pending", type=int, default=None, help="Pending messages per queue before QueueFull [100000]."
)
@click.option(
    "--max-message-size",
    type=int,
    default=None,
    help=f"Largest payload accepted, in bytes [{protocol.DEFAULT_MAX_MESSAGE_SIZE}].",
)
@click.option(
    "--max-deliveries",
    type=int,
    default=None,
    help="Fail a message back as WorkerLost once it has been handed to this many workers "
    "that died, whatever its retries (poison messages) [no limit].",
)
@click.option(
    "--journal",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    default=None,
    help="SQLite file recording accepted messages until they end; after a crash and restart "
    "with the same FILE they are dispatched again [in memory only].",
)
@click.option(
    "--journal-fsync", is_flag=True, help="fsync every journal commit (survives power loss; slower)."
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics and the live dashboard / on this HTTP port [off].",
)
@click.option(
    "--metrics-bind", default="127.0.0.1", show_default=True, help="Address for --metrics-port."
)
@log_level_option
@log_format_option
@one_line_errors
def serve(
    queues: tuple[str, ...],
    endpoints: tuple[str, ...],
    config: str | None,
    heartbeat: float | None,
    max_pending: int | None,
    max_message_size: int | None,
    max_deliveries: int | None,
    journal: str | None,
    journal_fsync: bool,
    metrics_port: int | None,
    metrics_bind: str,
    log_level: str,
    log_format: str,
) -> None:
    """Run the broker for QUEUE... in the foreground (logs on stderr).

    SIGTERM or SIGINT stops it cleanly (exit 0): pending messages are failed
    back to their senders (kept for the next start with --journal) and
    workers are told to wait for a new broker. Limits may also be set per
    queue in the config file (queues.<name>.max_pending, ...); options win.
    """
    logs.setup(log_level, log_format)
    names: list[str | None] = list(queues) or [None]
    if endpoints and len(endpoints) != len(names):
        raise SQMError("give one --endpoint per queue, in the same order")
    settings = [
        resolve(q, endpoint=endpoints[i] if endpoints else None, config=config)
        for i, q in enumerate(names)
    ]
    for st in settings:
        if len(st.endpoints) > 1:
            raise SQMError(
                f"queue {st.queue!r} has {len(st.endpoints)} endpoints ({', '.join(st.endpoints)}); "
                "one sqm serves one of them: choose it with --endpoint"
            )
        prepare_ipc(st)
    from ..broker import Broker, BrokerOptions  # after the checks: they fail fast
    from ..journal import Journal

    opts = [
        BrokerOptions(**queue_limits(
            st, heartbeat=heartbeat, max_pending=max_pending, max_message_size=max_message_size,
            max_deliveries=max_deliveries,
            default_max_message_size=protocol.DEFAULT_MAX_MESSAGE_SIZE,
        ))
        for st in settings
    ]
    jnl = Journal(journal, fsync=journal_fsync) if journal else None
    try:
        broker = Broker(settings, opts, journal=jnl)
    except Exception:
        if jnl is not None:
            jnl.close()
        raise
    broker.install_signal_handlers()
    web = None
    if metrics_port is not None:
        from .. import web as web_mod

        broker.snapshot_every = 1.0
        try:
            web = web_mod.start(metrics_bind, metrics_port, broker.snapshot)
        except OSError as exc:
            broker.close()
            raise SQMError(f"cannot serve metrics on {metrics_bind}:{metrics_port}: {exc}") from None
        log.info("metrics and dashboard at http://%s:%d/", metrics_bind, web.port)
    log.info("sqm %s starting (pid %d)", __version__, os.getpid())
    try:
        broker.run()
    finally:
        if web is not None:
            web.close()
