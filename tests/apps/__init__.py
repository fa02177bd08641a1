"""Callbacks the integration tests run in real worker processes.

Each worker process appends what it handled to ``$SQM_TEST_LOG`` (one JSON
line per message, flushed at once), so tests can prove exactly-once and FIFO
from the workers' side, not only from the replies.
"""

from __future__ import annotations

import json
import os
import threading

_busy_for = threading.Event().wait  # simulated work that takes a given time


def _log(kind: str, payload: object) -> None:
    path = os.environ.get("SQM_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "kind": kind, "payload": payload}) + "\n")


def myfunc(worker, originator, payload):
    worker.respond(originator, {"response": "I heard you!"})


def echo(worker, originator, payload):
    return payload


def add(worker, originator, payload):
    return payload["a"] + payload["b"]


def record(worker, originator, payload):
    """Log the payload, reply with it and this worker's pid."""
    _log("record", payload)
    return {"payload": payload, "pid": os.getpid()}


def boom(worker, originator, payload):
    raise ValueError(f"bad things: {payload}")


def sleep(worker, originator, payload):
    """Log start, sleep ``payload['s']`` seconds, log the end, reply with the pid."""
    _log("start", payload)
    _busy_for(payload["s"])
    _log("end", payload)
    return {"pid": os.getpid(), "slept": payload["s"]}


def pid(worker, originator, payload):
    return os.getpid()


def types(worker, originator, payload):
    """Return the payload and the name of its Python type (serializer checks)."""
    return {"echo": payload, "type": type(payload).__name__}


callbacks = {
    "myfunc": myfunc,
    "echo": echo,
    "add": add,
    "record": record,
    "boom": boom,
    "sleep": sleep,
    "pid": pid,
    "types": types,
}
