"""Shared pieces of the benchmark: workloads, payloads, reply checks, stats.

Everything here is used both by the orchestrator (``bench.cli``) and by the
child processes (brokers, workers, senders) it spawns, so it must stay cheap to
import and must not import sqm.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
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

    ``kind`` is ``"rpc"`` (sequential request/reply, latency measured),
    ``"pipelined"`` (up to ``window`` requests outstanding, throughput
    measured) or ``"backlog"`` (``n`` requests submitted while no worker
    runs, then workers start and drain them). Workers run as ``procs``
    processes of ``threads`` workers each, each worker taking ``prefetch``
    messages at a time (its credit). With ``idle_s > 0`` the orchestrator
    waits until every worker is registered and measures the broker's CPU for
    ``idle_s`` seconds before the sender starts. ``systems`` limits the
    systems the workload runs on (empty: all); ``base`` names the workload
    whose figures the derived ratios refer to. ``prefetch`` 0 (the default)
    means the sqm Worker's own default, and credit 1 for the baseline.
    ``rate`` (W8): submissions per second, paced (open loop). ``senders``
    over ``sender_procs`` processes (W9): that many concurrent senders,
    each doing sequential rpcs.
    """

    name: str
    kind: str
    n: int
    warmup: int
    procs: int
    threads: int
    window: int
    title: str
    prefetch: int = 0
    idle_s: float = 0.0
    systems: tuple[str, ...] = ()
    base: str = ""
    rate: float = 0.0
    senders: int = 0
    sender_procs: int = 0
    via: str = ""  # "map": sqm's sync Sender pipelines with Sender.map(), not submit()

    @property
    def workers(self) -> int:
        """Total number of workers."""
        return self.procs * self.threads

    def runs_on(self, system: str) -> bool:
        """Whether this workload is defined for ``system``."""
        return not self.systems or system in self.systems

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (also used to ship the workload to children)."""
        return asdict(self)


#: Credits per worker of the throughput-mode variants of W2.
PREFETCH_VARIANTS = (2, 8, 32)
#: The documented throughput setting's Worker prefetch (W2-map; README, Throughput mode).
DOCUMENTED_PREFETCH = 32
#: Workload names in run and table order.
WORKLOAD_ORDER = (
    "W1",
    "W1-p1",
    "W2",
    *(f"W2-p{p}" for p in PREFETCH_VARIANTS),
    "W2-map",
    "W3",
    "W4",
    "W5",
    "W5-p16",
    "W6",
    "W7",
    "W8",
    "W8-p1",
    "W9",
    "W9-64",
)

#: W8 (head-of-line): measured message ``i`` is slow when ``i % W8_SLOW_EVERY
#: == W8_SLOW_AT`` (1 %, evenly spread); a slow one takes W8_SLOW_S seconds.
W8_SLOW_EVERY = 100
W8_SLOW_AT = 50
W8_SLOW_S = 0.2
#: W8 submissions per second: slow work then fills ~25 % of one of the 2
#: workers, so a short message waits only behind what sits in a busy
#: worker's local queue (head-of-line), not behind a saturated pool.
W8_RATE = 250.0
#: Set (to "1") in the worker processes' environment for a W8 run.
W8_ENV = "SQM_BENCH_W8"


def w8_slow(n: int) -> bool:
    """Whether message ``n`` is one of W8's slow ones (warm-up ones never are)."""
    return n >= 0 and n % W8_SLOW_EVERY == W8_SLOW_AT


def work_w8(body: dict[str, Any], wid: str, counts: dict[str, int]) -> dict[str, Any]:
    """:func:`work`, after sleeping W8_SLOW_S for the slow messages."""
    if w8_slow(body["n"]):
        time.sleep(W8_SLOW_S)  # the task's own duration, not a synchronisation
    return work(body, wid, counts)


