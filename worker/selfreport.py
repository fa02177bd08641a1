"""What a worker says about its own process in each heartbeat.

Operators want to see memory, priority and load per worker in ``sqm status``
without another round trip, so the heartbeat thread attaches this report to
the heartbeat it sends anyway (``[SQM1, H, worker-id, json]``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Protocol

from sqm.protocol import encode_json

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: The process figures are the same for every worker of the process: read at
#: most this often (s) however many worker threads report. Each read gives up
#: the GIL twice; with 250 workers a process, 250 reads a second kept
#: heartbeat threads waiting for it.
PROCESS_FIGURES_S = 0.5
_process: tuple[float, int, int] = (-1e18, 0, 0)  # (monotonic time read, rss, nice)


class Reporting(Protocol):
    """The worker attributes a report is made of."""

    host: str
    pid: int
    started_at: float

    @property
    def tasks_done(self) -> int: ...

    @property
    def busy_s(self) -> float: ...


def rss_bytes() -> int:
    """Resident memory of this process now (peak resident where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def nice() -> int:
    """The process's nice value (its main thread's, as ``ps`` shows it)."""
    try:
        # On Linux the priority is per thread; the pid names the main thread,
        # so this is right even when called from the heartbeat thread.
        return os.getpriority(os.PRIO_PROCESS, os.getpid())
    except (AttributeError, OSError):
        return 0


def process_figures() -> tuple[int, int]:
    """(rss_bytes, nice) of this process, at most ``PROCESS_FIGURES_S`` old."""
    global _process
    at, rss, prio = _process
    now = time.monotonic()
    if now - at >= PROCESS_FIGURES_S:
        rss, prio = rss_bytes(), nice()
        _process = (now, rss, prio)  # one tuple: a thread reading it sees one whole reading
    return rss, prio


def report(worker: Reporting) -> dict[str, Any]:
    """The self-report as a dict (see docs/PROTOCOL.md, HEARTBEAT)."""
    rss, prio = process_figures()
    return {
        "host": worker.host,
        "pid": worker.pid,
        "rss_bytes": rss,
        "nice": prio,
        "started_at": worker.started_at,
        "tasks_done": worker.tasks_done,
        "busy_s": round(worker.busy_s, 6),
    }


def encode(worker: Reporting) -> bytes:
    """The self-report as the heartbeat's fourth frame."""
    return encode_json(report(worker))
