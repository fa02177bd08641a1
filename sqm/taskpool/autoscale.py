"""Autoscaling a worker fleet (Celery's ``--autoscale MAX,MIN``) as a pure decision.

``Autoscaler.decide(now, current, pending, idle)`` says how many workers the
fleet should have. It grows quickly (messages waiting for ``up_after`` s: up
to one worker per waiting message, at most ``maximum``) and shrinks slowly
(some worker idle and nothing waiting for ``down_after`` s: one fewer, at
least ``minimum``), and never changes twice within ``cooldown`` s: the gap
between the two delays is the hysteresis that keeps a bursty queue from
making the fleet flap. No clock, no I/O: ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MAX,MIN"`` (Celery's order) -> ``(MAX, MIN)``; ValueError when malformed."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--autoscale takes MAX,MIN (e.g. 10,2), not {text!r}")
    high, low = int(parts[0]), int(parts[1])
    if high < 1 or low > high:
        raise ValueError(f"--autoscale needs 1 <= MAX and MIN <= MAX, not {text!r}")
    return high, low


@dataclass
class Autoscaler:
    maximum: int
    minimum: int = 0
    up_after: float = 0.5
    down_after: float = 10.0
    cooldown: float = 1.0
    _pending_since: float | None = None
    _idle_since: float | None = None
    _last_change: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.maximum or self.maximum < 1:
            raise ValueError("autoscale needs 0 <= minimum <= maximum and maximum >= 1")

    def decide(self, now: float, current: int, pending: int, idle: int) -> int:
        """The fleet size to have now, given its size, waiting messages and idle workers."""
        if current < self.minimum or current > self.maximum:
            return self._change(now, min(self.maximum, max(self.minimum, current)))
        if pending > 0:
            self._idle_since = None
            if self._pending_since is None:
                self._pending_since = now
            if (current < self.maximum and now - self._pending_since >= self.up_after
                    and self._cooled(now)):
                self._pending_since = now
                return self._change(now, min(self.maximum, current + pending))
            return current
        self._pending_since = None
        if idle <= 0:
            self._idle_since = None
            return current
        if self._idle_since is None:
            self._idle_since = now
        if current > self.minimum and now - self._idle_since >= self.down_after and self._cooled(now):
            self._idle_since = now
            return self._change(now, current - 1)
        return current

    def _cooled(self, now: float) -> bool:
        return self._last_change is None or now - self._last_change >= self.cooldown

    def _change(self, now: float, size: int) -> int:
        self._last_change = now
        return size