def hol_stats(short_s: list[float], slow_s: list[float]) -> dict[str, float]:
    """W8's figures from submit-to-reply times in seconds: the short messages'
    p50/p99/max and the slow ones' p50, in ms."""
    short = sorted(x * 1000 for x in short_s)
    slow = sorted(x * 1000 for x in slow_s)
    return {
        "short_p50_ms": percentile(short, 0.50),
        "short_p99_ms": percentile(short, 0.99),
        "short_max_ms": short[-1] if short else math.nan,
        "slow_p50_ms": percentile(slow, 0.50),
        "slow_n": len(slow),
    }


#: W9: rpcs per sender, so that both sizes make the same total.
W9_TOTAL = 20480
W9_TOTAL_QUICK = 2048
#: W9 warm-up rpcs per sender (its first connection to a worker's mailbox).
W9_WARMUP_EACH = 2
#: W9 sender processes (both sizes: only the number of senders differs).
W9_PROCS = 8

#: W7: scheduled messages, due evenly over this many seconds.
W7_SPREAD_S = 10.0


def w7_lead(n: int) -> float:
    """Seconds from the start of W7's submissions to the first due time: long
    enough for the sender to submit all ``n`` (the broker then holds them all)."""
    return 2.0 + n / 20_000

#: W6: 8 methods over 16 workers, each serving 2 of them (every method by 4
#: workers); the sender's mix is skewed, so the rarest method's workers are
#: mostly busy with the common ones: how long does a message of it wait?
W6_METHODS = tuple(f"m{i}" for i in range(8))
W6_WEIGHTS = (32, 16, 8, 8, 4, 4, 2, 1)  # the last method is the starved one
#: Set (to "1") in the worker processes' environment for a W6 run.
W6_ENV = "SQM_BENCH_W6"


def w6_methods(g: int) -> tuple[str, str]:
    """The two methods worker ``g`` (0..15) serves: each method gets 4 workers."""
    first = g % 8
    second = (g + 1) % 8 if g < 8 else (g + 3) % 8
    return W6_METHODS[first], W6_METHODS[second]


def w6_method(i: int) -> str:
    """Method of measured message ``i``: the skewed mix, spread evenly over the run."""
    total = sum(W6_WEIGHTS)
    slot = (i * 37) % total  # a stride coprime with the total: an even interleaving
    for name, weight in zip(W6_METHODS, W6_WEIGHTS, strict=True):
        if slot < weight:
            return name
        slot -= weight
    return W6_METHODS[-1]


