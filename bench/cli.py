"""Orchestrator for ``python -m bench``: start processes, run, check, report.

Every (system, workload) pair runs in fresh processes (broker, workers and
sender are separate processes, started with ``multiprocessing`` 'spawn' or
``subprocess``) over ``ipc://`` sockets in a fresh temp dir, and everything is
torn down afterwards, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from bench import baseline, nats_peer, sqm_adapter
from bench.common import (
    DOCUMENTED_PREFETCH,
    PREFETCH_VARIANTS,
    W6_ENV,
    W8_ENV,
    WORKLOAD_ORDER,
    BenchError,
    Workload,
    cpu_seconds,
    ipc_endpoint,
    ipc_path,
    make_workloads,
    merge_counts,
    rss_bytes,
    w7_lead,
    wait_until,
    write_json_atomic,
)

SYSTEMS = ("baseline", "sqm", "sqm-async")
#: Other queues run on the same workloads (``--peers``), each a column of its own.
PEERS = ("nats",)
#: The workloads the NATS peer runs (others: N/A; it has no credits, so no W2-pN).
NATS_WORKLOADS = ("W1", "W2", "W3", "W9", "W9-64")
SQM_SERVE_EXTRA: list[str] = []  # --sqm-serve-args, split
QUEUE = "bench"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: ``sqm serve --max-pending``: above W5's 100,000 so the backlog is never refused.
SQM_MAX_PENDING = 200_000
#: Seconds between status polls while waiting for a broker-side condition.
STATUS_POLL_S = 0.2


@dataclass(frozen=True)
class Metric:
    """One table row of a workload.

    ``ratio`` says whether the cell shows the ratio to the baseline's figure
    of the same workload (not for figures that are ratios themselves, nor for
    idle CPU, where the baseline is ~0). ``derived`` metrics are computed
    after all runs: the row's ``src`` figure divided by the median ``src``
    figure of ``(workload, system)``, where system ``""`` means the row's
    own system (never a row divided by itself). ``on``: only rows of these
    systems get it (empty: all). ``hidden`` ones are not table rows (the
    ratio to the baseline is in the cell already) but targets check them.
    """

    key: str
    label: str
    higher_better: bool
    ratio: bool = True
    fmt: str = "num"  # "num" | "x" (a ratio: 2 decimals and an x)
    derived: tuple[str, str] | None = None
    src: str = "tasks_per_s"
    on: tuple[str, ...] = ()
    hidden: bool = False


_TASKS = Metric("tasks_per_s", "tasks/s", True)
_SQM_ONLY = ("sqm", "sqm-async")


def _x_nats(workload: str, src: str = "tasks_per_s", what: str = "") -> Metric:
    """The row's figure divided by NATS's on ``workload`` (sqm rows only)."""
    return Metric(f"x_nats_{src}", f"x NATS {what or workload}", True, ratio=False, fmt="x",
                  derived=(workload, "nats"), src=src, on=_SQM_ONLY)


def _x_base(workload: str, src: str, what: str) -> Metric:
    """The row's figure divided by the baseline's on ``workload`` (for targets)."""
    return Metric(f"x_base_{src}", f"x baseline {what}", True, ratio=False, fmt="x",
                  derived=(workload, "baseline"), src=src, hidden=True)


_W8 = [
    Metric("short_p50_ms", "short msgs p50 wait ms", False, ratio=False),
    Metric("short_p99_ms", "short msgs p99 wait ms", False, ratio=False),
    Metric("slow_p50_ms", "slow msgs p50 wait ms", False, ratio=False),
]
_W9 = [
    Metric("rpc_per_s", "rpc/s (all senders)", True),
    Metric("errors", "failed rpcs", False, ratio=False),
    Metric("p99_us", "p99 us", False),
]
_BACKLOG = [
    Metric("bytes_per_pending", "broker bytes/pending msg", False),
    Metric("accept_per_s", "queued msgs/s (no worker)", True),
    Metric("drain_per_s", "drain msgs/s", True),
]

#: Table rows per workload, in table order.
METRICS: dict[str, list[Metric]] = {
    "W1": [
        Metric("rpc_per_s", "rpc/s", True),
        Metric("p50_us", "p50 us", False),
        Metric("p99_us", "p99 us", False),
        _x_nats("W1", "rpc_per_s", "W1 rpc/s"),
        _x_base("W1", "rpc_per_s", "rpc/s"),
        _x_base("W1", "p99_us", "p99"),
    ],
    "W1-p1": [
        Metric("rpc_per_s", "rpc/s", True),
        Metric("p50_us", "p50 us", False),
        Metric("p99_us", "p99 us", False),
    ],
    "W2": [
        _TASKS,
        _x_nats("W2"),
        Metric("x_base_w2", "x W2 baseline (credit 1)", True, ratio=False, fmt="x",
               derived=("W2", "baseline"), hidden=True),
        Metric("x_sqm_w2", "x sqm (memory mode) W2", True, ratio=False, fmt="x",
               derived=("W2", "sqm"), on=("sqm-journal",)),
    ],
    **{
        f"W2-p{p}": [
            _TASKS,
            Metric(
                "x_base_w2",
                "x W2 baseline (credit 1)",
                True,
                ratio=False,
                fmt="x",
                derived=("W2", "baseline"),
            ),
            *([_x_nats("W2", what="W2")] if p == DOCUMENTED_PREFETCH else []),
        ]
        for p in PREFETCH_VARIANTS
    },
    "W2-map": [
        _TASKS,
        Metric("x_base_w2", "x W2 baseline (credit 1)", True, ratio=False, fmt="x",
               derived=("W2", "baseline")),
        _x_nats("W2", what="W2"),
    ],
    "W3": [
        _TASKS,
        Metric("min_per_worker", "min tasks/worker", True),
        Metric("max_per_worker", "max tasks/worker", False),
        _x_nats("W3"),
    ],
    "W4": [
        Metric("broker_idle_cpu_pct", "broker idle CPU %", False, ratio=False),
        Metric("hosts_idle_cpu_pct", "worker procs idle CPU %", False, ratio=False),
        _TASKS,
        Metric("x_own_w2", "x own W2 tasks/s", True, ratio=False, fmt="x", derived=("W2", "")),
    ],
    "W5": _BACKLOG,
    "W5-p16": _BACKLOG,
    "W7": [
        Metric("bytes_per_scheduled", "broker bytes/scheduled msg", False, ratio=False),
        Metric("lag_p50_ms", "dispatch lag p50 ms", False, ratio=False),
        Metric("lag_p99_ms", "dispatch lag p99 ms", False, ratio=False),
    ],
    "W6": [
        _TASKS,
        Metric("starved_max_wait_ms", "rarest method max wait ms", False, ratio=False),
    ],
    "W8": [
        *_W8,
        Metric("x_p1_short_p99", "x W8-p1 short p99", False, ratio=False, fmt="x",
               derived=("W8-p1", ""), src="short_p99_ms"),
    ],
    "W8-p1": _W8,
    "W9": [
        *_W9,
        Metric("x_w9_64", "x W9-64 rpc/s", True, ratio=False, fmt="x",
               derived=("W9-64", ""), src="rpc_per_s"),
    ],
    "W9-64": _W9,
}


@dataclass(frozen=True)
class Target:
    """A goal from an issue, checked on the medians of ``systems`` (empty:
    every system but the baseline and the peers)."""

    workload: str
    key: str
    op: str  # "<", "<=" or ">="
    value: float
    text: str
    systems: tuple[str, ...] = ()

    def met(self, v: float) -> bool:
        """Whether figure ``v`` meets the target."""
        if self.op == "<":
            return v < self.value
        if self.op == "<=":
            return v <= self.value
        return v >= self.value


TARGETS: list[Target] = [
    *(
        Target(
            f"W2-p{p}",
            "x_base_w2",
            ">=",
            3.0,
            "W2 with a documented throughput setting >= 3 x the credit-1 baseline",
        )
        for p in PREFETCH_VARIANTS
    ),
    Target("W4", "broker_idle_cpu_pct", "<", 5.0, "broker idle CPU < 5 % with 1,000 workers"),
    Target("W4", "x_own_w2", ">=", 0.8, "W2 through 1,000 workers >= 0.8 x W2"),
    Target("W5", "bytes_per_pending", "<=", 1024.0, "broker memory <= 1 KiB per pending message"),
    Target(
        "W5-p16", "bytes_per_pending", "<=", 1024.0, "broker memory <= 1 KiB per pending message"
    ),
    # Issue 16 (ratios from one run of `python -m bench --peers nats`).
    Target("W2-map", "x_nats_tasks_per_s", ">=", 1.0,
           f"#16: W2 with the documented throughput setting (map(), prefetch "
           f"{DOCUMENTED_PREFETCH}) >= 1.0 x NATS W2", ("sqm",)),
    Target("W3", "x_nats_tasks_per_s", ">=", 1.0, "#16: W3 at the defaults >= 1.0 x NATS",
           ("sqm",)),
    Target("W2", "x_base_w2", ">=", 1.5,
           "#16: W2 at the defaults >= 1.5 x the credit-1 baseline", ("sqm",)),
    Target("W1", "x_base_rpc_per_s", ">=", 0.9, "#16: W1 rpc/s >= 0.9 x the baseline",
           ("sqm",)),
    Target("W1", "x_base_p99_us", "<=", 1.2, "#16: W1 p99 <= 1.2 x the baseline's", ("sqm",)),
    Target("W1", "x_nats_rpc_per_s", ">=", 1.3, "#16: W1 rpc/s >= 1.3 x NATS", ("sqm",)),
    Target(f"W2-p{DOCUMENTED_PREFETCH}", "x_nats_tasks_per_s", ">=", 0.8,
           "#16: AsyncSender, W2 throughput setting >= 0.8 x NATS W2", ("sqm-async",)),
    Target("W4", "broker_idle_cpu_pct", "<", 2.0, "#16: broker idle CPU < 2 % with 1,000 workers"),
    Target("W8", "x_p1_short_p99", "<=", 1.2,
           "#16: W8 short msgs' p99 wait at the default prefetch <= 1.2 x at prefetch 1"),
    Target("W9", "x_w9_64", ">=", 0.8, "#16: W9 (512 senders) >= 0.8 x W9-64 (64 senders)"),
    Target("W2", "x_sqm_w2", ">=", 0.8, "#16: journal mode W2 >= 0.8 x memory mode",
           ("sqm-journal",)),
]

_MP = multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------- processes


class _Proc:
    """A child process: a ``multiprocessing`` Process or a ``subprocess.Popen``.

    ``stop_signal`` asks it to stop (nats-server exits 0 on SIGINT, 1 on SIGTERM).
    """

    def __init__(self, name: str, proc: Any, stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.proc = proc
        self.stop_signal = stop_signal

    def alive(self) -> bool:
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll() is None
        return bool(self.proc.is_alive())

    def exitcode(self) -> int | None:
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        return self.proc.exitcode  # type: ignore[no-any-return]

    def join(self, timeout: float) -> None:
        if isinstance(self.proc, subprocess.Popen):
            try:
                self.proc.wait(max(timeout, 0))
            except subprocess.TimeoutExpired:
                pass
        else:
            self.proc.join(max(timeout, 0))

    def terminate(self) -> None:
        if not self.alive():
            return
        if isinstance(self.proc, subprocess.Popen):
            self.proc.send_signal(self.stop_signal)
        else:
            self.proc.terminate()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return int(self.proc.pid)


class ProcGroup:
    """Owns the child processes of one run; ``stop()`` always reaps them all."""

    def __init__(self) -> None:
        self.procs: list[_Proc] = []

    def spawn(self, name: str, target: Callable[..., None], *args: Any) -> _Proc:
        """Start ``target(*args)`` in a fresh 'spawn' process."""
        p = _MP.Process(target=target, args=args, name=name, daemon=False)
        p.start()
        proc = _Proc(name, p)
        self.procs.append(proc)
        return proc

    def popen(
        self, name: str, cmd: Sequence[str], log_path: str, env: dict[str, str],
        stop_signal: int = signal.SIGTERM,
    ) -> _Proc:
        """Start an external command, stdout+stderr to ``log_path``."""
        with open(log_path, "wb") as log:
            p = subprocess.Popen(
                list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        proc = _Proc(name, p, stop_signal)
        self.procs.append(proc)
        return proc

    def stop(self, procs: Sequence[_Proc] | None = None, timeout: float = 5.0) -> list[str]:
        """SIGTERM ``procs`` (default: all), wait up to ``timeout``, then SIGKILL.

        Returns warnings about processes that needed SIGKILL or exited non-zero.
        """
        procs = list(self.procs if procs is None else procs)
        warnings: list[str] = []
        running = [p for p in procs if p.alive()]
        for p in running:
            p.terminate()
        deadline = time.monotonic() + timeout
        for p in running:
            p.join(deadline - time.monotonic())
        for p in running:
            if p.alive():
                warnings.append(f"{p.name} ignored SIGTERM for {timeout:.0f}s; killed")
                p.kill()
                p.join(5)
            elif p.exitcode() not in (0, None):
                warnings.append(f"{p.name} exited with code {p.exitcode()} after SIGTERM")
        for p in procs:
            if p in self.procs:
                self.procs.remove(p)
        return warnings


# --------------------------------------------------------------------------- systems


@dataclass(frozen=True)
class System:
    """How to start one system's broker, workers and sender."""

    name: str
    worker_target: Callable[[str, str, int, str, int], None]
    sender_target: Callable[[dict[str, Any]], None]
    uses_sqm_broker: bool
    #: CURVE on every socket (``--curve``): keys made per run, clients read
    #: them from $SQM_SECRET_KEY / $SQM_SERVER_KEY.
    curve: bool = False
    #: Extra ``sqm serve`` options ({tmp}: the run's temp dir).
    serve_args: tuple[str, ...] = ()
    #: Another queue's server instead of a broker of ours (``--peers``).
    peer: str = ""


