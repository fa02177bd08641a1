"""Callbacks for the abilities and follow-up system tests (run by ``sqm worker``).

Each callback appends what it ran to ``$SQM_TEST_LOG`` (one JSON line: pid,
method, payload), so tests prove from the workers' side where each method
ran and how often.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading

_busy_for = threading.Event().wait  # simulated work that takes a given time


def _log(method: str, payload: object, **extra: object) -> None:
    path = os.environ.get("SQM_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "method": method, "payload": payload,
                                 **extra}) + "\n")


def _ran(method: str):
    def fn(worker, originator, payload):
        _log(method, payload)
        if isinstance(payload, dict) and payload.get("sleep"):
            _busy_for(payload["sleep"])
        return {"method": method, "pid": os.getpid()}
    return fn


only_a = {"a": _ran("a")}
only_b = {"b": _ran("b")}
a_and_b = {"a": _ran("a"), "b": _ran("b")}


def grow(worker, originator, payload):
    """Starts serving "late" from inside a callback: callbacks() at runtime."""
    worker.callbacks(late=_ran("late"))
    return "grown"


def shrink(worker, originator, payload):
    worker.callbacks(late=None)
    return "shrunk"


growing = {"grow": grow, "shrink": shrink}

# ----------------------------------------------------------------- follow-up work


def inner(worker, originator, payload):
    _log("inner", payload)
    return payload * 2


def outer(worker, originator, payload):
    """A sub-rpc from a callback."""
    return {"inner": worker.rpc("inner", payload, timeout=10), "pid": os.getpid()}


def fan_out(worker, originator, payload):
    """submit several, then receive them by id and without an id."""
    ids = [worker.submit("inner", n) for n in payload]
    first = worker.receive(id=ids[0], timeout=10)
    rest = sorted(worker.receive(timeout=10) for _ in ids[1:])
    return [first, *rest]


def fan_out_by_id(worker, originator, payload):
    """submit several, then receive each by id: safe beside other callbacks of
    this worker waiting at once (a receive() without an id takes whichever of
    the worker's follow-up replies comes first, theirs too)."""
    ids = [worker.submit("inner", n) for n in payload]
    return [worker.receive(id=i, timeout=10) for i in ids]


def other_queue(worker, originator, payload):
    return worker.rpc("inner", payload, queue=os.environ["SQM_OTHER_QUEUE"], timeout=10)


def unknown_inner(worker, originator, payload):
    try:
        worker.rpc("nobody-serves-this", payload, timeout=10)
    except Exception as exc:  # noqa: BLE001 - the error type is the answer
        return getattr(exc, "type", type(exc).__name__)
    return "no error"


def self_wait(worker, originator, payload):
    """Waits on its own queue: the deadlock case when every worker does it."""
    try:
        return worker.rpc("inner", payload, timeout=payload and 1.0)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__


async def a_outer(worker, originator, payload):
    first = await worker.rpc("inner", payload, timeout=10)
    mid = await worker.submit("inner", payload + 1)
    second = await worker.receive(id=mid, timeout=10)
    return [first, second]


async def a_inner(worker, originator, payload):
    await asyncio.sleep(0)
    _log("inner", payload)
    return payload * 2


followers = {"inner": inner, "outer": outer, "fan_out": fan_out, "other_queue": other_queue,
             "unknown_inner": unknown_inner, "self_wait": self_wait}
async_followers = {"inner": a_inner, "a_outer": a_outer, "outer": outer, "fan_out": fan_out,
                   "fan_out_by_id": fan_out_by_id}
inner_only = {"inner": inner}

# ----------------------------------------------------------------- forward chains


def step1(worker, originator, payload):
    _log("step1", payload, hops=originator.hops)
    if isinstance(payload, dict) and payload.get("sleep"):
        _busy_for(payload["sleep"])
    worker.progress(originator, 1, 3)
    worker.forward(originator, "step2", {"trail": ["step1"], **payload})


def step2(worker, originator, payload):
    _log("step2", payload, hops=originator.hops)
    worker.progress(originator, 2, 3)
    worker.forward(originator, "step3", {**payload, "trail": [*payload["trail"], "step2"]})


def step3(worker, originator, payload):
    _log("step3", payload, hops=originator.hops)
    _busy_for(0.2)  # some work: the earlier steps' progress reaches the caller first
    return {"trail": [*payload["trail"], "step3"], "hops": originator.hops, "pid": os.getpid()}


def spin(worker, originator, payload):
    _log("spin", payload, hops=originator.hops)
    worker.forward(originator, "spin", payload)


def step2_dies(worker, originator, payload):
    _log("step2-dying", payload, hops=originator.hops)
    os._exit(3)  # the worker dies holding the step: sqm retries it elsewhere


chain_front = {"step1": step1, "step3": step3, "spin": spin}
chain_middle_dies = {"step2": step2_dies}
chain_middle = {"step2": step2}
