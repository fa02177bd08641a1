"""The broker's decisions, with no sockets and no clock (see :mod:`sqm.core.queue`).

- :mod:`~sqm.core.queue`: :class:`QueueCore` (pending levels, dispatch) and :class:`Message`;
- :mod:`~sqm.core.workers`: :class:`WorkerState` and its state table;
- :mod:`~sqm.core.events`: the outbox entries (:class:`Dispatch`, :class:`Fail`, ...);
- :mod:`~sqm.core.stats`: ``status()`` figures built from a core.
"""

from __future__ import annotations

from .events import (
    COMPLETED,
    FAILED,
    OUT_BYE,
    OUT_DISPATCH,
    OUT_ENDED,
    OUT_FAIL,
    OUT_HEARTBEAT,
    OUT_RECLAIM,
    OUT_STOP,
    OUT_WATCH,
    Bye,
    Cancel,
    Dispatch,
    Ended,
    Fail,
    Heartbeat,
    OutboxEntry,
    Reclaim,
    Stop,
    Watch,
    as_tuple,
)
from .queue import FINISHED, INFLIGHT, LEVELS, PENDING, SCHEDULED, Message, QueueCore
from .workers import GONE, LEAVING, READY, STOPPING, WorkerState

__all__ = [
    "COMPLETED",
    "FAILED",
    "FINISHED",
    "GONE",
    "INFLIGHT",
    "LEAVING",
    "LEVELS",
    "OUT_BYE",
    "OUT_DISPATCH",
    "OUT_ENDED",
    "OUT_FAIL",
    "OUT_HEARTBEAT",
    "OUT_STOP",
    "OUT_RECLAIM",
    "OUT_WATCH",
    "PENDING",
    "SCHEDULED",
    "READY",
    "STOPPING",
    "Bye",
    "Cancel",
    "Dispatch",
    "Ended",
    "Fail",
    "Heartbeat",
    "Message",
    "OutboxEntry",
    "QueueCore",
    "Stop",
    "Reclaim",
    "Watch",
    "WorkerState",
    "as_tuple",
]