def _systems() -> dict[str, System]:
    return {
        "baseline": System("baseline", baseline.worker_host, baseline.sender_main, False),
        "sqm": System("sqm", sqm_adapter.worker_host, sqm_adapter.sender_main, True),
        "sqm-async": System(
            "sqm-async", sqm_adapter.worker_host, sqm_adapter.async_sender_main, True
        ),
        CURVE_SYSTEM: System(
            CURVE_SYSTEM, sqm_adapter.worker_host, sqm_adapter.sender_main, True, curve=True
        ),
        JOURNAL_SYSTEM: System(
            JOURNAL_SYSTEM, sqm_adapter.worker_host, sqm_adapter.sender_main, True,
            serve_args=("--journal", "{tmp}/journal.db"),
        ),
        "nats": System("nats", nats_peer.worker_host, nats_peer.sender_main, False, peer="nats"),
    }


#: The CURVE variant of the sqm system (``--curve``) and the workloads it runs.
CURVE_SYSTEM = "sqm-curve"
CURVE_WORKLOADS = ("W1", "W2")
#: sqm with its journal (``--journal``), and the workloads it runs.
JOURNAL_SYSTEM = "sqm-journal"
JOURNAL_WORKLOADS = ("W2",)


def _curve_keys(tmp: str) -> list[str]:
    """Make this run's keys (one client key that may send and serve); point the
    clients at them through the environment; return ``sqm serve``'s options."""
    from sqm.security.keys import generate_keypair

    keys = os.path.join(tmp, "keys")
    generate_keypair("broker", keys)
    public, secret = generate_keypair("client", keys)
    for folder in ("senders", "workers"):
        os.makedirs(os.path.join(keys, "clients", folder), exist_ok=True)
        with open(os.path.join(keys, "clients", folder, "client.key"), "wb") as f:
            f.write(public.read_bytes())
    os.environ["SQM_SECRET_KEY"] = str(secret)
    os.environ["SQM_SERVER_KEY"] = os.path.join(keys, "broker.key")
    return ["--secret-key", os.path.join(keys, "broker.key_secret"),
            "--clients", os.path.join(keys, "clients")]


