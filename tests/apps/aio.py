"""Callbacks for the async-worker, progress and many-broker tests.

Like tests/apps.py, each worker process appends what it did to
``$SQM_TEST_LOG`` (one JSON line, flushed at once). Starts record how many
callbacks of this process were running at that moment (``running``), so a
test can prove a limit was never exceeded from the worker's own side.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading

_busy_for = threading.Event().wait  # simulated blocking work of a given length
_lock = threading.Lock()
_running = 0


def _log(kind: str, payload: object, **extra: object) -> None:
    path = os.environ.get("SQM_TEST_LOG")
    if path:
        line = {"pid": os.getpid(), "kind": kind, "payload": payload, **extra}
        with _lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")


def _enter() -> int:
    global _running
    with _lock:
        _running += 1
        return _running


def _exit() -> None:
    global _running
    with _lock:
        _running -= 1


async def nap(worker, originator, payload):
    """Sleep ``payload['s']`` on the event loop; log start (with concurrency) and end."""
    _log("start", payload, running=_enter())
    try:
        await asyncio.sleep(payload["s"])
    finally:
        _exit()
    _log("end", payload)
    return {"pid": os.getpid(), "slept": payload["s"]}


def block(worker, originator, payload):
    """Block ``payload['s']`` seconds (a plain callback); logged like ``nap``."""
    _log("start", payload, running=_enter())
    try:
        _busy_for(payload["s"])
    finally:
        _exit()
    _log("end", payload)
    return {"pid": os.getpid(), "slept": payload["s"]}


async def steps(worker, originator, payload):
    """Report progress 1..n of n, then answer with respond() (from a coroutine)."""
    n = payload["n"]
    for i in range(1, n + 1):
        await asyncio.sleep(0)
        worker.progress(originator, i, n)
    worker.respond(originator, {"steps": n, "pid": os.getpid()})


def sync_steps(worker, originator, payload):
    """The plain-callback version of ``steps`` (returns its reply)."""
    n = payload["n"]
    for i in range(1, n + 1):
        worker.progress(originator, i, n)
    return {"steps": n, "pid": os.getpid()}


async def async_boom(worker, originator, payload):
    await asyncio.sleep(0)
    raise KeyError(payload)


def pid(worker, originator, payload):
    return os.getpid()


callbacks = {
    "nap": nap,
    "block": block,
    "steps": steps,
    "sync_steps": sync_steps,
    "async_boom": async_boom,
    "pid": pid,
}