def make_workloads(
    quick: bool,
    w3_layout: tuple[int, int] = (32, 1),
    w4_layout: tuple[int, int] = (4, 250),
    w4_idle_s: float | None = None,
) -> dict[str, Workload]:
    """Return every workload definition, with smaller counts when ``quick``."""
    p3, t3 = w3_layout
    p4, t4 = w4_layout
    n2 = 3000 if quick else 20000
    n5 = 10000 if quick else 100000
    idle = w4_idle_s if w4_idle_s is not None else (3.0 if quick else 10.0)
    out = {
        "W1": Workload(
            "W1", "rpc", 1000 if quick else 5000, 200, 1, 1, 1, "sequential rpc, 1 sender, 1 worker"
        ),
        "W1-p1": Workload(
            "W1-p1", "rpc", 1000 if quick else 5000, 200, 1, 1, 1,
            "W1 with a worker of one slot (prefetch=1): what the default prefetch costs a lone rpc",
            prefetch=1, base="W1",
        ),
        "W2": Workload(
            "W2", "pipelined", n2, 200, 2, 1, 200, "pipelined (200 outstanding), 1 sender, 2 workers"
        ),
    }
    for p in PREFETCH_VARIANTS:
        name = f"W2-p{p}"
        out[name] = Workload(
            name,
            "pipelined",
            n2,
            200,
            2,
            1,
            200,
            f"W2 with {p} credits per worker (Worker prefetch={p})",
            prefetch=p,
            base="W2",
        )
    out["W2-map"] = Workload(
        "W2-map",
        "pipelined",
        n2,
        200,
        2,
        1,
        200,
        f"W2, the documented throughput setting: sqm's sync Sender pipelines with "
        f"map(max_concurrent=200), workers prefetch={DOCUMENTED_PREFETCH}",
        prefetch=DOCUMENTED_PREFETCH,
        systems=("baseline", "sqm"),
        base="W2",
        via="map",
    )
    out["W3"] = Workload(
        "W3",
        "pipelined",
        n2,
        200,
        p3,
        t3,
        200,
        f"pipelined (200 outstanding), 1 sender, {p3 * t3} workers ({p3} procs x {t3} threads)",
    )
    out["W4"] = Workload(
        "W4",
        "pipelined",
        n2,
        200,
        p4,
        t4,
        200,
        f"{p4 * t4} idle workers ({p4} procs x {t4} threads): broker CPU over {idle:g}s idle, "
        "then W2 through them",
        idle_s=idle,
        systems=("baseline", "sqm"),
        base="W2",
    )
    out["W6"] = Workload(
        "W6",
        "methods",
        n2,
        200,
        4,
        4,
        200,
        "8 methods over 16 workers (4 procs x 4 threads) each serving 2, 200 outstanding, "
        "skewed mix: tasks/s and the longest wait of the rarest method",
        systems=("sqm",),
    )
    n7 = 10000 if quick else 100000
    out["W7"] = Workload(
        "W7",
        "scheduled",
        n7,
        0,
        2,
        1,
        n7,
        f"{n7} scheduled messages due over {W7_SPREAD_S:g} s, 2 workers: broker bytes per "
        "scheduled message, dispatch lag after the due time (reply arrival - due)",
        systems=("sqm",),
    )
    n8 = 500 if quick else 2500
    for name, p in (("W8", 0), ("W8-p1", 1)):
        out[name] = Workload(
            name,
            "hol",
            n8,
            200,
            2,
            1,
            1000,
            f"head-of-line: {W8_RATE:g} msgs/s paced, 1 % take {W8_SLOW_S * 1000:g} ms, 2 workers "
            f"(prefetch {p or 'at the Worker default'}): p99 submit-to-reply of the short ones",
            prefetch=p,
            systems=("sqm",),
            rate=W8_RATE,
            base="W8-p1",
        )
    total9 = W9_TOTAL_QUICK if quick else W9_TOTAL
    for name, senders in (("W9", 512), ("W9-64", 64)):
        out[name] = Workload(
            name,
            "many",
            total9,
            W9_WARMUP_EACH * senders,
            3,
            1,
            senders,
            f"{senders} concurrent senders ({W9_PROCS} procs x {senders // W9_PROCS} threads), "
            f"3 worker procs, sequential echo rpcs ({total9 // senders} each)",
            systems=("baseline", "sqm", "nats"),
            senders=senders,
            sender_procs=W9_PROCS,
            base="W9-64",
        )
    for name, p in (("W5", 1), ("W5-p16", 16)):
        out[name] = Workload(
            name,
            "backlog",
            n5,
            0,
            2,
            1,
            n5,
            f"{n5} pending with no worker, then 2 workers (prefetch {p}) drain them",
            prefetch=p,
            systems=("baseline", "sqm"),
        )
    return out


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


def pipelined_result(
    n: int, elapsed: float, tally: Tally, warm_n: int, cpu: dict[str, float]
) -> dict[str, Any]:
    """Result dict of a pipelined run; ``cpu``: :meth:`CpuMeter.stop` of the timed phase."""
    return {
        "n": n,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "tasks_per_s": n / elapsed,
        "warmup_n": warm_n,
        "sender_seen_measured": dict(tally.measured),
        "sender_seen_warmup": dict(tally.warmup),
    }