def sqm_unavailable() -> str | None:
    """Why the sqm systems cannot run (``None`` if they can)."""
    try:
        importlib.import_module("sqm.admin")
        s = importlib.import_module("sender")
        w = importlib.import_module("worker")
        for mod, attr in ((s, "Sender"), (s, "AsyncSender"), (w, "Worker")):
            if not hasattr(mod, attr):
                return f"{mod.__name__}.{attr} is missing"
    except Exception as exc:  # noqa: BLE001 - any import failure means "not there yet"
        return f"{type(exc).__name__}: {exc}"
    return None


def _sqm_serve_cmd() -> list[str]:
    """``sqm`` console script, run with this interpreter from this repo."""
    return [
        sys.executable,
        "-c",
        "import sys; from sqm.cli import main; sys.argv[0] = 'sqm'; sys.exit(main())",
    ]


def _child_env(tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env["SQM_RUNDIR"] = tmp
    for var in ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE", "SQM_SECRET_KEY", "SQM_SERVER_KEY"):
        env.pop(var, None)
    return env


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _start_broker(system: System, tmp: str, group: ProcGroup, log_path: str) -> tuple[str, _Proc]:
    if system.peer == "nats":
        server = group.popen("nats-server", nats_peer.server_cmd(tmp), log_path, _child_env(tmp),
                             signal.SIGINT)
        try:
            return nats_peer.server_url(tmp, server.pid, 30, server.alive), server
        except BenchError as exc:
            raise BenchError(f"{exc}: {_tail(log_path)}") from None
    endpoint = ipc_endpoint(tmp, f"{QUEUE}.sock")
    if system.uses_sqm_broker:
        broker = group.popen(
            "sqm serve",
            _sqm_serve_cmd()
            + ["serve", QUEUE, "--endpoint", endpoint, "--max-pending", str(SQM_MAX_PENDING)]
            + (_curve_keys(tmp) if system.curve else [])
            + [arg.replace("{tmp}", tmp) for arg in (*system.serve_args, *SQM_SERVE_EXTRA)],
            log_path,
            _child_env(tmp),
        )
    else:
        broker = group.spawn("baseline broker", baseline.broker_main, endpoint)
    path = ipc_path(endpoint)
    wait_until(lambda: os.path.exists(path) or not broker.alive(), 30, "the broker socket")
    if not broker.alive():
        raise BenchError(
            f"{broker.name} died at start (code {broker.exitcode()}): {_tail(log_path)}"
        )
    return endpoint, broker


# --------------------------------------------------------------------------- one run


def _status_reader(system: System, endpoint: str, wl: Workload) -> Callable[[], dict[str, int]]:
    """A function returning the broker's ``{"workers": n, "pending": n}``.

    sqm: ``workers_current`` and ``pending`` from ``sqm status`` (the CLI's
    ``fetch_status``). Baseline: its status query; its workers do not
    register, so "workers" is the idle credits divided by the credits per
    worker (exact while nothing runs).
    """
    if system.uses_sqm_broker:
        from sqm.admin import fetch_status
        from sqm.config import resolve

        settings = resolve(QUEUE, endpoint=endpoint)

        def read_sqm() -> dict[str, int]:
            st = fetch_status(settings, 5.0)
            return {"workers": int(st["workers_current"]), "pending": int(st["pending"]),
                    "scheduled": int(st.get("scheduled", 0))}

        return read_sqm

    if system.peer:

        def no_status() -> dict[str, int]:
            raise BenchError(f"no broker status for {system.name}")

        return no_status

    def read_baseline() -> dict[str, int]:
        st = baseline.query_status(endpoint, 5.0)
        return {"workers": st["credits"] // (wl.prefetch or 1), "pending": st["pending"]}

    return read_baseline


def _wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    watch: Sequence[_Proc],
    log_path: str,
    warnings: list[str],
    interval: float = STATUS_POLL_S,
) -> None:
    """Poll ``cond`` (a status query) until true; fail if a watched process dies.

    A status query that raises while the broker lives counts as "not yet"
    (``sqm status`` can fail transiently while many peers connect at once);
    such failures are added to ``warnings``.
    """
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    try:
        while True:
            dead = [p.name for p in watch if not p.alive()]
            if dead:
                raise BenchError(
                    f"died while waiting for {what}: {', '.join(dead)}; "
                    f"broker log: {_tail(log_path)}"
                )
            try:
                if cond():
                    return
            except Exception as exc:  # noqa: BLE001 - reported, and retried until the deadline
                errors.append(f"{type(exc).__name__}: {exc}")
            if time.monotonic() >= deadline:
                last = f" (last status error: {errors[-1]})" if errors else ""
                raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{last}")
            time.sleep(interval)
    finally:
        if errors:
            warnings.append(
                f"status query failed {len(errors)}x while waiting for {what}, "
                f"retried; first: {errors[0]}"
            )


def _measure_idle(
    broker: _Proc, hosts: Sequence[_Proc], seconds: float, log_path: str
) -> dict[str, float]:
    """CPU % (of one core) of the broker and of all worker processes over ``seconds``."""
    pids = [broker.pid, *(h.pid for h in hosts)]
    before = [cpu_seconds(pid) for pid in pids]
    t0 = time.monotonic()
    end = t0 + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.5, left))  # a measurement window, not a synchronisation
        dead = [p.name for p in (broker, *hosts) if not p.alive()]
        if dead:
            raise BenchError(f"died while idle: {', '.join(dead)}; broker log: {_tail(log_path)}")
    after = [cpu_seconds(pid) for pid in pids]
    dt = time.monotonic() - t0
    used = [b - a for a, b in zip(before, after, strict=True)]
    return {
        "broker_idle_cpu_pct": 100.0 * used[0] / dt,
        "hosts_idle_cpu_pct": 100.0 * sum(used[1:]) / dt,
        "idle_window_s": dt,
    }


