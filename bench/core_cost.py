"""CPU cost of the broker core per message, without sockets: ``python -m bench.core_cost``.

Drives :class:`sqm.core.QueueCore` through submit → dispatch → done cycles
(the hot path) and prints the best of several runs in µs per message. Being
pure Python with no I/O, it is far less noisy than the end-to-end benchmark,
so it shows what bookkeeping (metrics, histograms) costs: run it on two
checkouts (``PYTHONPATH=<other checkout> python -m bench.core_cost``) to compare.
"""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any, TypedDict, cast

from sqm.core import Message, QueueCore


class _MessageArgs(TypedDict, total=False):
    """Keyword arguments for Message; ``method`` only where the core has it (older checkouts)."""

    method: bytes


ARGS: _MessageArgs = (
    {"method": b"work"} if "method" in inspect.signature(Message).parameters else {})


def cycle_cost(n: int, workers: int, backlog: bool, advertise: bool = False) -> float:
    """µs per message for ``n`` messages through ``workers`` one-slot workers.

    ``advertise``: the workers name the methods they serve (as every Worker
    does since abilities) instead of serving everything.
    """
    core = QueueCore("bench", 0.0, max_pending=n + 1)
    for i in range(workers):
        info: dict[str, object] = {"id": f"w{i}", "slots": 1}
        if advertise:
            info["methods"] = ["work"]
        core.hello(0.0, b"w%d" % i, info)
    msgs = [Message(b"m%d" % i, b"origin", None, **ARGS) for i in range(n)]
    # Plain tuples: entries are read by position so that older checkouts, whose
    # outbox held (kind, rid, msg) tuples rather than Dispatch, work as well.
    out = cast("list[tuple[Any, ...]]", core.outbox)
    t0 = time.perf_counter()
    now = 1.0
    if backlog:  # everything queued first, then worked off by done() calls
        for m in msgs:
            core.submit(now, m)
        while core.in_flight:
            for entry in out:  # only dispatches here; [-2] and [-1] fit old and new shapes
                core.done(now, entry[-2], entry[-1].id)
            out.clear()
    else:  # steady state: each message finds an idle worker
        for m in msgs:
            core.submit(now, m)
            rid = out[-1][-2]  # the dispatch's worker, in old and new entry shapes
            out.clear()
            core.done(now, rid, m.id)
            now += 1e-4
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args()
    # An older core ignores "methods" in HELLO: its advertised rows equal the others.
    cases = [("idle worker (W1-like)", 1, False, False),
             ("backlog, 4 workers (W5-like)", 4, True, False),
             ("idle worker, advertised method", 1, False, True),
             ("backlog, 4 workers, advertised method", 4, True, True)]
    for label, workers, backlog, advertise in cases:
        best = min(cycle_cost(a.n, workers, backlog, advertise) for _ in range(a.repeat))
        print(f"{label:<40} {best:6.2f} µs/message (best of {a.repeat})")


if __name__ == "__main__":
    main()
