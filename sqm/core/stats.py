"""The queue's figures (``sqm status --json``, the metrics snapshot), read from a core.

Built on demand from :class:`~sqm.core.queue.QueueCore`'s counters, never on
the hot path: the core only counts, this module turns counts into a report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..metrics import Histogram
from .workers import READY

if TYPE_CHECKING:
    from .queue import QueueCore
    from .workers import WorkerState


def worker_label(w: WorkerState) -> str:
    """The state ``status`` shows: leaving (asked to stop, or said bye), busy or idle."""
    if w.state != READY:
        return "leaving"
    return "busy" if w.in_flight else "idle"


def worker_status(w: WorkerState, now: float) -> dict[str, Any]:
    """One worker's row in ``status()["workers"]``."""
    w_busy = w.busy_s + (now - w.busy_since if w.in_flight else 0.0)
    info = w.info
    rep = w.report
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
        "parked": w.parked,
        # busy_s: the worker's own count (time inside callbacks) when
        # it reports one, else what sqm saw (time holding messages).
        "busy_s": round(float(rep.get("busy_s", w_busy)), 6),
        "utilization": min(1.0, w_busy / lived) if lived > 0 else 0.0,
        "rss_bytes": rep.get("rss_bytes"),
        "nice": rep.get("nice"),
        "worker_tasks_done": rep.get("tasks_done"),
        "last_report_at": rep.get("at"),
    }


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
        "utilization": min(1.0, busy / lifetime) if lifetime > 0 else 0.0,
        "draining": not core.dispatching,
        "max_pending": core.max_pending,
        "latency": latency_total(core),
        "methods": {m.decode("utf-8", "replace"): st.snapshot() for m, st in core.methods.items()},
    }


def latency_total(core: QueueCore) -> dict[str, Any]:
    """Queue-wide histograms: the sum of the per-method ones (recorded once)."""
    wait, service = Histogram(), Histogram()
    for st in core.methods.values():
        wait.add(st.wait)
        service.add(st.service)
    return {"queue_wait": wait.snapshot(), "service": service.snapshot()}
