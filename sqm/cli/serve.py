"""``sqm serve``: run the broker in the foreground."""

from __future__ import annotations

import logging
import os

import click

from .. import __version__, logs, protocol
from ..config import QueueSettings, broker_security, prepare_ipc, queue_limits, resolve
from ..errors import SQMError
from ..security.keys import KeyPair, load_keypair
from ..sockets import raise_fd_limit
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
    "--dead-letters", metavar="N", type=click.IntRange(0), default=None,
    help="Keep the last N messages per queue that failed without a worker's answer "
    "(WorkerLost, Expired...) for 'sqm dead' (journaled with --journal; 0: keep none) [10000].",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics and the live dashboard / on this HTTP port [off].",
)
@click.option(
    "--metrics-bind", default="127.0.0.1", show_default=True,
    help="Address for --metrics-port (keep it local; see docs/SECURITY.md to expose it).",
)
@click.option(
    "--secret-key", metavar="FILE", default=None,
    help="This sqm's CURVE key pair (a .key_secret from 'sqm keygen'): CURVE on every "
    "endpoint [config security.secret_key; off].",
)
@click.option(
    "--clients", metavar="DIR", default=None,
    help="Public keys allowed in: DIR/senders, DIR/workers, DIR/admins (*.key); re-read on "
    "SIGHUP [config security.clients].",
)
@click.option(
    "--insecure", is_flag=True,
    help="Allow a plain (unencrypted, unauthenticated) tcp endpoint on a non-loopback address.",
)
@click.option(
    "--hold-unknown", is_flag=True,
    help="A message whose method no registered worker serves waits for one (until its "
    "deadline) instead of failing at once with UnknownMethod.",
)
@click.option(
    "--ipc-mode", metavar="MODE", default="0600", show_default=True,
    help="Permissions (octal) of ipc socket files, e.g. 0660 to let the group in.",
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
    dead_letters: int | None,
    metrics_port: int | None,
    metrics_bind: str,
    secret_key: str | None,
    clients: str | None,
    insecure: bool,
    hold_unknown: bool,
    ipc_mode: str,
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
    raise_fd_limit()  # a connection per sender and worker: one file descriptor each
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
    mode = parse_ipc_mode(ipc_mode)
    key_file, clients_dir = broker_security(settings[0], secret_key, clients)
    keys = security_settings(settings, key_file, clients_dir, insecure)
    from ..broker import Broker, BrokerOptions  # after the checks: they fail fast
    from ..deadletters import DEFAULT_LIMIT as DEFAULT_DEAD_LETTERS
    from ..deadletters import DeadLetterPlugin
    from ..journal import Journal
    from ..plugins import Plugin

    opts = [
        BrokerOptions(**queue_limits(
            st, heartbeat=heartbeat, max_pending=max_pending, max_message_size=max_message_size,
            max_deliveries=max_deliveries,
            default_max_message_size=protocol.DEFAULT_MAX_MESSAGE_SIZE,
        ), curve_server=keys, ipc_mode=mode, hold_unknown=hold_unknown)
        for st in settings
    ]
    plugins: list[Plugin] = []
    if keys is not None and clients_dir is not None:
        from ..security.plugin import SecurityPlugin

        plugins.append(SecurityPlugin(clients_dir))
    jnl = Journal(journal, fsync=journal_fsync) if journal else None
    plugins.append(DeadLetterPlugin(DEFAULT_DEAD_LETTERS if dead_letters is None else dead_letters,
                                    journal=jnl))
    try:
        broker = Broker(settings, opts, journal=jnl, plugins=plugins)
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
    log.info("sqm %s starting (pid %d)%s", __version__, os.getpid(),
             f", CURVE on, clients from {clients_dir}" if keys is not None else "")
    try:
        broker.run()
    finally:
        if web is not None:
            web.close()


def parse_ipc_mode(text: str) -> int:
    """``--ipc-mode``: an octal permission mode such as 0600 or 660."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise SQMError(f"--ipc-mode {text!r}: give an octal mode such as 0600 or 0660")
    return mode


def security_settings(settings: list[QueueSettings], key_file: str | None,
                      clients_dir: str | None, insecure: bool) -> KeyPair | None:
    """The broker's key pair (None: plain), after the secure-default check.

    A plain tcp endpoint on a non-loopback address is refused unless
    ``--insecure`` says so: anyone who reaches it could submit, serve
    (and read every payload) or shut the queue down.
    """
    if key_file is None:
        if clients_dir is not None:
            raise SQMError("--clients given without --secret-key: a secured sqm needs both")
        exposed = [st.bind for st in settings
                   if st.bind.startswith("tcp://") and not protocol.endpoint_is_local(st.bind)]
        if exposed and not insecure:
            raise SQMError(
                f"refusing to serve {', '.join(exposed)} in clear text to the network: give "
                "--secret-key FILE --clients DIR (see 'sqm keygen'), or --insecure to allow it"
            )
        return None
    if clients_dir is None:
        raise SQMError("--secret-key given without --clients DIR: a secured sqm needs the "
                       "public keys it admits")
    return load_keypair(key_file)
