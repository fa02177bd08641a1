"""Worker auto-launch (Spread::Queue's TO DO): start ``sqm serve QUEUE`` when no broker answers.

:func:`autostart_broker` is what ``Worker(..., autostart=True)`` and ``sqm
worker --autostart`` call before connecting. The broker becomes a ``daemon``
task of the pool (meta ``{"role": "sqm", "queue": Q}``, restarted on
failure) guarded by the lockfile ``<pool>/sqm-<queue>.lock``: of any number
of callers starting at once, one takes the lock and spawns, the others get
LockHeld and wait for that broker to answer. Its log is the task's output
(``sqm pool output PID``); ``sqm pool stop --meta role=sqm --meta queue=Q``
stops it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from urllib.parse import urlsplit

from ..config import resolve
from ..errors import ConfigError, LockHeld, SQMError
from .pool import Task, TaskPool

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_pause = threading.Event().wait


def is_local(endpoint: str) -> bool:
    """ipc endpoints, and tcp ones on the loopback interface."""
    if endpoint.startswith("ipc://"):
        return True
    if endpoint.startswith("tcp://"):
        return (urlsplit(endpoint).hostname or "") in LOCAL_HOSTS
    return False


def broker_answers(queue: str, endpoint: str, timeout: float = 0.5) -> bool:
    """Whether an sqm answers a status request for ``queue`` at ``endpoint``."""
    from ..admin import fetch_status
    from ..sockets import ipc_listener_alive

    if endpoint.startswith("ipc://") and not ipc_listener_alive(endpoint):
        return False
    try:
        fetch_status(resolve(queue, endpoint=endpoint), timeout=timeout)
    except SQMError:
        return False
    return True


def autostart_broker(queue: str, endpoint: str | None = None, *, config: str | None = None,
                     pool: TaskPool | None = None, timeout: float = 20.0,
                     serve_args: tuple[str, ...] = ()) -> Task | None:
    """Make sure an sqm serves ``queue`` on its (local) endpoint; start one if none answers.

    Returns the broker's task when one was started (by this caller or a
    concurrent one), None when a broker was already answering. Raises
    ConfigError for a non-local endpoint and SQMError when the broker did not
    answer within ``timeout`` s (with the tail of its output).
    """
    settings = resolve(queue, endpoint=endpoint, config=config)
    where = settings.endpoint
    if not is_local(where):
        raise ConfigError(f"autostart starts sqm on this host only; {where} is not local")
    if broker_answers(settings.queue, where):
        return None
    if pool is None:
        pool = TaskPool(os.path.join(settings.rundir, "pool"), create=True)
    meta = {"role": "sqm", "queue": settings.queue}
    argv = [sys.executable, "-m", "sqm", "serve", settings.queue, "--endpoint", where,
            *(["--config", config] if config else []), *serve_args]
    try:
        task: Task | None = pool.spawn(
            exec=argv, meta=meta, lockfile=os.path.join(pool.path, f"sqm-{settings.queue}.lock"),
            behavior="daemon", restart="on-failure", cwd=pool.path)
    except LockHeld:
        task = None  # another caller is starting it: wait for that one
    deadline = time.monotonic() + timeout
    while not broker_answers(settings.queue, where):
        if task is not None and not task.running:
            raise SQMError(f"sqm serve {settings.queue} exited ({task.info.get('exit_code')}): "
                           f"{task.output()[-500:].strip()}")
        if time.monotonic() > deadline:
            raise SQMError(f"no sqm answered for queue {settings.queue!r} at {where} "
                           f"within {timeout} s of starting one")
        _pause(0.05)
    if task is None:
        found = pool.search({"meta": meta, "state": "running"})
        task = found[0] if found else None
    return task
