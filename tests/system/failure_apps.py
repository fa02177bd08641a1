"""Callbacks for the failure-handling system tests (run by ``sqm worker``).

Each callback appends what it did to ``$SQM_TEST_LOG`` (one JSON line:
pid, method, event, wall time, attempts), so a test sees from the
worker's side when each run started, whether it saw a cancel and whether
a run that sqm gave up on finished later.
"""

from __future__ import annotations

import json
import os
import threading
import time

from worker import Retry, Worker

_pause = threading.Event().wait  # simulated work that takes a given time


def _log(method: str, event: str, originator, **extra: object) -> None:
    path = os.environ.get("SQM_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "method": method, "event": event,
                                 "at": time.time(), "attempts": originator.attempts,
                                 "id": originator.message_id, **extra}) + "\n")


def echo(worker, originator, payload):
    _log("echo", "ran", originator, payload=payload)
    return {"at": time.time(), "pid": os.getpid(), "payload": payload}


def flaky(worker, originator, payload):
    """Asks for a retry until it has been retried ``payload["fail"]`` times."""
    _log("flaky", "ran", originator)
    if originator.attempts < payload["fail"]:
        raise Retry(delay=payload.get("delay", 0.2))
    return {"attempts": originator.attempts}


def hopeless(worker, originator, payload):
    _log("hopeless", "ran", originator)
    raise Retry("still failing", delay=0.1, error=ValueError("boom"))


def flaky_connection(worker, originator, payload):
    _log("conn", "ran", originator)
    raise ConnectionError("no route to the database")


def slow(worker, originator, payload):
    """Runs ``payload`` seconds, stopping early when cancelled; logs how it ended."""
    _log("slow", "started", originator)
    end = time.monotonic() + payload
    while time.monotonic() < end:
        if originator.cancelled:
            _log("slow", "saw-cancel", originator)
            return "stopped early"
        _pause(0.05)
    _log("slow", "finished", originator)
    return "finished"


def stuck(worker, originator, payload):
    """Would reply after ``payload`` seconds, far past any time limit the tests set."""
    _log("stuck", "started", originator)
    _pause(payload)
    _log("stuck", "finished", originator)
    return "late"


callbacks = {"echo": echo, "flaky": flaky, "hopeless": hopeless, "slow": slow, "stuck": stuck}

#: At most 2 retries; hopeless ends as RetriesExhausted after 3 runs.
two_retries = Worker("q", callbacks=callbacks, max_retries=2)

#: ConnectionError retried automatically, backoff 0.2 s doubling.
auto_retry = Worker("q", callbacks={"conn": flaky_connection}, retry_on=(ConnectionError,),
                    backoff=(0.2, 5.0), max_retries=3)

#: Every callback limited to 0.5 s by the worker itself.
limited = Worker("q", callbacks=callbacks, time_limit=0.5)
