"""The queue's figures (``sqm status --json``, the metrics snapshot), read from a core.

Built on demand from :class:`~sqm.core.queue.QueueCore`'s counters, never on
the hot path: the core only counts, this module turns counts into a report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..metrics import Histogram, MethodStats
from ..protocol import decode_json
from .workers import DETACHED, READY

if TYPE_CHECKING:
    from .queue import QueueCore
    from .workers import WorkerState


def worker_label(w: WorkerState) -> str:
    """The state ``status`` shows: leaving (asked to stop, or said bye), detached
    (its connection closed: no new work until it is back), busy or idle."""
    if w.state != READY:
        return "detached" if w.state == DETACHED else "leaving"
    return "busy" if w.in_flight else "idle"


def worker_status(w: WorkerState, now: float) -> dict[str, Any]:
    """One worker's row in ``status()["workers"]``."""
    w_busy = w.busy_s + (now - w.busy_since if w.in_flight else 0.0)
    info = w.info
    rep = _report(w.report)
    lived = now - w.registered_at
    return {
        "id": w.id,
        "host": rep.get("host") or info.get("host", ""),
        "pid": rep.get("pid") or info.get("pid", 0),
        "state": worker_label(w),
        "started_at": info.get("started_at", w.registered_at),
        "registered_at": w.registered_at,
        "idle_s": 0.0 if w.in_flight else max(0.0, now - w.idle_since),
        "tasks_done": w.tasks_done,
        "in_flight": len(w.in_flight),
        "slots": w.slots,
        "concurrency": w.concurrency,
        "parked": w.parked,
        # busy_s: the worker's own count (time inside callbacks) when
        # it reports one, else what sqm saw (time holding messages).
        "busy_s": round(float(rep.get("busy_s", w_busy)), 6),
        "utilization": min(1.0, w_busy / lived) if lived > 0 else 0.0,
        "rss_bytes": rep.get("rss_bytes"),
        "nice": rep.get("nice"),
        "worker_tasks_done": rep.get("tasks_done"),
        "last_report_at": w.report_at or None,
        # sqm watches its connection (closing is death) instead of heartbeating it.
        "watched": w.watched,
        # What it serves; [] means nothing, and a worker that advertised
        # nothing (an older client) serves every method: null.
        "methods": None if w.methods is None else [m.decode("utf-8", "replace") for m in w.methods],
    }


def _report(raw: bytes) -> dict[str, Any]:
    """A worker's self-report, decoded here rather than per heartbeat ({} if none or bad)."""
    if not raw:
        return {}
    try:
        rep = decode_json(raw)
    except ValueError:
        return {}
    return rep if isinstance(rep, dict) else {}


def workers_status(core: QueueCore, now: float) -> list[dict[str, Any]]:
    """Every registered worker's row (``sqm workers``)."""
    return [worker_status(w, now) for w in core.workers.values()]


def queue_status(core: QueueCore, now: float) -> dict[str, Any]:
    """The figures ``sqm status --json`` prints."""
    busy = core.dead_busy_s
    lifetime = core.dead_lifetime_s
    for w in core.workers.values():
        busy += w.busy_s + (now - w.busy_since if w.in_flight else 0.0)
        lifetime += now - w.registered_at
    return {
        "queue": core.name,
        "started_at": core.started_at,
        "uptime_s": max(0.0, now - core.started_at),
        "pending": core.pending,
        "scheduled": core.scheduled,
        "in_flight": core.in_flight,
        "workers": workers_status(core, now),
        "workers_current": len(core.workers),
        "workers_ever": len(core.ever),
        "assigned_total": core.assigned_total,
        "completed_total": core.completed_total,
        "failed_total": core.failed_total,
        "expired_total": core.expired_total,
        "rejected_total": core.rejected_total,
        "redelivered_total": core.redelivered_total,
        "malformed_total": core.malformed_total,
        "nacked_total": core.nacked_total,
        "reclaims_total": core.reclaims_total,
        "utilization": min(1.0, busy / lifetime) if lifetime > 0 else 0.0,
        "draining": not core.dispatching,
        "max_pending": core.max_pending,
        "latency": latency_total(core),
        "methods": methods_status(core),
        "unknown_method_total": core.unknown_total,
        "forwarded_total": core.forwarded_total,
        "retried_total": core.retried_total,
        "cancelled_total": core.cancelled_total,
        "time_limited_total": core.time_limited_total,
    }


def methods_status(core: QueueCore) -> dict[str, dict[str, Any]]:
    """Per method: its figures, with ``pending`` and ``workers`` (those that serve it).

    Every method pending or served is there, and every method seen before,
    up to the core's bound on names (MAX_METHODS): past it, the rest add up
    under ``(other)``.
    """
    from .queue import MAX_METHODS, OTHER_METHOD

    out: dict[str, dict[str, Any]] = {}
    for m, st in core.methods.items():
        out[m.decode("utf-8", "replace")] = dict(st.snapshot(), pending=0,
                                                 workers=core.universal_workers)
    for m, (pending, workers) in core.method_load().items():
        name = m.decode("utf-8", "replace")
        entry = out.get(name)
        if entry is None:
            if len(out) >= MAX_METHODS:
                name = OTHER_METHOD.decode()
                entry = out.get(name)
                if entry is None:
                    entry = out[name] = dict(MethodStats().snapshot(), pending=0, workers=0)
                entry["pending"] += pending
                entry["workers"] = max(entry["workers"], workers)
                continue
            entry = out[name] = MethodStats().snapshot()
        entry["pending"] = pending
        entry["workers"] = workers
    return out


def latency_total(core: QueueCore) -> dict[str, Any]:
    """Queue-wide histograms: the sum of the per-method ones (recorded once)."""
    wait, service = Histogram(), Histogram()
    for st in core.methods.values():
        wait.add(st.wait)
        service.add(st.service)
    return {"queue_wait": wait.snapshot(), "service": service.snapshot()}