#: Per-message CPU figures (in every row's metrics), shown in their own table.
CPU_METRICS = [
    ("cpu_us_sender", "sender"),
    ("cpu_us_broker", "broker"),
    ("cpu_us_workers", "workers"),
]


def format_cpu_table(rows: list[dict[str, Any]], systems: list[str], workloads: list[str]) -> str:
    """CPU µs per message of each process kind: rows = workload, cells ``s/b/w``."""
    by = {(r["system"], r["workload"]): r for r in rows}
    header = ["workload", *(f"{s} sender/broker/workers" for s in systems)]
    lines = []
    for w in workloads:
        line = [w]
        for s in systems:
            r = by.get((s, w))
            if r is None or r["status"] != "ok" or "cpu_us_broker" not in r["metrics"]:
                line.append("-" if r is None else r["status"].upper())
            else:
                line.append(" / ".join(f"{r['metrics'][k]:.0f}" for k, _ in CPU_METRICS))
        lines.append(line)
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 1 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def run_one(system: System, wl: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Run workload ``wl`` on ``system`` in fresh processes; return a result row.

    Phases: broker; then for a backlog workload the sender (which submits
    everything), a wait until the broker holds all of it, the broker's RSS,
    and only then the workers; otherwise the workers, for an idle workload a
    wait until all are registered and the broker's idle CPU, then the sender.
    """
    row: dict[str, Any] = {
        "system": system.name,
        "workload": wl.name,
        "status": "ok",
        "error": None,
        "warnings": [],
        "metrics": {},
        "details": {},
    }
    tmp = tempfile.mkdtemp(prefix="sqmb-")
    group = ProcGroup()
    log_path = os.path.join(tmp, "broker.log")
    saved_env = dict(os.environ)
    details: dict[str, Any] = row["details"]
    extra: dict[str, float] = {}
    try:
        # Spawned children inherit this: sqm files go to tmp, no stray SQM_* settings.
        os.environ.clear()
        os.environ.update(_child_env(tmp))
        endpoint, broker = _start_broker(system, tmp, group, log_path)
        status = _status_reader(system, endpoint, wl)
        counts_paths = [os.path.join(tmp, f"counts-{k}.json") for k in range(wl.procs)]
        job = {
            "workload": wl.to_dict(),
            "endpoint": endpoint,
            "queue": QUEUE,
            "tmp": tmp,
            "result_path": os.path.join(tmp, "result.json"),
            "rpc_timeout": args.rpc_timeout,
            "warmup_timeout": args.warmup_timeout,
            "first_reply_timeout": args.timeout,
            "pids_path": os.path.join(tmp, "pids.json"),
        }

        def spawn_workers() -> list[_Proc]:
            if wl.kind == "methods":  # W6: each worker serves 2 of the 8 methods
                os.environ[W6_ENV] = "1"  # restored with the rest after the run
            if wl.kind == "hol":  # W8: 1 % of the tasks are slow
                os.environ[W8_ENV] = "1"
                details["prefetch"] = wl.prefetch or _worker_default_prefetch()
            return [
                group.spawn(
                    f"{system.name} worker process {k}",
                    system.worker_target,
                    QUEUE,
                    endpoint,
                    wl.threads,
                    counts_paths[k],
                    wl.prefetch,
                )
                for k in range(wl.procs)
            ]

        workers: list[_Proc] = []
        t_spawn = 0.0

        def write_pids() -> None:
            pids = {"broker": broker.pid, "workers": [w.pid for w in workers]}
            write_json_atomic(job["pids_path"], pids)

        if wl.kind == "backlog":
            status()  # the broker answers: its start-up allocations are done
            rss0 = rss_bytes(broker.pid)
            sender = group.spawn(f"{system.name} sender", system.sender_target, job)
            _wait_for(
                lambda: status()["pending"] >= wl.n,
                args.timeout,
                f"{wl.n} pending messages",
                (broker, sender),
                log_path,
                row["warnings"],
                interval=0.05,  # no workers: a status query is cheap for the broker
            )
            t_all_pending = time.monotonic()
            pending = status()["pending"]
            if pending != wl.n:
                raise BenchError(f"broker holds {pending} pending messages, expected {wl.n}")
            rss1 = rss_bytes(broker.pid)
            details.update(rss_before=rss0, rss_pending=rss1)
            extra["bytes_per_pending"] = (rss1 - rss0) / wl.n
            t_spawn = time.monotonic()
            workers = spawn_workers()
            write_pids()
        elif wl.kind == "scheduled":  # W7: workers first, then everything scheduled at once
            workers = spawn_workers()
            _wait_for(lambda: status()["workers"] >= wl.workers, args.warmup_timeout,
                      f"{wl.workers} registered workers", (broker, *workers), log_path,
                      row["warnings"])
            write_pids()
            rss0 = rss_bytes(broker.pid)
            sender = group.spawn(f"{system.name} sender", system.sender_target, job)
            _wait_for(
                lambda: status()["scheduled"] >= wl.n,
                w7_lead(wl.n),
                f"{wl.n} scheduled messages before the first is due",
                (broker, sender, *workers),
                log_path,
                row["warnings"],
                interval=0.05,
            )
            rss1 = rss_bytes(broker.pid)
            details.update(rss_before=rss0, rss_scheduled=rss1)
            extra["bytes_per_scheduled"] = (rss1 - rss0) / wl.n
        else:
            workers = spawn_workers()
            if wl.idle_s > 0:
                t0 = time.monotonic()
                _wait_for(
                    lambda: status()["workers"] >= wl.workers,
                    args.warmup_timeout,
                    f"{wl.workers} registered workers",
                    (broker, *workers),
                    log_path,
                    row["warnings"],
                )
                details["registration_s"] = time.monotonic() - t0
                idle = _measure_idle(broker, workers, wl.idle_s, log_path)
                details["idle_window_s"] = idle.pop("idle_window_s")
                extra.update(idle)
                after = status()["workers"]
                details["workers_after_idle"] = after
                if after != wl.workers:
                    raise BenchError(
                        f"{wl.workers - after} of {wl.workers} workers dropped while idle"
                    )
            write_pids()
            sender = group.spawn(f"{system.name} sender", system.sender_target, job)
        deadline = time.monotonic() + args.timeout + (w7_lead(wl.n) if wl.kind == "scheduled"
                                                      else 0.0)
        while sender.alive() and time.monotonic() < deadline:
            sender.join(min(0.5, deadline - time.monotonic()))
            dead = [p.name for p in (broker, *workers) if not p.alive()]
            if dead:
                raise BenchError(
                    f"died during the run: {', '.join(dead)}; broker log: {_tail(log_path)}"
                )
        if sender.alive():
            raise BenchError(f"sender did not finish within {args.timeout}s")
        res = _read_result(job["result_path"], sender)
        if wl.kind == "backlog":
            extra["accept_per_s"] = wl.n / (t_all_pending - res["submit_start_mono"])
            details["spawn_to_last_reply_s"] = res["last_reply_mono"] - t_spawn
            details["rss_after_drain"] = rss_bytes(broker.pid)
        row["warnings"] += group.stop(workers, timeout=10)
        details.update(res)
        row["metrics"] = _metrics_and_checks(wl, res, counts_paths, details)
        row["metrics"].update(extra)
        row["metrics"].update({f"cpu_us_{k}": 1e6 * v / wl.n for k, v in res["cpu_s"].items()})
    except BenchError as exc:
        row.update(status="failed", error=str(exc))
    except Exception:  # noqa: BLE001 - one broken run must not hide the others
        row.update(status="failed", error=traceback.format_exc())
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        row["warnings"] += group.stop(timeout=5)
        if row["status"] != "ok" and os.path.exists(log_path):
            details["broker_log_tail"] = _tail(log_path)
        if args.keep_tmp:
            details["tmp"] = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


def _worker_default_prefetch() -> int | None:
    """``worker.Worker``'s default ``prefetch`` (what W8 runs at), for the record."""
    try:
        import inspect

        from worker import Worker

        default = inspect.signature(Worker).parameters["prefetch"].default
        return int(default)
    except Exception:  # noqa: BLE001 - only a detail of the report
        return None


def _read_result(path: str, sender: _Proc) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            res: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        raise BenchError(f"sender exited with code {sender.exitcode()} and no result") from None
    if "error" in res:
        raise BenchError(f"sender failed: {res['error']}\n{res.get('traceback', '')}")
    return res


def _metrics_and_checks(
    wl: Workload, res: dict[str, Any], counts_paths: list[str], details: dict[str, Any]
) -> dict[str, float]:
    """Cross-check worker-reported counts against the sender; build the metrics."""
    missing = [p for p in counts_paths if not os.path.exists(p)]
    if missing:
        raise BenchError(
            f"{len(missing)}/{len(counts_paths)} worker processes wrote no "
            "task counts (did Worker.run() return on SIGTERM?)"
        )
    counts = merge_counts(counts_paths)
    if len(counts) != wl.workers:
        raise BenchError(f"{len(counts)} workers reported counts, expected {wl.workers}")
    measured = {w: c["measured"] for w, c in counts.items()}
    warm = {w: c["warmup"] for w, c in counts.items()}
    seen = res["sender_seen_measured"]
    if res.get("errors"):  # W9: an rpc that failed (Timeout...) may or may not have run
        fewer = {w: c for w, c in seen.items() if measured.get(w, 0) < c}
        if fewer or sum(measured.values()) > wl.n or sum(warm.values()) != res["warmup_n"]:
            raise BenchError(
                f"workers ran {sum(measured.values())}+{sum(warm.values())} tasks, sender "
                f"got {sum(seen.values())}+{res['warmup_n']} replies and "
                f"{res['errors']} errors; per worker: ran {measured}, seen {seen}"
            )
    else:
        if sum(measured.values()) != wl.n or sum(warm.values()) != res["warmup_n"]:
            raise BenchError(
                f"workers ran {sum(measured.values())}+{sum(warm.values())} tasks, "
                f"sender got {wl.n}+{res['warmup_n']} replies"
            )
        if {w: c for w, c in measured.items() if c} != seen:
            raise BenchError(
                f"per-worker counts differ: workers say {measured}, sender saw {seen}"
            )
    details["per_worker_measured"] = measured
    details["workers"] = wl.workers
    if wl.kind == "rpc":
        return {k: res[k] for k in ("rpc_per_s", "p50_us", "p99_us")}
    if wl.kind == "hol":
        return {k: res[k] for k in ("short_p50_ms", "short_p99_ms", "slow_p50_ms")}
    if wl.kind == "many":
        if not res["rpc_per_s"] > 0:
            raise BenchError(f"no rpc succeeded ({res['errors']} errors)")
        return {"rpc_per_s": res["rpc_per_s"], "errors": float(res["errors"]),
                "p99_us": res.get("p99_us", math.nan)}
    if wl.kind == "backlog":
        return {"drain_per_s": res["drain_per_s"]}
    if wl.kind == "scheduled":
        if res["early"]:
            raise BenchError(f"{res['early']} replies arrived before their due time")
        return {"lag_p50_ms": res["lag_p50_ms"], "lag_p99_ms": res["lag_p99_ms"]}
    out = {"tasks_per_s": res["tasks_per_s"]}
    if wl.kind == "methods":
        out["starved_max_wait_ms"] = res["starved_max_wait_ms"]
    if wl.name == "W3":
        out["min_per_worker"] = min(measured.values())
        out["max_per_worker"] = max(measured.values())
    return out


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    """CPU model, cores, Python, pyzmq/libzmq versions and friends."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
    }
    try:
        from importlib.metadata import version

        info["cbor2"] = version("cbor2")
    except Exception:  # noqa: BLE001
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        info["git"] = rev.stdout.strip() or None
        dirty = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "sqm", "sender", "worker"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        # Uncommitted changes to the measured code: the git rev alone would mislead.
        info["git_dirty"] = [ln[3:] for ln in dirty.stdout.splitlines() if ln.strip()]
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    info["loadavg_start"] = _loadavg()
    return info


#: Before each run the machine must be this idle (busy fraction of all CPUs over
#: SETTLE_WINDOW_S), waiting at most SETTLE_MAX_S: the previous run's processes
#: (512 senders of W9 exiting, a NATS server) must not be measured with the next.
SETTLE_BUSY = 0.25
SETTLE_WINDOW_S = 0.25
SETTLE_MAX_S = 10.0


def _cpu_times() -> tuple[int, int, int] | None:
    """(busy, total, steal) jiffies of all CPUs so far, from /proc/stat (None off Linux).

    Steal is time the hypervisor gave this VM's CPUs to someone else: on a
    shared VM it is what swings one run against the next.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields) - idle, sum(fields), steal