def rpc_result(
    n: int, elapsed: float, lat_ns: list[int], tally: Tally, warm_n: int, cpu: dict[str, float]
) -> dict[str, Any]:
    """Result dict of a sequential rpc run; ``cpu``: :meth:`CpuMeter.stop` of the timed phase."""
    res = {
        "n": n,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "rpc_per_s": n / elapsed,
        "warmup_n": warm_n,
        "sender_seen_measured": dict(tally.measured),
        "sender_seen_warmup": dict(tally.warmup),
    }
    res.update(latency_stats(lat_ns))
    return res


def scheduled_result(n: int, start: float, submit_s: float, lags_s: list[float],
                     tally: Tally, cpu: dict[str, float]) -> dict[str, Any]:
    """Result dict of a W7 run: ``lags_s`` are reply arrival minus due time (s)."""
    ms = sorted(x * 1000 for x in lags_s)
    return {
        "n": n,
        "cpu_s": cpu,
        "submit_start_mono": start,
        "submit_s": submit_s,
        "lag_p50_ms": percentile(ms, 0.50),
        "lag_p99_ms": percentile(ms, 0.99),
        "lag_max_ms": ms[-1] if ms else math.nan,
        "early": sum(1 for x in ms if x < 0),  # a reply before its due time: a bug
        "warmup_n": 0,
        "sender_seen_measured": dict(tally.measured),
        "sender_seen_warmup": {},
    }


def backlog_result(
    n: int,
    start: float,
    submit_s: float,
    first: float,
    last: float,
    tally: Tally,
    cpu: dict[str, float],
) -> dict[str, Any]:
    """Result dict of a backlog run; ``start``/``first``/``last`` are ``time.monotonic()``.

    ``start`` is when the first submit began (the orchestrator compares it
    with when the broker held them all: ``time.monotonic()`` is system-wide).
    The drain rate counts the ``n - 1`` intervals from the first reply to the
    last, so worker start-up (interpreter, imports) is not part of it.
    ``cpu`` is :meth:`CpuMeter.stop` over the drain.
    """
    return {
        "n": n,
        "cpu_s": cpu,
        "submit_start_mono": start,
        "submit_s": submit_s,
        "submit_per_s": n / submit_s,
        "first_reply_mono": first,
        "last_reply_mono": last,
        "drain_s": last - first,
        "drain_per_s": (n - 1) / (last - first) if last > first else math.nan,
        "warmup_n": 0,
        "sender_seen_measured": dict(tally.measured),
        "sender_seen_warmup": {},
    }


def warm_done(tally: Tally, expected_workers: int, count: int, minimum: int) -> bool:
    """Warm-up is over once ``minimum`` replies came and every worker answered."""
    return count >= minimum and len(tally.warmup) >= expected_workers


def warm_pipelined(s: Any, tally: Tally, expected: int, minimum: int, window: int,
                   deadline: float, timeout: float,
                   method: Callable[[int], str] = lambda _i: METHOD) -> int:
    """Keep ``window`` submits outstanding on Sender ``s`` until every worker
    answered (and ``minimum`` replies came), then take the rest; returns the
    replies taken. Warm-up ids count down from -1, apart from measured ones;
    ``method(i)`` names each one's method."""
    outstanding: set[int] = set()
    nxt, count = -1, 0
    while not warm_done(tally, expected, count, minimum):
        if time.monotonic() > deadline:
            raise BenchError(f"warm-up: only {len(tally.warmup)}/{expected} workers answered")
        while len(outstanding) < window:
            s.submit(method(nxt), payload(nxt))
            outstanding.add(nxt)
            nxt -= 1
        tally.take(outstanding, s.receive(timeout=timeout))
        count += 1
    while outstanding:
        tally.take(outstanding, s.receive(timeout=timeout))
        count += 1
    return count


async def warm_lanes(call: Callable[[int], Awaitable[Any]], tally: Tally, expected: int,
                     minimum: int, window: int, deadline: float) -> int:
    """``window`` concurrent request loops (``await call(i)``) until every
    worker answered and ``minimum`` replies came; returns the replies taken."""
    warm = {"count": 0, "next": -1}

    async def lane() -> None:
        while not warm_done(tally, expected, warm["count"], minimum):
            if time.monotonic() > deadline:
                raise BenchError(f"warm-up: only {len(tally.warmup)}/{expected} workers answered")
            i = warm["next"]
            warm["next"] -= 1
            tally.expect(i, await call(i))
            warm["count"] += 1

    await asyncio.gather(*(lane() for _ in range(window)))
    return warm["count"]


