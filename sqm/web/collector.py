"""A prometheus_client Collector that turns the broker's status snapshot into metrics.

The figures are read from ``snapshot()`` when Prometheus scrapes, never
counted per message, so metrics cost the broker's hot path nothing. Every
key is optional: a snapshot from an older broker simply yields fewer series.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Snapshot = Callable[[], Mapping[str, Mapping[str, Any]]]

# (metric name, status key, help). Counter names get "_total" from the library.
GAUGES = [
    ("sqm_pending_messages", "pending", "Messages waiting for a worker."),
    ("sqm_in_flight_messages", "in_flight", "Messages handed to a worker and not yet done."),
    ("sqm_scheduled_messages", "scheduled", "Messages held until their due time (delay, Retry)."),
    ("sqm_workers", "workers_current", "Workers registered now."),
    ("sqm_workers_ever", "workers_ever", "Distinct workers seen since sqm started."),
    ("sqm_uptime_seconds", "uptime_s", "Seconds since sqm started serving the queue."),
    ("sqm_utilization_ratio", "utilization", "Share of worker time spent busy (0..1)."),
    ("sqm_dead_letters", "dead_letters", "Dead letters kept now (see sqm dead list)."),
]
COUNTERS = [
    ("sqm_messages_assigned", "assigned_total", "Messages handed to a worker (redeliveries too)."),
    ("sqm_messages_completed", "completed_total", "Messages a worker finished successfully."),
    ("sqm_messages_failed", "failed_total", "Messages that ended in an error."),
    ("sqm_messages_expired", "expired_total", "Messages whose deadline passed while pending."),
    ("sqm_messages_rejected", "rejected_total", "Messages refused (queue full, too large)."),
    ("sqm_messages_redelivered", "redelivered_total", "Messages given to another worker after one died."),
    ("sqm_messages_malformed", "malformed_total", "Malformed inputs dropped."),
    ("sqm_sends_dropped", "send_dropped_total", "Frames sqm could not send (peer gone or slow)."),
    ("sqm_dispatch_batches", "dispatch_batches_total",
     "DISPATCHes that carried several messages (to batching workers)."),
    ("sqm_dispatch_batched_messages", "dispatch_batched_total",
     "Messages sent in those multi-message DISPATCHes."),
    ("sqm_messages_given_back", "nacked_total",
     "Messages a worker handed back unstarted (NACK, GIVE_BACK): they ran elsewhere."),
    ("sqm_reclaims", "reclaims_total",
     "Asks to a worker to give back the messages waiting behind its long callback."),
    ("sqm_messages_dead", "dead_total",
     "Messages dead-lettered since start (later dropped or purged ones included)."),
    ("sqm_denied", "denied_total", "Inputs refused because the peer's role forbids them."),
    ("sqm_messages_retried", "retried_total", "Retry requests granted (the message runs again later)."),
    ("sqm_messages_cancelled", "cancelled_total", "Messages cancelled by their sender or an operator."),
    ("sqm_messages_time_limited", "time_limited_total",
     "Messages failed back because they ran past their time limit."),
]
METHOD_GAUGES = [
    ("sqm_method_pending", "pending", "Messages of this method waiting for a worker."),
    ("sqm_method_workers", "workers", "Registered workers that serve this method."),
]
METHOD_COUNTERS = [
    ("sqm_method_messages_assigned", "assigned_total", "Messages of this method handed to a worker."),
    ("sqm_method_messages_completed", "completed_total", "Messages of this method finished."),
    ("sqm_method_messages_failed", "failed_total", "Messages of this method that ended in an error."),
]
HISTOGRAMS = [
    ("queue_wait_seconds", "queue_wait", "Seconds from arrival at sqm to dispatch."),
    ("service_seconds", "service", "Seconds from dispatch to the worker's done."),
]


class SqmCollector(Collector):
    """Reads ``snapshot()`` (``{queue: status_dict}``) once per scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: registering must not call ``snapshot()``."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        for name, key, doc in GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["queue"])
            for queue, st in snap.items():
                value = _num(st.get(key))
                if value is not None:
                    gauge.add_metric([queue], value)
            yield gauge
        busy = GaugeMetricFamily("sqm_workers_busy", "Workers holding at least one message.",
                                 labels=["queue"])
        for queue, st in snap.items():
            workers = st.get("workers")
            if isinstance(workers, list):
                busy.add_metric([queue], sum(1 for w in workers if w.get("state") == "busy"))
        yield busy
        for name, key, doc in COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["queue"])
            for queue, st in snap.items():
                value = _num(st.get(key))
                if value is not None:
                    counter.add_metric([queue], value)
            yield counter
        for suffix, key, doc in HISTOGRAMS:
            hist = HistogramMetricFamily(f"sqm_{suffix}", doc, labels=["queue"])
            for queue, st in snap.items():
                _add_histogram(hist, [queue], _get(st, "latency", key))
            yield hist
        yield from self._methods(snap)

    def _methods(self, snap: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        """The same figures per method, as separate families (so sums never double-count)."""
        per_queue: list[tuple[str, Mapping[str, Any]]] = []
        for q, st in snap.items():
            m = st.get("methods")
            if isinstance(m, Mapping) and m:
                per_queue.append((q, m))
        if not per_queue:
            return
        for name, key, doc in METHOD_COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["queue", "method"])
            for queue, methods in per_queue:
                for method, st in methods.items():
                    value = _num(st.get(key)) if isinstance(st, Mapping) else None
                    if value is not None:
                        counter.add_metric([queue, str(method)], value)
            yield counter
        for name, key, doc in METHOD_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["queue", "method"])
            for queue, methods in per_queue:
                for method, st in methods.items():
                    value = _num(st.get(key)) if isinstance(st, Mapping) else None
                    if value is not None:
                        gauge.add_metric([queue, str(method)], value)
            yield gauge
        for suffix, key, doc in HISTOGRAMS:
            hist = HistogramMetricFamily(f"sqm_method_{suffix}", doc, labels=["queue", "method"])
            for queue, methods in per_queue:
                for method, st in methods.items():
                    if isinstance(st, Mapping):
                        _add_histogram(hist, [queue, str(method)], _get(st, "latency", key))
            yield hist


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _num(v: Any) -> float | None:
    """A finite-or-infinite number, or None (bools and strings are not figures)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _le(v: Any) -> float | None:
    """A bucket bound: a number, or "+Inf"/"Infinity" as JSON has to spell it."""
    if isinstance(v, str):
        try:
            return float(v.replace("Inf", "inf"))
        except ValueError:
            return None
    return _num(v)


def _add_histogram(fam: HistogramMetricFamily, labels: list[str], h: Any) -> None:
    """Add H = {count, sum, buckets: [[le, cumulative], ...]}; a +Inf bucket is ensured."""
    if not isinstance(h, Mapping):
        return
    count, total = _num(h.get("count")), _num(h.get("sum"))
    if count is None:
        return
    bounds: list[tuple[float, float]] = []
    for pair in h.get("buckets") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            continue
        le, n = _le(pair[0]), _num(pair[1])
        if le is not None and n is not None and not math.isinf(le):
            bounds.append((le, n))
    buckets = [(floatToGoString(le), n) for le, n in sorted(bounds)]
    buckets.append(("+Inf", count))
    fam.add_metric(labels, buckets, total if total is not None else 0.0)
