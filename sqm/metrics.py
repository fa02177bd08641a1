"""Latency histograms and per-method counters for the broker core.

Pure bookkeeping (no clock, no I/O): the core records durations it already
computed from the ``now`` it was given. Buckets are fixed (a 1-2-5 series
from 10 µs to 100 s), so recording is one ``bisect`` and one list increment,
and the same buckets feed Prometheus histograms without conversion.
Percentiles are estimated by linear interpolation inside the bucket that
holds them: exact to within one bucket, which is what an operator needs.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

BOUNDS: tuple[float, ...] = tuple(
    m * 10.0**e for e in range(-5, 3) for m in (1, 2, 5) if m * 10.0**e <= 100.0
)  # 1e-05 ... 100.0, 22 upper bounds; one more bucket catches everything above
INF = float("inf")


class Histogram:
    """Counts of durations (seconds) per fixed bucket, plus their sum.

    The total count is derived from the buckets when read, so recording
    touches two fields only (the core inlines :meth:`record` on its hot path).
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def record(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds

    def add(self, other: Histogram) -> None:
        """Fold ``other`` into this one (a queue's total from its methods)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1), interpolated within its bucket; 0.0 when empty."""
        count = self.count
        if not count:
            return 0.0
        rank = q * count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                lo = BOUNDS[i - 1] if i > 0 else 0.0
                hi = BOUNDS[i] if i < len(BOUNDS) else lo * 2
                return lo + (hi - lo) * max(0.0, rank - seen) / n
            seen += n
        return BOUNDS[-1]

    def snapshot(self) -> dict[str, Any]:
        """``count``, ``sum``, ``p50``/``p90``/``p99`` (s) and cumulative ``buckets``."""
        cumulative = []
        running = 0
        for bound, n in zip(BOUNDS + (INF,), self.counts, strict=True):
            running += n
            cumulative.append([bound, running])
        return {
            "count": self.count,
            "sum": self.sum,
            "p50": self.quantile(0.50),
            "p90": self.quantile(0.90),
            "p99": self.quantile(0.99),
            "buckets": cumulative,
        }


class MethodStats:
    """What one method (or the whole queue) has been through."""

    __slots__ = ("assigned", "completed", "failed", "wait", "service")

    def __init__(self) -> None:
        self.assigned = 0
        self.completed = 0
        self.failed = 0
        self.wait = Histogram()
        self.service = Histogram()

    def snapshot(self) -> dict[str, Any]:
        return {
            "assigned_total": self.assigned,
            "completed_total": self.completed,
            "failed_total": self.failed,
            "latency": {"queue_wait": self.wait.snapshot(), "service": self.service.snapshot()},
        }