async def timed_lanes(call: Callable[[int], Awaitable[Any]], tally: Tally, n: int, window: int,
                      job: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """The measured phase: ``window`` concurrent loops sharing the indices
    0..n-1 (each taken exactly once), every reply checked; returns
    (elapsed s, CPU per process)."""
    indices = iter(range(n))

    async def lane() -> None:
        for i in indices:
            tally.expect(i, await call(i))

    meter = CpuMeter(job)
    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(window)))
    elapsed, cpu = time.perf_counter() - t0, meter.stop()
    if sum(tally.measured.values()) != n:
        raise BenchError(f"{sum(tally.measured.values())} replies for {n} requests")
    return elapsed, cpu


def merge_counts(files: Iterable[str]) -> dict[str, dict[str, int]]:
    """Merge the per-worker count files written by worker processes."""
    merged: dict[str, dict[str, int]] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            merged.update(json.load(f))
    return merged


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size (``VmRSS``) of process ``pid``, in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


class CpuMeter:
    """CPU seconds of the sender (this process), the broker and the workers over a phase.

    Created at the start of the phase. The orchestrator writes the broker's
    and the worker processes' pids to ``job["pids_path"]`` (for a backlog run
    only once it has started the workers, so this may wait for it).
    """

    def __init__(self, job: dict[str, Any], wait_s: float = 10.0) -> None:
        path = job["pids_path"]
        wait_until(lambda: os.path.exists(path), wait_s, "the broker and worker pids")
        with open(path, encoding="utf-8") as f:
            pids = json.load(f)
        self.broker: int = pids["broker"]
        self.workers: list[int] = pids["workers"]
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        return (
            time.process_time(),
            cpu_seconds(self.broker),
            sum(cpu_seconds(p) for p in self.workers),
        )

    def stop(self) -> dict[str, float]:
        """``{"sender": s, "broker": s, "workers": s}`` used since the start."""
        end = self._read()
        keys = ("sender", "broker", "workers")
        return {k: e - s for k, s, e in zip(keys, self._start, end, strict=True)}


# --------------------------------------------------------------------------- W9: many senders


def w9_index(g: int, j: int, each: int) -> int:
    """Request number of sender ``g``'s ``j``-th rpc (``j < 0``: warm-up): unique in the run."""
    if j < 0:
        return -(g * W9_WARMUP_EACH + (-j - 1)) - 1
    return g * each + j


