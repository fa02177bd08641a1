"""A registered worker connection and its bookkeeping, with an explicit state table.

A worker's life is a few states with fixed moves between them (the table
below). Only :meth:`WorkerState.move` changes the state, so an impossible
move (a dead worker coming back, a leaving one being asked to stop) fails
loudly instead of leaving two flags that disagree.

The dispatch hot path never reads the state: a worker that cannot take work
(leaving or gone) has ``free == 0``, and that single check also makes its
stale entries in the queue's idle-slot deque harmless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .methods import MethodQueue
    from .queue import Message

READY = 0  # takes work while it has free slots
STOPPING = 1  # an operator asked it to exit (STOP sent); still takes work until its BYE
LEAVING = 2  # it said BYE: no new work, it finishes what it holds
GONE = 3  # removed: left, dead (silent), or re-registered
# Its connection closed (or a dispatch to it could not be sent): no new work,
# but what it holds stays in flight, so a live worker that reconnects and says
# HELLO again re-runs nothing. Removed if silent, or not back, for its ttl.
DETACHED = 4

STATE_NAMES = {READY: "ready", STOPPING: "stopping", LEAVING: "leaving", GONE: "gone",
               DETACHED: "detached"}

#: A watched worker sends its self-report (the heartbeat's 4th frame) every
#: this many heartbeats; the beats in between are bare (sqm.liveness).
REPORT_EVERY = 30.0

# state -> the states it may move to
MOVES: dict[int, frozenset[int]] = {
    READY: frozenset({STOPPING, LEAVING, GONE, DETACHED}),
    STOPPING: frozenset({STOPPING, LEAVING, GONE, DETACHED}),
    LEAVING: frozenset({LEAVING, GONE}),  # a repeated BYE changes nothing
    GONE: frozenset(),
    DETACHED: frozenset({READY, LEAVING, GONE, DETACHED}),  # READY: it said HELLO again
}


def concurrency_of(info: dict[str, Any]) -> int:
    """How many messages a worker runs at once, from its HELLO (1 if it does not say)."""
    conc = info.get("concurrency")
    return conc if isinstance(conc, int) and not isinstance(conc, bool) and conc >= 1 else 1


def beat_id_of(info: dict[str, Any]) -> bytes:
    """The routing id of its heartbeat socket, from its HELLO's ``beat_id`` (hex); b"" if none."""
    bid = info.get("beat_id")
    if isinstance(bid, str) and 0 < len(bid) <= 510:
        try:
            return bytes.fromhex(bid)
        except ValueError:
            pass
    return b""


class WorkerState:
    """A registered worker connection and its bookkeeping."""

    __slots__ = (
        "rid",
        "id",
        "info",
        "slots",
        "free",
        "in_flight",
        "registered_at",
        "heard_at",
        "last_sent",
        "idle_since",
        "busy_since",
        "busy_s",
        "tasks_done",
        "state",
        "ttl",
        "detached_at",
        "watched",
        "report_s",
        "parked",
        "report",
        "report_at",
        "methods",
        "queues",
        "abandoned",
        "time_limit",
        "batch",
        "compact",
        "concurrency",
        "done_at",
        "watch_at",
        "asked_at",
        "prefetches",
        "beat_rid",
    )

    def __init__(self, rid: bytes, wid: str, info: dict[str, Any], slots: int, now: float) -> None:
        self.rid = rid
        self.id = wid
        self.info = info
        self.slots = slots
        self.free = slots
        self.in_flight: dict[bytes, Message] = {}
        self.registered_at = now
        self.heard_at = now  # when its last traffic (any command, a heartbeat) arrived
        self.last_sent = now
        self.idle_since = now
        self.busy_since = 0.0
        self.busy_s = 0.0
        self.tasks_done = 0
        self.state = READY
        # Seconds of silence after which it is dead (idle or busy, watched or
        # not); also how long it may stay DETACHED before it must be back.
        self.ttl = 3.0
        self.detached_at = 0.0
        # sqm watches its connection (sqm.liveness): it gets no heartbeats
        # from sqm, and sends its self-report only every ``report_s``.
        self.watched = False
        self.report_s = 0.0
        self.parked = 0  # slots the worker handed back with NACK (it was full)
        # Its latest self-report, as it came (JSON): decoded only when a
        # status asks, so a heartbeat costs sqm no parse.
        self.report = b""
        self.report_at = 0.0
        # What it advertised (None: it named none, so it serves every method)
        # and the method queues it takes work from (empty when it serves all).
        self.methods: tuple[bytes, ...] | None = None
        self.queues: list[MethodQueue] = []
        # Messages sqm gave up on (time limit, cancel) that the worker still
        # runs: each keeps its slot taken until the worker reports the end.
        self.abandoned: dict[bytes, Message] = {}
        # sqm may send it several messages in one DISPATCH: it says it reads them
        # (HELLO ``batch``; older workers don't) and it has more than one slot.
        self.batch = slots > 1 and info.get("batch") is True
        # It reads compact DISPATCHes (HELLO ``compact``): the I/O layer sends it
        # compact SUBMITs as they came (docs/PROTOCOL.md).
        self.compact = info.get("compact") is True
        # How many it runs at once: what it holds beyond that waits its turn there.
        self.concurrency = concurrency_of(info)
        self.done_at = now  # when it last ended a message (DONE): it moves
        # It may hold more than it runs at once (prefetch): sqm watches that it
        # moves while it is busy (prefetch reclaim); when it checks next (0: no
        # check due); when sqm last asked it to give back.
        self.prefetches = slots > self.concurrency
        self.watch_at = 0.0
        self.asked_at = 0.0
        # The connection its heartbeats come from (its process's heartbeat
        # thread, which answers a reclaim while a callback runs): named by its
        # HELLO (``beat_id``), else learnt from its beats; b"" until then.
        self.beat_rid = beat_id_of(info)
        own = info.get("time_limit")  # Worker(time_limit=): its own limit per callback
        self.time_limit = (float(own) if isinstance(own, (int, float)) and 0 < own < 1e9
                           else 0.0)

    def move(self, to: int) -> None:
        """Change state along :data:`MOVES`; a worker that cannot take work gets no free slot."""
        if to not in MOVES[self.state]:
            raise AssertionError(
                f"worker {self.id}: cannot move from {STATE_NAMES[self.state]} to {STATE_NAMES[to]}"
            )
        self.state = to
        if to >= LEAVING:
            self.free = 0  # its entries in the idle deque become stale

    # Read-only views of the state, for checks and tests (the hot path reads ``free``).

    @property
    def alive(self) -> bool:
        return self.state != GONE

    @property
    def leaving(self) -> bool:
        return self.state == LEAVING

    @property
    def stopping(self) -> bool:
        return self.state == STOPPING

    @property
    def detached(self) -> bool:
        return self.state == DETACHED
