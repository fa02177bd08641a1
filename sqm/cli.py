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
@log_level_option
@one_line_errors
def serve(
    queues: tuple[str, ...],
    endpoints: tuple[str, ...],
    config: str | None,
    heartbeat: float | None,
    max_pending: int | None,
    max_message_size: int | None,
    log_level: str,
) -> None:
    """Run the broker for QUEUE... in the foreground (logs on stderr).

    SIGTERM or SIGINT stops it cleanly (exit 0): pending messages are failed
    back to their senders and workers are told to wait for a new broker.
    """
    from .broker import Broker, BrokerOptions

    logs.setup(log_level)
    names = list(queues) or [None]
    if endpoints and len(endpoints) != len(names):
        raise SQMError("give one --endpoint per queue, in the same order")
    settings = [
        resolve(q, endpoint=endpoints[i] if endpoints else None, config=config)
        for i, q in enumerate(names)
    ]
    first = settings[0]
    opts = BrokerOptions(
        heartbeat=heartbeat or float(first.get("heartbeat", 1.0)),
        max_pending=max_pending or int(first.get("max_pending", 100_000)),
        max_message_size=max_message_size
        or int(first.get("max_message_size", protocol.DEFAULT_MAX_MESSAGE_SIZE)),
    )
    if opts.heartbeat <= 0 or opts.max_pending <= 0 or opts.max_message_size <= 0:
        raise SQMError("--heartbeat, --max-pending and --max-message-size must be positive")
    broker = Broker(settings, opts)
    broker.install_signal_handlers()
    log.info("sqm %s starting (pid %d)", __version__, os.getpid())
    broker.run()


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
    with Sender(settings.queue, endpoint=settings.endpoint, config=config,
                serializer=serializer, timeout=timeout) as s:
        if input_file is None:
            payload = _parse_json(payload_text, "JSON argument") if payload_text else None
            if oneway:
                click.echo(json.dumps(s.submit(method, payload, oneway=True, retries=retries)))
                return
            result = s.rpc(method, payload, timeout=timeout, retries=retries)
            click.echo(json.dumps(result, default=str))
            return
        failed = 0
        for item in _run_lines(s, method, input_file, timeout, retries, oneway, max(1, concurrency)):
            if isinstance(item, Exception):
                failed += 1
                click.echo(json.dumps(_error_json(item)))
            else:
                click.echo(json.dumps(item, default=str))
        if failed:
            sys.exit(1)


def _run_lines(s: Any, method: str, lines: Any, timeout: float, retries: int,
               oneway: bool, concurrency: int) -> Iterator[Any]:
    """Submit one message per JSON line, keeping ``concurrency`` in flight, yield in order."""
    window: list[Any] = []  # message ids (or exceptions for lines that failed early)

    def settle(entry: Any) -> Any:
        if isinstance(entry, Exception) or oneway:
            return entry
        try:
            return s.receive(id=entry, timeout=timeout)
        except SQMError as exc:
            return exc

    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            payload = _parse_json(line, f"input line {n}")
            window.append(s.submit(method, payload, timeout=timeout, retries=retries, oneway=oneway))
        except SQMError as exc:
            window.append(exc)
        if len(window) >= concurrency:
            yield settle(window.pop(0))
    while window:
        yield settle(window.pop(0))


# ---------------------------------------------------------------- status


def fetch_status(settings: Any, timeout: float) -> dict[str, Any]:
    """Ask the broker for its status over a short-lived DEALER socket."""
    require_broker(settings)
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, linger_ms=0)
    try:
        sock.connect(settings.endpoint)
        sock.send_multipart([protocol.SIGNATURE, protocol.STATUS])
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                raise SQMError(f"no answer from sqm at {settings.endpoint} within {timeout} s")
            frames = sock.recv_multipart()
            if len(frames) == 3 and frames[:2] == [protocol.SIGNATURE, protocol.STATUS]:
                return json.loads(frames[2])
    finally:
        sock.close(0)


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"queue {st['queue']} at {st.get('endpoint', '?')}   up {st['uptime_s']:.0f} s",
        f"pending {st['pending']}   in flight {st['in_flight']}   workers {st['workers_current']} "
        f"(ever {st['workers_ever']})   utilization {st['utilization'] * 100:.1f}%",
        f"assigned {st['assigned_total']}   completed {st['completed_total']}   "
        f"failed {st['failed_total']}   expired {st.get('expired_total', 0)}   "
        f"rejected {st.get('rejected_total', 0)}   redelivered {st.get('redelivered_total', 0)}   "
        f"malformed {st.get('malformed_total', 0)}",
    ]
    if st["workers"]:
        lines.append("")
        lines.append(f"{'WORKER':<40} {'HOST':<16} {'PID':>7} {'STATE':<8} {'IDLE s':>8} {'TASKS':>8}")
        for w in st["workers"]:
            lines.append(
                f"{w['id'][:40]:<40} {str(w['host'])[:16]:<16} {w['pid']:>7} {w['state']:<8} "
                f"{w['idle_s']:>8.1f} {w['tasks_done']:>8}"
            )
    return "\n".join(lines)


@main.command()
@click.argument("queue", required=False)
@endpoint_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for sqm.")
@one_line_errors
def status(queue: str | None, endpoint: str | None, config: str | None, as_json: bool,
           timeout: float) -> None:
    """Print QUEUE's live metrics (queue from $SQM_QUEUE when omitted)."""
    settings = resolve(queue, endpoint=endpoint, config=config)
    st = fetch_status(settings, timeout)
    click.echo(json.dumps(st) if as_json else format_status(st))


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
@log_level_option
@one_line_errors
def worker_cmd(target: str, queue: str | None, processes: int, endpoint: str | None,
               config: str | None, allow_pickle: bool, heartbeat: float | None,
               prefetch: int, log_level: str) -> None:
    """Run workers from a callbacks dict (or a Worker) found at MODULE:ATTR.

    With --processes N, a parent starts N worker processes, restarts any that
    die, forwards SIGTERM/SIGINT to them and exits when they all have.
    """
    from worker import Worker

    from . import pool

    logs.setup(log_level)
    obj = load_target(target)
    overrides = queue or endpoint or config or heartbeat or allow_pickle or prefetch != 1
    if isinstance(obj, Worker):
        if processes == 1 and not overrides:
            pool.die_with_parent()
            obj.run()  # the Worker exactly as the module configured it
            return
        callbacks = dict(obj._callbacks)
        queue = queue or obj.queue
    elif isinstance(obj, dict):
        callbacks = obj
    else:
        raise SQMError(f"{target} is neither a dict of callbacks nor a Worker")
    if not callbacks:
        raise SQMError(f"{target} defines no callbacks")
    resolve(queue, endpoint=endpoint, config=config)  # fail here, not in N children
    if processes > 1:
        argv = [sys.executable, "-m", "sqm", "worker", target, "--processes", "1",
                "--log-level", log_level]
        for flag, value in (("--queue", queue), ("--endpoint", endpoint), ("--config", config),
                            ("--heartbeat", heartbeat and str(heartbeat))):
            if value:
                argv += [flag, value]
        if allow_pickle:
            argv.append("--allow-pickle")
        argv += ["--prefetch", str(prefetch)]
        sys.exit(pool.Pool(argv, processes).run())
    pool.die_with_parent()
    Worker(queue, callbacks=callbacks, endpoint=endpoint, config=config,
           allow_pickle=allow_pickle, heartbeat=heartbeat, prefetch=prefetch).run()
