"""Shared pieces of the benchmark: workloads, payloads, reply checks, stats.

Everything here is used both by the orchestrator (``bench.cli``) and by the
child processes (brokers, workers, senders) it spawns, so it must stay cheap to
import and must not import sqm.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

#: Method name every worker registers and every sender calls.
METHOD = "work"
#: Length of the filler string in each payload.
PAYLOAD_LEN = 100
_FILLER = "x" * PAYLOAD_LEN


class BenchError(Exception):
    """A benchmark run went wrong (bad reply, timeout, lost process...)."""


@dataclass(frozen=True)
class Workload:
    """One benchmark scenario.

    ``kind`` is ``"rpc"`` (sequential request/reply, latency measured) or
    ``"pipelined"`` (up to ``window`` requests outstanding, throughput
    measured). Workers run as ``procs`` processes of ``threads`` workers each.
    """

    name: str
    kind: str
    n: int
    warmup: int
    procs: int
    threads: int
    window: int
    title: str

    @property
    def workers(self) -> int:
        """Total number of workers."""
        return self.procs * self.threads

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (also used to ship the workload to children)."""
        return asdict(self)


def make_workloads(quick: bool, w3_layout: tuple[int, int] = (32, 1)) -> dict[str, Workload]:
    """Return the W1..W3 definitions, with smaller counts when ``quick``."""
    p3, t3 = w3_layout
    return {
        "W1": Workload(
            "W1", "rpc", 1000 if quick else 5000, 200, 1, 1, 1, "sequential rpc, 1 sender, 1 worker"
        ),
        "W2": Workload(
            "W2",
            "pipelined",
            3000 if quick else 20000,
            200,
            2,
            1,
            200,
            "pipelined (200 outstanding), 1 sender, 2 workers",
        ),
        "W3": Workload(
            "W3",
            "pipelined",
            3000 if quick else 20000,
            200,
            p3,
            t3,
            200,
            f"pipelined (200 outstanding), 1 sender, {p3 * t3} workers ({p3} procs x {t3} threads)",
        ),
    }


def payload(i: int) -> dict[str, Any]:
    """The request body for message ``i`` (warm-up messages use ``i < 0``)."""
    return {"n": i, "s": _FILLER}


def work(body: dict[str, Any], wid: str, counts: dict[str, int]) -> dict[str, Any]:
    """What every worker computes; counts the task in ``counts``.

    Warm-up messages (``n < 0``) are counted apart from measured ones so that
    per-worker figures cover the measured phase only.
    """
    n = body["n"]
    counts["warmup" if n < 0 else "measured"] += 1
    return {"n": n + 1, "len": len(body["s"]), "w": wid}


def check_reply(reply: object) -> tuple[int, str]:
    """Validate a reply; return ``(request index, worker id)`` or raise."""
    if (
        not isinstance(reply, dict)
        or set(reply) != {"n", "len", "w"}
        or type(reply["n"]) is not int
        or reply["len"] != PAYLOAD_LEN
        or not isinstance(reply["w"], str)
    ):
        raise BenchError(f"malformed reply: {reply!r}")
    return reply["n"] - 1, reply["w"]


class Tally:
    """Checks replies and counts them per worker, per phase."""

    def __init__(self) -> None:
        self.warmup: Counter[str] = Counter()
        self.measured: Counter[str] = Counter()

    def expect(self, i: int, reply: object) -> None:
        """Check a reply that must answer request ``i``."""
        got, wid = check_reply(reply)
        if got != i:
            raise BenchError(f"reply for request {got} received while waiting for {i}")
        (self.warmup if i < 0 else self.measured)[wid] += 1

    def take(self, outstanding: set[int], reply: object) -> int:
        """Check a reply against the outstanding set and remove its request."""
        got, wid = check_reply(reply)
        try:
            outstanding.remove(got)
        except KeyError:
            raise BenchError(f"unexpected or duplicate reply for request {got}") from None
        (self.warmup if got < 0 else self.measured)[wid] += 1
        return got


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of an already sorted list."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_stats(ns: list[int]) -> dict[str, float]:
    """p50/p99/mean/max of latencies given in nanoseconds, in microseconds."""
    us = sorted(v / 1000.0 for v in ns)
    return {
        "p50_us": percentile(us, 0.50),
        "p99_us": percentile(us, 0.99),
        "mean_us": sum(us) / len(us),
        "max_us": us[-1],
    }


def wait_until(
    cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.005
) -> None:
    """Poll ``cond`` until true; raise :class:`BenchError` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def ipc_endpoint(tmp: str, name: str) -> str:
    """An ``ipc://`` endpoint for a socket file named ``name`` in ``tmp``."""
    return f"ipc://{os.path.join(tmp, name)}"


def ipc_path(endpoint: str) -> str:
    """The socket file path of an ``ipc://`` endpoint."""
    assert endpoint.startswith("ipc://"), endpoint
    return endpoint[len("ipc://") :]


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to ``path`` via a temp file + rename (readers never see half)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def run_sender_process(
    job: dict[str, Any], body: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """Child-process wrapper: run ``body(job)``, write its result or the error.

    Exits the process with status 1 on error so the orchestrator sees it even
    if the result file cannot be written.
    """
    try:
        result = body(job)
    except BaseException as exc:  # noqa: BLE001 - reported to the orchestrator
        write_json_atomic(
            job["result_path"],
            {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            },
        )
        sys.exit(1)
    write_json_atomic(job["result_path"], result)


def pipelined_result(n: int, elapsed: float, tally: Tally, warm_n: int) -> dict[str, Any]:
    """Result dict of a pipelined run."""
    return {
        "n": n,
        "elapsed_s": elapsed,
        "tasks_per_s": n / elapsed,
        "warmup_n": warm_n,
        "sender_seen_measured": dict(tally.measured),
        "sender_seen_warmup": dict(tally.warmup),
    }


def rpc_result(
    n: int, elapsed: float, lat_ns: list[int], tally: Tally, warm_n: int
) -> dict[str, Any]:
    """Result dict of a sequential rpc run."""
    res = {
        "n": n,
        "elapsed_s": elapsed,
        "rpc_per_s": n / elapsed,
        "warmup_n": warm_n,
        "sender_seen_measured": dict(tally.measured),
        "sender_seen_warmup": dict(tally.warmup),
    }
    res.update(latency_stats(lat_ns))
    return res


def warm_done(tally: Tally, expected_workers: int, count: int, minimum: int) -> bool:
    """Warm-up is over once ``minimum`` replies came and every worker answered."""
    return count >= minimum and len(tally.warmup) >= expected_workers


def merge_counts(files: Iterable[str]) -> dict[str, dict[str, int]]:
    """Merge the per-worker count files written by worker processes."""
    merged: dict[str, dict[str, int]] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            merged.update(json.load(f))
    return merged