def steal_share(before: tuple[int, int, int] | None) -> float | None:
    """The share of CPU time stolen by the hypervisor since ``before`` (None off Linux)."""
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[2] - before[2]) / (after[1] - before[1]), 3)


def settle() -> tuple[float, float | None]:
    """Wait until the machine is nearly idle (at most SETTLE_MAX_S); return
    (seconds waited, busy fraction of the last window; None off Linux).

    The same for every system, so same-run ratios compare runs that start
    alike; a sleep is fine here (the harness, never a measured path).
    """
    t0 = time.monotonic()
    busy: float | None = None
    before = _cpu_times()
    while before is not None:
        time.sleep(SETTLE_WINDOW_S)
        after = _cpu_times()
        if after is None:
            break
        total = after[1] - before[1]
        busy = (after[0] - before[0]) / total if total > 0 else 0.0
        if busy < SETTLE_BUSY or time.monotonic() - t0 >= SETTLE_MAX_S:
            break
        before = after
    return time.monotonic() - t0, busy


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_line(m: dict[str, Any]) -> str:
    """One-line machine summary."""
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['implementation']} {m['python']}, "
        f"pyzmq {m['pyzmq']}, libzmq {m['libzmq']}, {m['platform']}, "
        f"load {m['loadavg_start']}, git {m.get('git')}"
        + (" (uncommitted changes in sqm/sender/worker)" if m.get("git_dirty") else "")
    )


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold repeated runs of one (system, workload) into one row.

    Metrics are per-metric medians; every run's metrics stay in ``runs``. Any
    failed run makes the row failed.
    """
    if len(runs) == 1:
        return runs[0]
    row = dict(runs[-1])
    failed = [r for r in runs if r["status"] != "ok"]
    row["warnings"] = [w for r in runs for w in r["warnings"]]
    row["runs"] = [r["metrics"] for r in runs]
    row["settled"] = [r.get("settled") for r in runs]
    row["wall_s"] = sum(r.get("wall_s", 0.0) for r in runs)
    if failed:
        row.update(status="failed", error=failed[0]["error"])
    else:
        row["metrics"] = {
            k: statistics.median(r["metrics"][k] for r in runs) for k in runs[0]["metrics"]
        }
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add the derived metrics, then set ``row["ratios"]``.

    Derived metrics (see :class:`Metric`) divide a row's figure by another
    workload's median from the same run. Ratios are each metric divided by
    the baseline's, same workload.
    """
    by = {(r["system"], r["workload"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for m in METRICS.get(r["workload"], []):
            if m.derived is None or (m.on and r["system"] not in m.on):
                continue
            ref_wl, ref_sys = m.derived
            ref = by.get((ref_sys or r["system"], ref_wl))
            if ref is None or ref is r:
                continue
            num = r["metrics"].get(m.src)
            den = ref["metrics"].get(m.src)
            if num is not None and den:
                r["metrics"][m.key] = num / den
    base = {
        r["workload"]: r["metrics"]
        for r in rows
        if r["system"] == "baseline" and r["status"] == "ok"
    }
    for r in rows:
        b = base.get(r["workload"], {})
        r["ratios"] = {k: (v / b[k] if b.get(k) else None) for k, v in r["metrics"].items()}


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate :data:`TARGETS` on every sqm system's row that has the figure."""
    out: list[dict[str, Any]] = []
    for t in TARGETS:
        for r in rows:
            if r["workload"] != t.workload or r["status"] != "ok":
                continue
            if t.systems:
                if r["system"] not in t.systems:
                    continue
            elif r["system"] == "baseline" or r["system"] in PEERS:
                continue
            v = r["metrics"].get(t.key)
            if v is None:
                continue
            out.append(
                {
                    "workload": t.workload,
                    "system": r["system"],
                    "metric": t.key,
                    "target": f"{t.op} {t.value:g}",
                    "text": t.text,
                    "value": v,
                    "met": t.met(v),
                }
            )
    return out


def format_targets(results: list[dict[str, Any]]) -> str:
    """One line per checked target."""
    metrics = {(w, m.key): m for w, ms in METRICS.items() for m in ms}
    lines = []
    for t in results:
        m = metrics[(t["workload"], t["metric"])]  # one key may carry per-workload labels
        lines.append(
            f"{t['workload']:<7} {t['system']:<10} {m.label} "
            f"= {_fmt(t['value'], m.fmt)} (target {t['target']}): "
            f"{'met' if t['met'] else 'NOT MET'}   [{t['text']}]"
        )
    return "\n".join(lines)


def _fmt(v: float, kind: str = "num") -> str:
    if kind == "x":
        return f"{v:.2f}x"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def format_table(rows: list[dict[str, Any]], systems: list[str], workloads: list[str]) -> str:
    """Rows = workload x metric, columns = systems; cells ``value (ratio x)``."""
    by = {(r["system"], r["workload"]): r for r in rows}
    header = ["workload", "metric", *systems]
    lines: list[list[str]] = []
    for w in workloads:
        for m in METRICS[w]:
            if m.hidden or (m.on and not set(m.on) & set(systems)):
                continue
            line = [w, m.label]
            for s in systems:
                r = by.get((s, w))
                if r is None:
                    line.append("-")
                elif r["status"] != "ok":
                    line.append(r["status"].upper())
                elif m.key not in r["metrics"]:
                    line.append("-")
                else:
                    cell = _fmt(r["metrics"][m.key], m.fmt)
                    ratio = r["ratios"].get(m.key)
                    if s != "baseline" and m.ratio and ratio is not None:
                        cell += f" ({ratio:.2f}x)"
                    line.append(cell)
            lines.append(line)
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def _csv(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what}: {', '.join(bad) or '(none)'}; choose from {', '.join(choices)}"
            )
        return list(dict.fromkeys(items))

    return parse


def _layout(text: str) -> tuple[int, int]:
    try:
        p, t = (int(x) for x in text.lower().split("x"))
        if p < 1 or t < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError("expected PROCSxTHREADS, e.g. 32x1 or 4x8") from None
    return p, t


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m bench`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark sqm against a minimal raw-pyzmq broker (see bench/README.md).",
    )
    ap.add_argument(
        "--only",
        type=_csv(WORKLOAD_ORDER, "workload"),
        default=list(WORKLOAD_ORDER),
        metavar="W1,W2,...",
        help=f"workloads to run, from {','.join(WORKLOAD_ORDER)} (default: all)",
    )
    ap.add_argument(
        "--systems",
        type=_csv(SYSTEMS, "system"),
        default=list(SYSTEMS),
        metavar="S1,S2,...",
        help=f"systems to run, from {','.join(SYSTEMS)} (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run (~60 s)")
    ap.add_argument(
        "--curve",
        action="store_true",
        help=f"also run W1 and W2 on {CURVE_SYSTEM} (CURVE on every socket) and report "
        "its figures as ratios to sqm's in the same run",
    )
    ap.add_argument(
        "--journal",
        action="store_true",
        help=f"also run W2 on {JOURNAL_SYSTEM} (`sqm serve --journal`) and report it as a "
        "ratio to sqm's (memory mode) W2 in the same run",
    )
    ap.add_argument(
        "--peers",
        type=_csv(PEERS, "peer"),
        default=[],
        metavar="nats",
        help="also run other queues on the workloads defined for them, each a column: "
        "nats = a private nats-server with nats-py clients (skipped, with the reason "
        "printed, where nats-server or nats-py is missing)",
    )
    ap.add_argument(
        "--out", default="bench-results.json", help="JSON results file (default: %(default)s)"
    )
    ap.add_argument(
        "--w3-layout",
        type=_layout,
        default=(32, 1),
        metavar="PxT",
        help="W3 workers as P processes x T threads (default: 32x1)",
    )
    ap.add_argument(
        "--w4-layout",
        type=_layout,
        default=(4, 250),
        metavar="PxT",
        help="W4 workers as P processes x T threads (default: 4x250)",
    )
    ap.add_argument(
        "--w4-idle",
        type=float,
        default=None,
        metavar="S",
        help="seconds of idle over which W4 measures CPU (default: 10, 3 with --quick)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each (system, workload) N times, interleaved, and report "
        "per-metric medians (default: 1)",
    )
    ap.add_argument(
        "--keep-tmp",
        action="store_true",
        help="keep each run's temp dir (broker log, counts) for debugging",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="max seconds for one sender run (default: %(default)s)",
    )
    ap.add_argument(
        "--rpc-timeout",
        type=float,
        default=10.0,
        help="max seconds to wait for one reply (default: %(default)s)",
    )
    ap.add_argument(
        "--sqm-serve-args",
        default="",
        metavar="ARGS",
        help="extra `sqm serve` options, e.g. \"--journal {tmp}/journal.db\" "
        "({tmp} is the run's temp dir)",
    )
    ap.add_argument(
        "--warmup-timeout",
        type=float,
        default=60.0,
        help="max seconds for all workers to answer during warm-up (default: %(default)s)",
    )
    return ap


def _runs_on(wl: Workload, system: str) -> bool:
    if system == CURVE_SYSTEM:
        return wl.name in CURVE_WORKLOADS
    if system == JOURNAL_SYSTEM:
        return wl.name in JOURNAL_WORKLOADS
    if system == "nats":
        return wl.name in NATS_WORKLOADS
    return wl.runs_on(system)


def curve_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each CURVE workload's figures divided by the insecure sqm's of the same run."""
    by = {(r["system"], r["workload"]): r for r in rows if r["status"] == "ok"}
    out: dict[str, dict[str, float]] = {}
    for w in CURVE_WORKLOADS:
        sec, plain = by.get((CURVE_SYSTEM, w)), by.get(("sqm", w))
        if sec is None or plain is None:
            continue
        out[w] = {k: v / plain["metrics"][k] for k, v in sec["metrics"].items()
                  if isinstance(v, (int, float)) and plain["metrics"].get(k)}
    return out


def _placeholder_row(system: str, workload: str, status: str, why: str) -> dict[str, Any]:
    """A result row for a pair that did not run (``n/a`` or ``skipped``)."""
    return {
        "system": system,
        "workload": workload,
        "status": status,
        "error": why,
        "warnings": [],
        "metrics": {},
        "details": {},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; return 0 if every selected run passed, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    SQM_SERVE_EXTRA[:] = shlex.split(args.sqm_serve_args)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    systems = _systems()
    if args.curve:
        if "sqm" not in args.systems:
            args.systems.append("sqm")  # the insecure figures the ratios divide by
        args.systems.append(CURVE_SYSTEM)
    if args.journal:
        if "sqm" not in args.systems:
            args.systems.append("sqm")  # the memory-mode figure the ratio divides by
        args.systems.append(JOURNAL_SYSTEM)
    peers_skipped = {}
    for peer in args.peers:
        why = nats_peer.unavailable()
        if why:
            peers_skipped[peer] = why
            print(f"note: --peers {peer} skipped: {why}", file=sys.stderr, flush=True)
        else:
            args.systems.append(peer)
    workloads = make_workloads(args.quick, args.w3_layout, args.w4_layout, args.w4_idle)
    selected = [w for w in WORKLOAD_ORDER if w in args.only]
    machine = machine_info()
    print(machine_line(machine), flush=True)
    if "baseline" not in args.systems:
        print("note: baseline not selected, no ratios", file=sys.stderr)

    skip_reason = None
    if any(systems[s].uses_sqm_broker for s in args.systems):
        skip_reason = sqm_unavailable()
        if skip_reason:
            print(f"note: sqm systems skipped: {skip_reason}", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    # SIGTERM to the orchestrator -> KeyboardInterrupt, so `finally` tears down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # Repetitions outermost: every workload's runs spread over the whole
        # run, so ratios between workloads (W4 / W2, W2-pN / W2) see the same
        # background load. Systems are interleaved within each repetition.
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rep in range(args.repeat):
            for w in selected:
                wl = workloads[w]
                for s in args.systems:
                    if (systems[s].uses_sqm_broker and skip_reason) or not _runs_on(wl, s):
                        continue
                    rep_note = f" [{rep + 1}/{args.repeat}]" if args.repeat > 1 else ""
                    print(
                        f"running {w} on {s}{rep_note} ({wl.title}, n={wl.n}) ...",
                        end=" ",
                        file=sys.stderr,
                        flush=True,
                    )
                    waited, busy = settle()
                    t0 = time.monotonic()
                    cpu0 = _cpu_times()
                    row = run_one(systems[s], wl, args)
                    row["settled"] = {"waited_s": round(waited, 2),
                                      "busy": None if busy is None else round(busy, 3),
                                      "steal": steal_share(cpu0)}
                    if busy is not None and busy >= SETTLE_BUSY:
                        row["warnings"].append(f"the machine was still {busy:.0%} busy after "
                                               f"{waited:.1f} s: measured anyway")
                    row["wall_s"] = time.monotonic() - t0
                    print(f"{row['status']} in {row['wall_s']:.1f}s", file=sys.stderr, flush=True)
                    for warning in row["warnings"]:
                        print(f"  warning: {warning}", file=sys.stderr)
                    if row["status"] == "failed":
                        print(f"  FAILED: {row['error']}", file=sys.stderr)
                    runs.setdefault((w, s), []).append(row)
        for w in selected:
            for s in args.systems:
                if not _runs_on(workloads[w], s):
                    rows.append(_placeholder_row(s, w, "n/a", f"{w} is not defined for {s}"))
                elif systems[s].uses_sqm_broker and skip_reason:
                    rows.append(_placeholder_row(s, w, "skipped", skip_reason))
                else:
                    rows.append(merge_runs(runs[(w, s)]))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    machine["loadavg_end"] = _loadavg()
    add_ratios(rows)
    targets = check_targets(rows)
    print()
    print(format_table(rows, args.systems, selected), flush=True)
    if targets:
        print("\ntargets (medians of this run):")
        print(format_targets(targets), flush=True)
    print(
        "\nCPU us per measured message, by process (timed phase; W5: the drain; "
        "W4 includes heartbeats):"
    )
    print(format_cpu_table(rows, args.systems, selected), flush=True)
    curve = curve_ratios(rows) if args.curve else {}
    if curve:
        print("\nCURVE cost (sqm-curve / sqm, same run):")
        for w, ratios in curve.items():
            print(f"  {w}: " + "   ".join(f"{k} {v:.2f} x" for k, v in ratios.items()))
    failed = [r for r in rows if r["status"] == "failed"]
    report = {
        "machine": machine,
        "config": {
            "quick": args.quick,
            "systems": args.systems,
            "workloads": selected,
            "definitions": {w: workloads[w].to_dict() for w in selected},
            "rpc_timeout": args.rpc_timeout,
            "repeat": args.repeat,
            "peers": args.peers,
            "peers_skipped": peers_skipped,
            "w3_layout": "x".join(map(str, args.w3_layout)),
            "w4_layout": "x".join(map(str, args.w4_layout)),
        },
        "total_wall_s": time.monotonic() - t_start,
        "ok": not failed,
        "targets": targets,
        "curve_ratios": curve,
        "results": rows,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(
        f"\nload average at end: {machine['loadavg_end']}; "
        f"results written to {args.out} ({report['total_wall_s']:.0f}s)",
        flush=True,
    )
    if failed:
        print(
            f"{len(failed)} run(s) FAILED: "
            + ", ".join(f"{r['workload']}/{r['system']}" for r in failed),
            file=sys.stderr,
        )
        return 1
    return 0
