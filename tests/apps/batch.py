"""Callbacks for the batch, callback and many-broker tests (real worker processes).

Like tests/apps.py, they append to ``$SQM_TEST_LOG`` (one JSON line per
event, appended and flushed at once), so tests can see from the workers'
side how many messages ran at the same time.
"""

from __future__ import annotations

import os
import threading
import time

from tests.apps import _log
from tests.apps import callbacks as _base

_pause = threading.Event().wait  # simulated work that takes a given time


def square(worker, originator, payload):
    """``x * x``; a negative ``x`` raises ValueError (a failed item)."""
    x = payload["x"] if isinstance(payload, dict) else payload
    if x < 0:
        raise ValueError(f"negative: {x}")
    _pause(payload.get("s", 0) if isinstance(payload, dict) else 0)
    return x * x


def tracked(worker, originator, payload):
    """Log enter, work ``payload['s']`` seconds, log exit, reply ``x * x``.

    The enter/exit lines of all worker processes interleave in the log in
    the order they happened, so a scan gives the concurrency at the workers.
    """
    _log("enter", payload["x"])
    _pause(payload.get("s", 0.1))
    _log("exit", payload["x"])
    return payload["x"] * payload["x"]


def steps(worker, originator, payload):
    """Report progress 1..n of n, then reply ``{"steps": n}``."""
    n = payload["n"]
    for i in range(1, n + 1):
        worker.progress(originator, i, n)
    return {"steps": n}


def gated(worker, originator, payload):
    """Report progress 1/2, wait until the file ``payload['gate']`` exists, then reply."""
    worker.progress(originator, 1, 2)
    deadline = time.monotonic() + payload.get("max_wait", 20)
    while not os.path.exists(payload["gate"]) and time.monotonic() < deadline:
        _pause(0.01)
    worker.progress(originator, 2, 2)
    return "opened"


callbacks = dict(_base, square=square, tracked=tracked, steps=steps, gated=gated)


def max_concurrency(entries: list[dict]) -> int:
    """The most ``tracked`` calls that were inside their callback at once."""
    running = peak = 0
    for e in entries:
        if e["kind"] == "enter":
            running += 1
            peak = max(peak, running)
        elif e["kind"] == "exit":
            running -= 1
    return peak
