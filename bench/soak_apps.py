"""The worker side of the fault-injection soak (``python -m bench.soak``).

Run by ``sqm worker bench.soak_apps:callbacks --queue soak``. ``work``
returns its payload (an int, unique per message) after a tiny random sleep,
and first appends one line ``<payload>\\n`` per execution to
``$SQM_SOAK_EXEC_DIR/<pid>.log``: one ``os.write`` on an ``O_APPEND``
descriptor, so a line is whole even if the process is SIGKILLed right after,
and the harness can count how often each message ran (at-least-once
redeliveries show up as payloads with more than one line).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

EXEC_DIR_ENV = "SQM_SOAK_EXEC_DIR"

_fd: int | None = None
_fd_pid: int | None = None


def _log_fd() -> int | None:
    global _fd, _fd_pid
    pid = os.getpid()
    if _fd is None or _fd_pid != pid:
        directory = os.environ.get(EXEC_DIR_ENV)
        if not directory:
            return None
        _fd = os.open(os.path.join(directory, f"{pid}.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fd_pid = pid
    return _fd


def work(worker: Any, originator: Any, payload: Any) -> Any:
    """Record this execution, sleep 0-2 ms, return the payload unchanged."""
    fd = _log_fd()
    if fd is not None:
        os.write(fd, b"%d\n" % payload)
    pause = random.random() * 0.002
    if pause > 0.0002:
        time.sleep(pause)  # simulated work, not synchronization
    return payload


callbacks = {"work": work}
