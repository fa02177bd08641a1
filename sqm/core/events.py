"""What the core asks the I/O layer to do: the entries of :attr:`QueueCore.outbox`.

Each entry is a small :class:`~typing.NamedTuple`, read as cheaply as a
plain tuple (the hot path builds :class:`Dispatch` with ``tuple.__new__``,
skipping NamedTuple's Python-level constructor). The I/O loop dispatches on
``type(entry)``; :data:`KINDS` maps each class to its historical ``OUT_*``
number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .queue import Message

OUT_DISPATCH = 1
OUT_FAIL = 2
OUT_HEARTBEAT = 3
OUT_BYE = 4
OUT_STOP = 5
OUT_ENDED = 6
OUT_CANCEL = 7
OUT_WATCH = 8
OUT_RECLAIM = 9

# Outcomes carried by Ended besides a Fail's error type.
COMPLETED = "completed"  # the worker replied with a result
FAILED = "failed"  # the worker replied with an error (DONE_FAILED)


class Dispatch(NamedTuple):
    """Send ``msg`` to worker ``rid``."""

    rid: bytes
    msg: Message


class Fail(NamedTuple):
    """Tell ``msg``'s originator it failed: ``error`` type and a ``text`` saying why."""

    msg: Message
    error: str
    text: str


class Heartbeat(NamedTuple):
    """Tell worker ``rid`` sqm is alive (it has heard nothing from us for a while)."""

    rid: bytes


class Watch(NamedTuple):
    """Tell worker ``rid`` sqm watches its connection: no more heartbeats from sqm; it
    reports on itself at least every ``WorkerState.report_s`` (see :mod:`sqm.liveness`)."""

    rid: bytes


class Bye(NamedTuple):
    """Tell worker ``rid`` to (re-)register, or that sqm stops sending it work."""

    rid: bytes


class Stop(NamedTuple):
    """An operator asked worker ``rid`` to finish what it holds and exit."""

    rid: bytes


class Cancel(NamedTuple):
    """Tell worker ``rid`` its sender cancelled ``msg`` (``originator.cancelled``)."""

    rid: bytes
    msg: Message


class Reclaim(NamedTuple):
    """Ask worker ``wid`` (on ``rid``, its heartbeat connection) to give back the
    messages waiting behind its callback: it holds more than it runs at once and
    has ended nothing for :attr:`QueueCore.reclaim_after` seconds."""

    rid: bytes
    wid: str


class Ended(NamedTuple):
    """An accepted message has ended, exactly once: how is ``outcome``.

    ``outcome`` is :data:`COMPLETED`, :data:`FAILED` (the worker's error
    reply) or the error type of the :class:`Fail` sent back (``Expired``,
    ``WorkerLost``, ``Purged``, ``BrokerShutdown``). Emitted only while
    :attr:`QueueCore.track_ends` is set, so it costs nothing unless a
    plugin listens for it.
    """

    msg: Message
    outcome: str


OutboxEntry = Dispatch | Fail | Heartbeat | Watch | Bye | Stop | Ended | Cancel | Reclaim

KINDS: dict[type, int] = {
    Dispatch: OUT_DISPATCH,
    Fail: OUT_FAIL,
    Heartbeat: OUT_HEARTBEAT,
    Bye: OUT_BYE,
    Stop: OUT_STOP,
    Ended: OUT_ENDED,
    Cancel: OUT_CANCEL,
    Watch: OUT_WATCH,
    Reclaim: OUT_RECLAIM,
}


def as_tuple(entry: OutboxEntry) -> tuple[object, ...]:
    """``entry`` in the historical ``(OUT_*, fields...)`` shape (tests, debugging)."""
    return (KINDS[type(entry)], *entry)