def pdeathsig() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ManyLane:
    """What one W9 sender lane collected: replies per worker, latencies, errors."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.lat_ns: list[int] = []
        self.errors: Counter[str] = Counter()

    def error(self, exc: BaseException) -> None:
        """Count a failed rpc (Timeout, WorkerLost...): reported, not fatal."""
        self.errors[type(exc).__name__] += 1


def many_report(lanes: Iterable[ManyLane], cpu_s: float) -> dict[str, Any]:
    """One W9 sender process's figures, merged over its lanes (sent to the
    coordinator); ``cpu_s``: its CPU seconds over the measured phase."""
    measured: Counter[str] = Counter()
    warm: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lat: list[int] = []
    for lane in lanes:
        measured.update(lane.tally.measured)
        warm.update(lane.tally.warmup)
        errors.update(lane.errors)
        lat.extend(lane.lat_ns)
    return {"measured": dict(measured), "warmup": dict(warm), "errors": dict(errors),
            "lat_ns": lat, "cpu_s": cpu_s}


def run_many(job: dict[str, Any], child: Callable[..., None]) -> dict[str, Any]:
    """W9's sender: start ``sender_procs`` processes running ``child(job, k,
    lanes, start, results)``, each with ``senders / sender_procs``
    lanes (sequential rpc loops); start the clock once every lane has warmed
    up, stop it when the last process has reported.

    A child puts ``("ready", k, None)`` after its warm-up and ``("done", k,
    many_report(...))`` at the end, or ``("error", k, text)``. The sender CPU
    figure sums what the child processes report (they may be gone by the
    time the coordinator could read their /proc entries).
    """
    import multiprocessing
    import queue as queue_mod

    wl = job["workload"]
    procs_n, senders = wl["sender_procs"], wl["senders"]
    lanes = senders // procs_n
    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    start = mp.Event()
    procs = [mp.Process(target=child, args=(job, k, lanes, start, results), daemon=True)
             for k in range(procs_n)]
    for p in procs:
        p.start()
    ok = False
    try:

        def collect(kind: str, timeout: float) -> dict[int, Any]:
            got: dict[int, Any] = {}
            deadline = time.monotonic() + timeout
            while len(got) < procs_n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"W9: {procs_n - len(got)} sender processes not {kind} "
                                     f"after {timeout:.0f}s")
                try:
                    what, k, data = results.get(timeout=min(left, 1.0))
                except queue_mod.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise BenchError(f"W9: a sender process died (code {dead[0]})") from None
                    continue
                if what == "error":
                    raise BenchError(f"W9 sender process {k}: {data}")
                got[k] = data
            return got

        collect("ready", job["warmup_timeout"] + 60)
        meter = CpuMeter(job)
        t0 = time.perf_counter()
        start.set()
        done = collect("done", job["first_reply_timeout"])
        elapsed = time.perf_counter() - t0
        cpu = meter.stop()
        cpu["sender"] += sum(rep["cpu_s"] for rep in done.values())
        ok = True
    finally:
        for p in procs:
            if not ok:
                p.kill()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    tally = Tally()
    errors: Counter[str] = Counter()
    lat: list[int] = []
    for rep in done.values():
        tally.measured.update(rep["measured"])
        tally.warmup.update(rep["warmup"])
        errors.update(rep["errors"])
        lat.extend(rep["lat_ns"])
    n_ok = sum(tally.measured.values())
    res = {
        "n": wl["n"],
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "rpc_per_s": n_ok / elapsed,
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "warmup_n": sum(tally.warmup.values()),
        "sender_seen_measured": dict(tally.measured),
        "sender_seen_warmup": dict(tally.warmup),
    }
    if lat:
        res.update(latency_stats(lat))
    return res


def many_child(
    job: dict[str, Any],
    k: int,
    lanes: int,
    start: Any,
    results: Any,
    lane_body: Callable[[dict[str, Any], int, ManyLane, Callable[[], None]], None],
) -> None:
    """A W9 sender process with ``lanes`` threads, each running ``lane_body(job,
    g, lane, wait_start)``: warm up, call ``wait_start()``, then the measured rpcs."""
    import threading

    pdeathsig()
    try:
        all_ready = threading.Barrier(lanes + 1)
        collected = [ManyLane() for _ in range(lanes)]
        failures: list[str] = []

        def wait_start() -> None:
            all_ready.wait()
            start.wait()

        def run(t: int) -> None:
            try:
                lane_body(job, k * lanes + t, collected[t], wait_start)
            except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
                failures.append(f"{type(exc).__name__}: {exc}")
                all_ready.abort()

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(lanes)]
        for th in threads:
            th.start()
        try:
            all_ready.wait(job["warmup_timeout"] + 60)
        except threading.BrokenBarrierError:
            pass
        if failures:
            results.put(("error", k, failures[0]))
            return
        results.put(("ready", k, None))
        start.wait()
        cpu0 = time.process_time()
        for th in threads:
            th.join()
        if failures:
            results.put(("error", k, failures[0]))
            return
        results.put(("done", k, many_report(collected, time.process_time() - cpu0)))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        results.put(("error", k, f"{type(exc).__name__}: {exc}"))
