"""``sqm worker MODULE:ATTR``: run one worker, or a fleet of them as tasks of a pool."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from .. import logs, pool
from ..config import resolve
from ..errors import SQMError
from ..protocol import DEFAULT_PREFETCH
from ..taskpool.autoscale import parse_autoscale
from ..taskpool.autostart import autostart_broker, is_local
from ..taskpool.fleet import FLEET_ENV, RECYCLED
from .options import (
    config_option,
    endpoint_option,
    key_options,
    log_format_option,
    log_level_option,
    one_line_errors,
)

log = logging.getLogger("sqm.cli")

#: Top-level packages this distribution installs next to each other.
OWN_PACKAGES = ("sqm", "sender", "worker")
_SQM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _where(exc: BaseException) -> str:
    """Where the user's code raised ``exc``: " (FILE, line N)", or "" if unknown."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}, line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(("<frozen ", _SQM_DIR))]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def load_target(target: str) -> Any:
    """Import MODULE:ATTR (ATTR may be dotted) from the current directory or sys.path.

    A module that fails to import is reported in one line that points at the
    user's own code; ``--log-level debug`` logs the full traceback first.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SQMError(f"expected MODULE:ATTR, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported
        log.debug("importing %s failed", module_name, exc_info=True)
        if isinstance(exc, ImportError) and exc.name == module_name:
            raise SQMError(f"cannot import {module_name!r}: {exc}") from None
        detail = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise SQMError(f"cannot import {module_name!r}: {type(exc).__name__}: {detail}"
                       f"{_where(exc)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            hint = ""
            if module_name.partition(".")[0] in OWN_PACKAGES:
                hint = f" ({module_name!r} is sqm's own package: rename your module)"
            raise SQMError(f"{module_name!r} has no attribute {attr!r}{hint}") from None
    return obj


def parse_autoscale_option(_ctx: click.Context, _param: click.Parameter,
                           value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_autoscale(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("worker")
@click.argument("target", metavar="MODULE:ATTR")
@click.option("--queue", "-q", help="Queue to serve (default: $SQM_QUEUE, or the Worker's own).")
@click.option("--processes", "-n", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Worker processes to run as tasks of a pool (see `sqm pool`).")
@endpoint_option
@config_option
@key_options
@click.option("--allow-pickle", is_flag=True, help="Accept pickle payloads (runs code!).")
@click.option("--heartbeat", type=float, default=None, help="Seconds between heartbeats [1.0].")
@click.option("--prefetch", type=click.IntRange(1, 10_000), default=DEFAULT_PREFETCH,
              show_default=True,
              help="Messages sqm may hand each worker at once: they flow in batches; "
              "the ones waiting behind a callback that runs long go back to sqm for "
              "another worker. 1: one at a time.")
@click.option("--concurrency", "-c", type=click.IntRange(1, 10_000), default=None,
              help="Callbacks each worker runs at once: async def ones as asyncio tasks, "
              "plain ones in threads [1, or the Worker's own].")
@click.option("--max-tasks-per-child", type=click.IntRange(1), default=None, metavar="N",
              help="Replace a worker process once it has finished N messages.")
@click.option("--max-memory-per-child", type=click.FloatRange(min=1, min_open=False),
              default=None, metavar="MB",
              help="Replace a worker process whose memory is past MB after a message.")
@click.option("--autoscale", metavar="MAX,MIN", callback=parse_autoscale_option,
              help="Grow to MAX processes while messages wait, shrink to MIN when idle.")
@click.option("--pool", "pool_path", type=click.Path(file_okay=False), default=None,
              help="The task pool of the worker processes.  [default: <rundir>/pool]")
@click.option("--autostart", is_flag=True,
              help="Start `sqm serve QUEUE` (a pool task) if no broker answers locally.")
@log_level_option
@log_format_option
@one_line_errors
def worker(target: str, queue: str | None, processes: int, endpoint: str | None,
           config: str | None, allow_pickle: bool, heartbeat: float | None,
           prefetch: int, concurrency: int | None, max_tasks_per_child: int | None,
           max_memory_per_child: float | None, autoscale: tuple[int, int] | None,
           pool_path: str | None, autostart: bool, log_level: str,
           log_format: str) -> None:
    """Run workers from a callbacks dict (or a Worker) found at MODULE:ATTR.

    With --processes N (or --autoscale, --max-*-per-child, --pool) the worker
    processes are tasks of a pool (`sqm pool list --meta queue=Q`): a crashed
    one is restarted, one past its limits replaced once it finished its
    message; SIGTERM/SIGINT stop them all gracefully, and they end with this
    process even if it is killed.
    """
    from worker import Worker

    logs.setup(log_level, log_format)
    obj = load_target(target)
    pool_child = os.environ.pop(FLEET_ENV, None) is not None  # a fleet's worker: just serve
    limits = max_tasks_per_child is not None or max_memory_per_child is not None
    fleet = not pool_child and (processes > 1 or autoscale is not None or limits
                                or pool_path is not None)
    overrides = (queue or endpoint or config or heartbeat or allow_pickle or prefetch != DEFAULT_PREFETCH
                 or concurrency is not None or limits or autostart or fleet)
    callbacks: dict[str, Callable[..., Any]]
    failure: dict[str, Any] = {}  # a Worker's retry and time-limit settings, kept
    if isinstance(obj, Worker):
        if not overrides:
            obj.run()  # the Worker exactly as the module configured it
            return
        callbacks = dict(obj._callbacks)
        queue = queue or obj.queue
        concurrency = concurrency or obj.concurrency
        failure = {"max_retries": obj.max_retries, "retry_on": obj.retry_on,
                   "backoff": obj.backoff, "time_limit": obj.time_limit or None}
    elif isinstance(obj, dict):
        callbacks = obj
    else:
        raise SQMError(f"{target} is neither a dict of callbacks nor a Worker")
    if not callbacks:
        raise SQMError(f"{target} defines no callbacks")
    not_callable = sorted(str(name) for name, fn in callbacks.items() if not callable(fn))
    if not_callable:
        raise SQMError(f"{target}: not callable: {', '.join(not_callable)}")
    settings = resolve(queue, endpoint=endpoint, config=config)  # fail here, not in N children
    if fleet:
        if autostart:
            for where in settings.endpoints:
                if is_local(where):
                    autostart_broker(settings.queue, where, config=config)
        child_args = ["--log-level", log_level, "--log-format", log_format,
                      "--prefetch", str(prefetch), "--concurrency", str(concurrency or 1)]
        for flag, value in (("--endpoint", endpoint), ("--config", config),
                            ("--heartbeat", heartbeat and str(heartbeat)),
                            ("--max-tasks-per-child", max_tasks_per_child and str(max_tasks_per_child)),
                            ("--max-memory-per-child",
                             max_memory_per_child and str(max_memory_per_child))):
            if value:
                child_args += [flag, value]
        if allow_pickle:
            child_args.append("--allow-pickle")
        sys.exit(pool.run_fleet(target, settings.queue, processes, child_args,
                                pool_path=pool_path, autoscale=autoscale, endpoint=endpoint,
                                config=config))
    served = Worker(queue, callbacks=callbacks, endpoint=endpoint, config=config,
                    allow_pickle=allow_pickle, heartbeat=heartbeat, prefetch=prefetch,
                    concurrency=concurrency or 1, autostart=autostart,
                    max_tasks=max_tasks_per_child, max_memory_mb=max_memory_per_child, **failure)
    served.exit_on_time_limit = pool_child  # its supervisor replaces a stuck child
    served.run()
    if served.recycled and pool_child:
        sys.exit(RECYCLED)  # the fleet starts another
