"""Routing by method: one :class:`MethodQueue` per method name a queue knows.

Workers advertise the methods they serve (HELLO, then ABILITIES whenever
their callbacks change). The core keeps, per method, the pending messages
(FIFO per priority level) and the free slots of the workers that serve it
(longest idle first). A worker that serves several methods finds the
oldest message it can take by comparing the heads of its methods' levels
(``(level, seq)``: a small merge over its own methods, never a scan of all
pending messages); a new message finds its worker in its method's idle
deque, never by a scan of all workers.

A worker that advertises nothing (an older client) serves every method: its
free slots sit in the queue-wide idle deque and it takes the oldest pending
message over the methods that have some (see :class:`~sqm.core.queue.QueueCore`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .queue import Message
    from .workers import WorkerState

LEVELS = 3  # high, normal, low
PENDING = 0  # Message.state of a pending message (see sqm.core.queue)
MAX_ADVERTISED = 10_000  # methods one worker may advertise
MAX_METHOD = 256  # bytes of a method name (as in the envelope)


class MethodQueue:
    """One method's pending messages and the free slots of the workers serving it.

    ``idle`` holds one entry per free slot, pushed when the slot became
    free; an entry whose worker has no free slot any more (it took work
    through another of its methods, or left) is stale and skipped.
    """

    __slots__ = ("name", "levels", "pending", "idle", "workers", "slots")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.levels: list[deque[Message]] = [deque() for _ in range(LEVELS)]
        self.pending = 0
        self.idle: deque[WorkerState] = deque()
        self.workers = 0  # registered workers that advertise this method
        self.slots = 0  # their slots: bounds the idle deque (stale entries)

    def park(self, w: WorkerState) -> None:
        """Add a free slot of ``w``; drop stale entries once they outnumber the slots."""
        idle = self.idle
        idle.append(w)
        if len(idle) > 2 * self.slots + 8:
            self.compact()

    def compact(self) -> None:
        """Keep at most ``w.free`` entries per worker, the oldest, in order."""
        seen: dict[WorkerState, int] = {}
        keep: deque[WorkerState] = deque()
        for w in self.idle:
            n = seen.get(w, 0)
            if n < w.free:
                seen[w] = n + 1
                keep.append(w)
        self.idle = keep

    def forget(self, w: WorkerState) -> None:
        """Remove every idle entry of ``w`` (it no longer serves this method)."""
        if w in self.idle:
            self.idle = deque(x for x in self.idle if x is not w)

    def head(self) -> tuple[int, int] | None:
        """``(level, seq)`` of the oldest live pending message of the highest level, or None."""
        for lvl, level in enumerate(self.levels):
            while level and level[0].state != PENDING:
                level.popleft()  # taken elsewhere (cancelled, expired, purged)
            if level:
                return lvl, level[0].seq
        return None


def read_methods(info: dict[str, Any]) -> tuple[bytes, ...] | None:
    """The methods a HELLO or ABILITIES body advertises; None when it names none.

    None means "serves every method" (a worker from before abilities). Names
    that are not strings, empty or too long are ignored.
    """
    raw = info.get("methods")
    if not isinstance(raw, list):
        return None
    names: dict[bytes, None] = {}
    for name in raw[:MAX_ADVERTISED]:
        if isinstance(name, str):
            b = name.encode("utf-8", "replace")
            if 0 < len(b) <= MAX_METHOD:
                names[b] = None
    return tuple(names)
