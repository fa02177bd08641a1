"""The ``sqm`` command: serve queues, run workers, submit messages, show status.

Every command that talks to a queue takes ``--endpoint`` and ``--config`` and
falls back to ``$SQM_QUEUE`` for the queue name. Errors are one line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import click
import zmq

from . import __version__, logs, protocol, serializers
from .config import resolve
from .errors import SQMError
from .sockets import ipc_listener_alive, make_socket

log = logging.getLogger("sqm.cli")

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


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn sqm and ZeroMQ errors into click's one-line 'Error: ...' and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SQMError, zmq.ZMQError, OSError, ValueError) as exc:
            kind = type(exc).__name__
            raise click.ClickException(f"{kind}: {exc}") from None

    return wrapper


def require_broker(settings: Any) -> None:
    """Fail fast when an ipc endpoint has no broker behind it."""
    if settings.endpoint.startswith("ipc://") and not ipc_listener_alive(settings.endpoint):
        raise SQMError(
            f"no sqm is serving queue {settings.queue!r} at {settings.endpoint} "
            f"(start it with: sqm serve {settings.queue})"
        )


class OneLineErrors(click.Group):
    """A click group whose usage errors are one line, not click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
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


# ---------------------------------------------------------------- serve


@main.command()
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
    from .broker import Broker
    from .journal import Journal

    logs.setup(log_level, log_format)
    names = list(queues) or [None]
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
    opts = [
        _broker_options(st, heartbeat, max_pending, max_message_size, max_deliveries)
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
        from . import web as web_mod

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


def _broker_options(st: Any, heartbeat: float | None, max_pending: int | None,
                    max_message_size: int | None, max_deliveries: int | None) -> Any:
    """One queue's limits: the option, else queues.<name>.KEY, else top-level KEY, else default."""
    from .broker import BrokerOptions

    def pick(option: Any, key: str, default: Any, cast: Callable[[Any], Any]) -> Any:
        value = option if option is not None else st.get(key, default)
        try:
            value = None if value is None else cast(value)
        except (TypeError, ValueError):
            raise SQMError(f"queue {st.queue!r}: {key} must be a number, got {value!r}") from None
        if value is not None and value <= 0:
            raise SQMError(f"queue {st.queue!r}: {key} must be positive, got {value}")
        return value

    return BrokerOptions(
        heartbeat=pick(heartbeat, "heartbeat", 1.0, float),
        max_pending=pick(max_pending, "max_pending", 100_000, int),
        max_message_size=pick(max_message_size, "max_message_size",
                              protocol.DEFAULT_MAX_MESSAGE_SIZE, int),
        max_deliveries=pick(max_deliveries, "max_deliveries", None, int),
    )


# ---------------------------------------------------------------- submit


def _split_submit_args(args: tuple[str, ...], has_input: bool) -> tuple[str | None, str, str | None]:
    """[QUEUE] METHOD [JSON]: the queue may come from $SQM_QUEUE instead."""
    env_queue = os.environ.get("SQM_QUEUE")
    if len(args) == 3:
        return args[0], args[1], args[2]
    if len(args) == 1:
        return None, args[0], None
    if len(args) == 2:
        if env_queue and not has_input and _is_json(args[1]):
            return None, args[0], args[1]
        return args[0], args[1], None
    raise click.UsageError("expected [QUEUE] METHOD [JSON]")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SQMError(f"{where} is not valid JSON: {exc}") from None


def _error_json(exc: Exception) -> dict[str, Any]:
    return {"error": {"type": getattr(exc, "type", type(exc).__name__), "message": str(exc)}}


@main.command()
@click.argument("args", nargs=-1, metavar="[QUEUE] METHOD [JSON]")
@endpoint_option
@config_option
@click.option(
    "--input",
    "input_file",
    type=click.File("r"),
    help="Send one message per JSON line of FILE (- for stdin); print one reply per line.",
)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait per reply.")
@click.option("--retries", type=int, default=0, show_default=True, help="Other workers to try if one dies.")
@click.option("--oneway", is_flag=True, help="Expect no reply (prints the message id).")
@click.option(
    "--serializer", default="cbor", show_default=True, help="Payload encoding on the wire."
)
@click.option(
    "--concurrency", type=int, default=100, show_default=True, help="Messages in flight with --input."
)
@one_line_errors
def submit(
    args: tuple[str, ...],
    endpoint: str | None,
    config: str | None,
    input_file: Any,
    timeout: float,
    retries: int,
    oneway: bool,
    serializer: str,
    concurrency: int,
) -> None:
    """Send METHOD with a JSON payload to QUEUE and print the reply as JSON.

    The queue is the first argument, else $SQM_QUEUE. With --input, every
    line of FILE is one JSON payload; replies are printed one per line in
    input order, failures as {"error": {...}}; the exit status is 1 if any
    failed.
    """
    from sender import Sender

    queue, method, payload_text = _split_submit_args(args, input_file is not None)
    if input_file is not None and payload_text is not None:
        raise SQMError("give either a JSON argument or --input, not both")
    settings = resolve(queue, endpoint=endpoint, config=config)
    require_broker(settings)
    serializers.get(serializer)
    with Sender(settings.queue, endpoint=settings.endpoints, config=config,
                serializer=serializer, timeout=timeout) as s:
        if input_file is None:
            payload = _parse_json(payload_text, "JSON argument") if payload_text else None
            if oneway:
                click.echo(json.dumps(s.submit(method, payload, oneway=True, retries=retries)))
                return
            result = s.rpc(method, payload, timeout=timeout, retries=retries)
            click.echo(json.dumps(result, default=str))
            return
        if concurrency < 1:
            raise click.BadParameter("must be at least 1", param_hint="--concurrency")
        ok = failed = 0
        t0 = time.monotonic()
        if oneway:
            items = _oneway_lines(s, method, input_file, retries)
        else:
            items = _batch_lines(s, method, input_file, timeout, retries, concurrency)
        with _progress_bar(input_file) as bar:
            for item in items:
                if isinstance(item, Exception):
                    failed += 1
                    click.echo(json.dumps(_error_json(item)))
                else:
                    ok += 1
                    click.echo(json.dumps(item, default=str))
                bar.update(1)
        click.echo(batch_summary(ok, failed, time.monotonic() - t0), err=True)
        if failed:
            sys.exit(1)


def batch_summary(ok: int, failed: int, seconds: float) -> str:
    """The last line ``sqm submit --input`` writes on stderr."""
    return f"{ok} ok, {failed} failed in {seconds:.2f} s"


def _input_payloads(lines: Any, errors: deque[SQMError | None]) -> Iterator[Any]:
    """The JSON payload of every non-blank line. For each line ``errors``
    gets None (sent) or, for a line that is not JSON, the error in its place."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            payload = _parse_json(line, f"input line {n}")
        except SQMError as exc:
            errors.append(exc)
            continue
        errors.append(None)
        yield payload


def _batch_lines(s: Any, method: str, lines: Any, timeout: float, retries: int,
                 concurrency: int) -> Iterator[Any]:
    """One message per JSON line through Sender.map; items in input order.

    map reads its input ahead of what it yields, so when it yields the k-th
    reply, the lines up to the k-th sent one are in ``errors``: errors for
    unparsable lines before it come out first, keeping input order.
    """
    errors: deque[SQMError | None] = deque()
    for item in s.map(method, _input_payloads(lines, errors), max_concurrent=concurrency,
                      retries=retries, timeout=timeout):
        while errors[0] is not None:
            yield errors.popleft()
        errors.popleft()
        yield item
    yield from errors  # only parse errors are left


def _oneway_lines(s: Any, method: str, lines: Any, retries: int) -> Iterator[Any]:
    """--oneway: submit every line, yield its message id (or its error)."""
    errors: deque[SQMError | None] = deque()
    for payload in _input_payloads(lines, errors):
        while errors[0] is not None:
            yield errors.popleft()
        errors.popleft()
        try:
            yield s.submit(method, payload, oneway=True, retries=retries)
        except SQMError as exc:
            yield exc
    yield from errors


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _progress_bar(input_file: Any) -> Any:
    """A progress bar on stderr when it is a terminal (the total when the input is a file)."""
    if not sys.stderr.isatty():
        return _NoBar()
    total = None
    try:
        if input_file.seekable():
            total = sum(1 for line in input_file if line.strip())
            input_file.seek(0)
    except (OSError, ValueError):
        total = None
    if total is None:
        return click.progressbar(iter(int, 1), show_pos=True, label="sent", file=sys.stderr)
    return click.progressbar(length=total, show_pos=True, show_percent=True, label="sent",
                             file=sys.stderr)


# ---------------------------------------------------------------- status


def _ask(settings: Any, command: bytes, body: bytes | None, timeout: float) -> Any:
    """One request/answer with sqm over a short-lived DEALER: the decoded JSON answer."""
    require_broker(settings)
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, linger_ms=0)
    try:
        sock.connect(settings.endpoint)
        sock.send_multipart([protocol.SIGNATURE, command] + ([body] if body is not None else []))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                raise SQMError(f"no answer from sqm at {settings.endpoint} within {timeout} s")
            frames = sock.recv_multipart()
            if len(frames) == 3 and frames[:2] == [protocol.SIGNATURE, command]:
                return json.loads(frames[2])
    finally:
        sock.close(0)


def fetch_status(settings: Any, timeout: float) -> dict[str, Any]:
    """Ask the broker for its status (STATUS)."""
    return _ask(settings, protocol.STATUS, None, timeout)


def control_request(settings: Any, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one control command (docs/PROTOCOL.md, CONTROL) and return sqm's answer.

    Raises SQMError with sqm's own explanation when it refuses the command.
    """
    reply = _ask(settings, protocol.CONTROL, json.dumps(request).encode(), timeout)
    if not reply.get("ok"):
        raise SQMError(reply.get("error", "sqm refused the command"))
    return reply


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


def format_status(st: dict[str, Any]) -> str:
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


@main.command()
@click.argument("queue", required=False)
@endpoint_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for sqm.")
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
    settings = resolve(queue, endpoint=endpoint, config=config)
    if not watch:
        st = fetch_status(settings, timeout)
        click.echo(json.dumps(st) if as_json else format_status(st))
        return
    in_place = sys.stdout.isatty() and not as_json
    done = 0
    try:
        while count is None or done < count:
            if done:
                threading_wait(interval)
            st = fetch_status(settings, timeout)
            if as_json:
                click.echo(json.dumps(st))
            elif in_place:
                click.echo("\x1b[H\x1b[2J" + format_status(st))  # home, clear screen
            else:
                click.echo(format_status(st) + "\n")
            done += 1
    except KeyboardInterrupt:
        return


def threading_wait(seconds: float) -> None:
    """Sleep that Ctrl-C interrupts at once (a refresh interval, not synchronization)."""
    import threading

    threading.Event().wait(seconds)


@main.command("workers")
@click.argument("queue", required=False)
@endpoint_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for sqm.")
@one_line_errors
def workers_cmd(queue: str | None, endpoint: str | None, config: str | None, as_json: bool,
                timeout: float) -> None:
    """List QUEUE's registered workers: id, host, pid, state, idle time, tasks, busy time,
    memory and nice value (the worker ID is what `sqm stop-worker` takes)."""
    settings = resolve(queue, endpoint=endpoint, config=config)
    workers = control_request(settings, {"cmd": "workers"}, timeout)["workers"]
    if as_json:
        click.echo(json.dumps(workers))
    elif workers:
        click.echo("\n".join(format_workers(workers)))
    else:
        click.echo(f"no workers on queue {settings.queue}")


def _admin_command(name: str, summary: str, render: Callable[[str, dict[str, Any]], str]) -> None:
    """Define `sqm NAME [QUEUE]`: one control command, one line of output."""

    @click.argument("queue", required=False)
    @endpoint_option
    @config_option
    @click.option("--timeout", type=float, default=3.0, show_default=True,
                  help="Seconds to wait for sqm.")
    @one_line_errors
    def command(queue: str | None, endpoint: str | None, config: str | None,
                timeout: float) -> None:
        settings = resolve(queue, endpoint=endpoint, config=config)
        reply = control_request(settings, {"cmd": name}, timeout)
        click.echo(render(settings.queue, reply))

    command.__doc__ = summary
    main.command(name)(command)


_admin_command(
    "drain",
    "Stop dispatching QUEUE's messages; pending ones stay and new ones are still accepted.",
    lambda q, r: f"queue {q}: draining, {r['pending']} pending (sqm resume {q} to continue)",
)
_admin_command(
    "resume",
    "Dispatch QUEUE's messages again after `sqm drain`.",
    lambda q, r: f"queue {q}: dispatching again, {r['pending']} were pending",
)
_admin_command(
    "purge",
    "Drop every pending message of QUEUE (no confirmation); each originator gets a Purged error.",
    lambda q, r: f"queue {q}: purged {r['purged']} pending message(s)",
)
_admin_command(
    "shutdown",
    "Stop QUEUE's sqm as SIGTERM would (pending messages failed back, or kept with --journal).",
    lambda q, r: f"queue {q}: sqm is shutting down",
)


@main.command("stop-worker")
@click.argument("args", nargs=-1, metavar="[QUEUE] ID")
@endpoint_option
@config_option
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for sqm.")
@one_line_errors
def stop_worker(args: tuple[str, ...], endpoint: str | None, config: str | None,
                timeout: float) -> None:
    """Ask worker ID (as `sqm status`/`sqm workers` show it) to finish its message and exit 0."""
    if len(args) == 2:
        queue, wid = args
    elif len(args) == 1:
        queue, wid = None, args[0]
    else:
        raise click.UsageError("expected [QUEUE] ID")
    settings = resolve(queue, endpoint=endpoint, config=config)
    control_request(settings, {"cmd": "stop-worker", "id": wid}, timeout)
    click.echo(f"queue {settings.queue}: asked worker {wid} to stop")


# ---------------------------------------------------------------- worker


def load_target(target: str) -> Any:
    """Import MODULE:ATTR (ATTR may be dotted) from the current directory or sys.path."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SQMError(f"expected MODULE:ATTR, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SQMError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SQMError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


@main.command("worker")
@click.argument("target", metavar="MODULE:ATTR")
@click.option("--queue", "-q", help="Queue to serve (default: $SQM_QUEUE, or the Worker's own).")
@click.option("--processes", "-n", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Worker processes to run under one supervising parent.")
@endpoint_option
@config_option
@click.option("--allow-pickle", is_flag=True, help="Accept pickle payloads (runs code!).")
@click.option("--heartbeat", type=float, default=None, help="Seconds between heartbeats [1.0].")
@click.option("--prefetch", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="Messages sqm may hand each worker at once (more throughput, "
              "head-of-line blocking).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 10_000), default=None,
              help="Callbacks each worker runs at once: async def ones as asyncio tasks, "
              "plain ones in threads [1, or the Worker's own].")
@log_level_option
@log_format_option
@one_line_errors
def worker_cmd(target: str, queue: str | None, processes: int, endpoint: str | None,
               config: str | None, allow_pickle: bool, heartbeat: float | None,
               prefetch: int, concurrency: int | None, log_level: str,
               log_format: str) -> None:
    """Run workers from a callbacks dict (or a Worker) found at MODULE:ATTR.

    With --processes N, a parent starts N worker processes, restarts any that
    die, forwards SIGTERM/SIGINT to them and exits when they all have.
    """
    from worker import Worker

    from . import pool

    logs.setup(log_level, log_format)
    obj = load_target(target)
    overrides = (queue or endpoint or config or heartbeat or allow_pickle or prefetch != 1
                 or concurrency is not None)
    if isinstance(obj, Worker):
        if processes == 1 and not overrides:
            pool.die_with_parent()
            obj.run()  # the Worker exactly as the module configured it
            return
        callbacks = dict(obj._callbacks)
        queue = queue or obj.queue
        concurrency = concurrency or obj.concurrency
    elif isinstance(obj, dict):
        callbacks = obj
    else:
        raise SQMError(f"{target} is neither a dict of callbacks nor a Worker")
    if not callbacks:
        raise SQMError(f"{target} defines no callbacks")
    resolve(queue, endpoint=endpoint, config=config)  # fail here, not in N children
    if processes > 1:
        argv = [sys.executable, "-m", "sqm", "worker", target, "--processes", "1",
                "--log-level", log_level, "--log-format", log_format]
        for flag, value in (("--queue", queue), ("--endpoint", endpoint), ("--config", config),
                            ("--heartbeat", heartbeat and str(heartbeat))):
            if value:
                argv += [flag, value]
        if allow_pickle:
            argv.append("--allow-pickle")
        argv += ["--prefetch", str(prefetch), "--concurrency", str(concurrency or 1)]
        sys.exit(pool.Pool(argv, processes).run())
    pool.die_with_parent()
    Worker(queue, callbacks=callbacks, endpoint=endpoint, config=config,
           allow_pickle=allow_pickle, heartbeat=heartbeat, prefetch=prefetch,
           concurrency=concurrency or 1).run()
