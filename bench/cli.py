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
import multiprocessing
import os
import platform
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

from bench import baseline, sqm_adapter
from bench.common import (
    BenchError,
    Workload,
    ipc_endpoint,
    ipc_path,
    make_workloads,
    merge_counts,
    wait_until,
)

SYSTEMS = ("baseline", "sqm", "sqm-async")
QUEUE = "bench"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (metric key, label, higher is better) per workload, in table order.
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "W1": [("rpc_per_s", "rpc/s", True), ("p50_us", "p50 us", False), ("p99_us", "p99 us", False)],
    "W2": [("tasks_per_s", "tasks/s", True)],
    "W3": [
        ("tasks_per_s", "tasks/s", True),
        ("min_per_worker", "min tasks/worker", True),
        ("max_per_worker", "max tasks/worker", False),
    ],
}

_MP = multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------- processes


class _Proc:
    """A child process: a ``multiprocessing`` Process or a ``subprocess.Popen``."""

    def __init__(self, name: str, proc: Any) -> None:
        self.name = name
        self.proc = proc

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
        if self.alive():
            self.proc.terminate()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()


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

    def popen(self, name: str, cmd: Sequence[str], log_path: str, env: dict[str, str]) -> _Proc:
        """Start an external command, stdout+stderr to ``log_path``."""
        with open(log_path, "wb") as log:
            p = subprocess.Popen(
                list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        proc = _Proc(name, p)
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
    worker_target: Callable[[str, str, int, str], None]
    sender_target: Callable[[dict[str, Any]], None]
    uses_sqm_broker: bool


def _systems() -> dict[str, System]:
    return {
        "baseline": System("baseline", baseline.worker_host, baseline.sender_main, False),
        "sqm": System("sqm", sqm_adapter.worker_host, sqm_adapter.sender_main, True),
        "sqm-async": System(
            "sqm-async", sqm_adapter.worker_host, sqm_adapter.async_sender_main, True
        ),
    }


def sqm_unavailable() -> str | None:
    """Why the sqm systems cannot run (``None`` if they can)."""
    try:
        importlib.import_module("sqm.cli")
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
    for var in ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE"):
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
    endpoint = ipc_endpoint(tmp, f"{QUEUE}.sock")
    if system.uses_sqm_broker:
        broker = group.popen(
            "sqm serve",
            _sqm_serve_cmd() + ["serve", QUEUE, "--endpoint", endpoint],
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


def run_one(system: System, wl: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Run workload ``wl`` on ``system`` in fresh processes; return a result row."""
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
    try:
        # Spawned children inherit this: sqm files go to tmp, no stray SQM_* settings.
        os.environ.clear()
        os.environ.update(_child_env(tmp))
        endpoint, broker = _start_broker(system, tmp, group, log_path)
        counts_paths = [os.path.join(tmp, f"counts-{k}.json") for k in range(wl.procs)]
        workers = [
            group.spawn(
                f"{system.name} worker process {k}",
                system.worker_target,
                QUEUE,
                endpoint,
                wl.threads,
                counts_paths[k],
            )
            for k in range(wl.procs)
        ]
        job = {
            "workload": wl.to_dict(),
            "endpoint": endpoint,
            "queue": QUEUE,
            "tmp": tmp,
            "result_path": os.path.join(tmp, "result.json"),
            "rpc_timeout": args.rpc_timeout,
            "warmup_timeout": args.warmup_timeout,
        }
        sender = group.spawn(f"{system.name} sender", system.sender_target, job)
        deadline = time.monotonic() + args.timeout
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
        row["warnings"] += group.stop(workers, timeout=10)
        row["details"].update(res)
        row["metrics"] = _metrics_and_checks(wl, res, counts_paths, row["details"])
    except BenchError as exc:
        row.update(status="failed", error=str(exc))
    except Exception:  # noqa: BLE001 - one broken run must not hide the others
        row.update(status="failed", error=traceback.format_exc())
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        row["warnings"] += group.stop(timeout=5)
        if row["status"] != "ok" and os.path.exists(log_path):
            row["details"]["broker_log_tail"] = _tail(log_path)
        if args.keep_tmp:
            row["details"]["tmp"] = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


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
    if sum(measured.values()) != wl.n or sum(warm.values()) != res["warmup_n"]:
        raise BenchError(
            f"workers ran {sum(measured.values())}+{sum(warm.values())} tasks, "
            f"sender got {wl.n}+{res['warmup_n']} replies"
        )
    seen = res["sender_seen_measured"]
    if {w: c for w, c in measured.items() if c} != seen:
        raise BenchError(f"per-worker counts differ: workers say {measured}, sender saw {seen}")
    details["per_worker_measured"] = measured
    details["workers"] = wl.workers
    if wl.kind == "rpc":
        return {k: res[k] for k in ("rpc_per_s", "p50_us", "p99_us")}
    out = {"tasks_per_s": res["tasks_per_s"]}
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
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    info["loadavg_start"] = _loadavg()
    return info


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
        f"load {m['loadavg_start']}"
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
    row["wall_s"] = sum(r.get("wall_s", 0.0) for r in runs)
    if failed:
        row.update(status="failed", error=failed[0]["error"])
    else:
        row["metrics"] = {
            k: statistics.median(r["metrics"][k] for r in runs) for k in runs[0]["metrics"]
        }
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``row["ratios"]``: each metric divided by the baseline's, same workload."""
    base = {
        r["workload"]: r["metrics"]
        for r in rows
        if r["system"] == "baseline" and r["status"] == "ok"
    }
    for r in rows:
        b = base.get(r["workload"], {})
        r["ratios"] = {k: (v / b[k] if b.get(k) else None) for k, v in r["metrics"].items()}


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def format_table(rows: list[dict[str, Any]], systems: list[str], workloads: list[str]) -> str:
    """Rows = workload x metric, columns = systems; cells ``value (ratio x)``."""
    by = {(r["system"], r["workload"]): r for r in rows}
    header = ["workload", "metric", *systems]
    lines: list[list[str]] = []
    for w in workloads:
        for key, label, _ in METRICS[w]:
            line = [w, label]
            for s in systems:
                r = by.get((s, w))
                if r is None:
                    line.append("-")
                elif r["status"] != "ok":
                    line.append(r["status"].upper())
                else:
                    cell = _fmt(r["metrics"][key])
                    ratio = r["ratios"].get(key)
                    if s != "baseline" and ratio is not None:
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
        type=_csv(("W1", "W2", "W3"), "workload"),
        default=["W1", "W2", "W3"],
        metavar="W1,W2,...",
        help="workloads to run (default: all)",
    )
    ap.add_argument(
        "--systems",
        type=_csv(SYSTEMS, "system"),
        default=list(SYSTEMS),
        metavar="S1,S2,...",
        help=f"systems to run, from {','.join(SYSTEMS)} (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run (< 60 s)")
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
        "--warmup-timeout",
        type=float,
        default=60.0,
        help="max seconds for all workers to answer during warm-up (default: %(default)s)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; return 0 if every selected run passed, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    systems = _systems()
    workloads = make_workloads(args.quick, args.w3_layout)
    selected = [w for w in ("W1", "W2", "W3") if w in args.only]
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
        for w in selected:
            wl = workloads[w]
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
            for rep in range(args.repeat):  # systems interleaved within each repetition
                for s in args.systems:
                    if systems[s].uses_sqm_broker and skip_reason:
                        continue
                    rep_note = f" [{rep + 1}/{args.repeat}]" if args.repeat > 1 else ""
                    print(
                        f"running {w} on {s}{rep_note} ({wl.title}, n={wl.n}) ...",
                        end=" ",
                        file=sys.stderr,
                        flush=True,
                    )
                    t0 = time.monotonic()
                    row = run_one(systems[s], wl, args)
                    row["wall_s"] = time.monotonic() - t0
                    print(f"{row['status']} in {row['wall_s']:.1f}s", file=sys.stderr, flush=True)
                    for warning in row["warnings"]:
                        print(f"  warning: {warning}", file=sys.stderr)
                    if row["status"] == "failed":
                        print(f"  FAILED: {row['error']}", file=sys.stderr)
                    runs[s].append(row)
            for s in args.systems:
                if systems[s].uses_sqm_broker and skip_reason:
                    rows.append(
                        {
                            "system": s,
                            "workload": w,
                            "status": "skipped",
                            "error": skip_reason,
                            "warnings": [],
                            "metrics": {},
                            "details": {},
                        }
                    )
                else:
                    rows.append(merge_runs(runs[s]))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    machine["loadavg_end"] = _loadavg()
    add_ratios(rows)
    print()
    print(format_table(rows, args.systems, selected), flush=True)
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
            "w3_layout": "x".join(map(str, args.w3_layout)),
        },
        "total_wall_s": time.monotonic() - t_start,
        "ok": not failed,
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
