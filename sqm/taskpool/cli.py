"""``sqm pool``: spawn, list, inspect, signal, read and stop the tasks of a pool.

Registered in ``sqm`` as ``sqm pool`` (sqm/cli/__init__.py);
``python -m sqm.taskpool`` runs it directly.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from .pool import RESTART_POLICIES, Task, TaskPool, default_pool_path, matches
from .signals import signal_number


def pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    """``("K=V", ...)`` -> ``{"K": "V"}``; a usage error for an item without ``=``."""
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        result[key] = value
    return result


def open_pool(ctx: click.Context, create: bool = False) -> TaskPool:
    path: str | None = ctx.meta["sqm.pool.path"]
    try:
        return TaskPool(path or default_pool_path(), create=create or path is None)
    except OSError as exc:
        raise click.ClickException(f"task pool: {exc}") from None


def chosen(pool: TaskPool, pid: int | None, meta: tuple[str, ...]) -> list[Task]:
    """The task named by PID, or the running tasks matching every --meta K=V."""
    if pid is None and not meta:
        raise click.UsageError("give a PID or --meta KEY=VALUE")
    if pid is not None:
        task = pool.task_by_pid(pid)
        if task is None:
            raise click.ClickException(f"no task {pid} in {pool.path}")
        return [task]
    tasks = pool.search({"meta": pairs(meta, "--meta"), "state": "running"})
    tasks += pool.search({"meta": pairs(meta, "--meta"), "state": "restarting"})
    if not tasks:
        raise click.ClickException(f"no running task in {pool.path} matches {' '.join(meta)}")
    return tasks


def when(stamp: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def command_text(info: dict[str, Any]) -> str:
    cmd = info.get("cmd")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


@click.group("pool")
@click.option("--path", type=click.Path(file_okay=False), default=None,
              help="The pool directory.  [default: <rundir>/pool]")
@click.pass_context
def pool(ctx: click.Context, path: str | None) -> None:
    """Task pools: supervised background processes in a directory.

    Each task is a supervisor process (its pid is the task's id) that keeps
    its child's output, restarts it per --restart, holds its --lockfile and
    answers `list`, `info`, `kill`, `output` and `stop`.
    """
    ctx.meta["sqm.pool.path"] = path


@pool.command(context_settings={"ignore_unknown_options": True})
@click.option("--meta", multiple=True, metavar="K=V", help="Metadata to find the task by.")
@click.option("--lockfile", type=click.Path(dir_okay=False),
              help="Refuse to start while another task holds this lock.")
@click.option("--restart", type=click.Choice(RESTART_POLICIES), default="never", show_default=True)
@click.option("--env", multiple=True, metavar="K=V", help="Extra environment for the command.")
@click.option("--behavior", type=click.Choice(["background", "daemon"]), default="background",
              show_default=True, help="daemon: also leave this session (setsid).")
@click.option("--max-output", type=click.IntRange(0), default=65536, show_default=True,
              help="Bytes of recent output kept in memory.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def spawn(ctx: click.Context, meta: tuple[str, ...], lockfile: str | None, restart: str,
          env: tuple[str, ...], behavior: str, max_output: int, command: tuple[str, ...]) -> None:
    """Start COMMAND as a supervised task and print its pid.

    One argument runs through /bin/sh (`-- 'while sleep 1; do date; done'`);
    several are run directly (`-- sleep 60`).
    """
    from ..errors import SQMError

    task_pool = open_pool(ctx, create=True)
    shell = len(command) == 1
    try:
        task = task_pool.spawn(
            cmd=command[0] if shell else None, exec=None if shell else list(command),
            meta=pairs(meta, "--meta"), lockfile=lockfile, env=pairs(env, "--env"),
            restart=restart, behavior=behavior, max_output=max_output)
    except (SQMError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(task.pid)


@pool.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of info objects.")
@click.option("--meta", multiple=True, metavar="K=V", help="Only tasks with this metadata.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool, meta: tuple[str, ...]) -> None:
    """List the pool's tasks (running, restarting and exited)."""
    task_pool = open_pool(ctx)
    pattern = {"meta": pairs(meta, "--meta")} if meta else None
    infos = [info for _, info in task_pool.infos() if pattern is None or matches(pattern, info)]
    if as_json:
        click.echo(json.dumps(infos))
        return
    rows = [("PID", "STATE", "CHILD", "EXIT", "RESTARTS", "STARTED", "META", "COMMAND")]
    for info in infos:
        meta_text = " ".join(f"{k}={v}" for k, v in sorted(info.get("meta", {}).items()))
        rows.append((str(info["pid"]), str(info.get("state")), str(info.get("child_pid") or "-"),
                     "-" if info.get("exit_code") is None else str(info["exit_code"]),
                     str(info.get("restarts", 0)), when(info.get("started_at")),
                     meta_text or "-", command_text(info)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


@pool.command()
@click.argument("pid", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the info object as JSON.")
@click.pass_context
def info(ctx: click.Context, pid: int, as_json: bool) -> None:
    """Show one task's info."""
    (task,) = chosen(open_pool(ctx), pid, ())
    data = task.info
    if as_json:
        click.echo(json.dumps(data))
        return
    for key, value in data.items():
        if key in ("started_at", "child_started_at"):
            value = f"{value} ({when(value)})" if value else value
        elif key == "meta":
            value = json.dumps(value)
        elif key == "cmd":
            value = command_text(data)
        click.echo(f"{key + ':':<18} {'-' if value is None else value}")


@pool.command()
@click.argument("pid", type=int, required=False)
@click.option("--meta", multiple=True, metavar="K=V", help="Every running task with this metadata.")
@click.option("--signal", "sig", default="TERM", show_default=True,
              help="Signal name (INT, SIGHUP...) or number.")
@click.pass_context
def kill(ctx: click.Context, pid: int | None, meta: tuple[str, ...], sig: str) -> None:
    """Send a signal to the child of a task (its whole process group)."""
    try:
        signal_number(sig)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--signal") from None
    missed = [t.pid for t in chosen(open_pool(ctx), pid, meta) if not t.kill(sig)]
    if missed:
        raise click.ClickException(f"no child running in task {', '.join(map(str, missed))}")


@pool.command()
@click.argument("pid", type=int)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the task exits.")
@click.pass_context
def output(ctx: click.Context, pid: int, follow: bool) -> None:
    """Print a task's recent output (stdout and stderr together)."""
    (task,) = chosen(open_pool(ctx), pid, ())
    out = sys.stdout.buffer
    if not follow:
        out.write(task.output_bytes())
        out.flush()
        return
    for chunk in task.follow():
        out.write(chunk)
        out.flush()


@pool.command()
@click.argument("pid", type=int, required=False)
@click.option("--meta", multiple=True, metavar="K=V", help="Every running task with this metadata.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for each task to end.")
@click.pass_context
def stop(ctx: click.Context, pid: int | None, meta: tuple[str, ...], timeout: float) -> None:
    """End a task's child and its supervisor (no restart)."""
    from ..errors import Timeout

    for task in chosen(open_pool(ctx), pid, meta):
        try:
            task.terminate_supervisor(timeout)
        except Timeout as exc:
            raise click.ClickException(str(exc)) from None


@pool.command()
@click.pass_context
def clean(ctx: click.Context) -> None:
    """Remove the entries (state and output files) of exited tasks."""
    click.echo(open_pool(ctx).clean())


def run() -> None:
    """``python -m sqm.taskpool``."""
    pool.main(prog_name="sqm pool", auto_envvar_prefix=None)


