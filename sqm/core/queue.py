"""The broker's decisions, with no sockets and no clock.

:class:`QueueCore` holds one queue's pending messages (FIFO per priority
and method, :mod:`sqm.core.methods`), its workers' free slots (longest idle
first, per method they serve), in-flight assignments and worker liveness. Every method takes ``now`` (unix seconds) as an argument;
what the broker must send is appended to :attr:`QueueCore.outbox` as typed
entries (:mod:`sqm.core.events`), which the I/O loop (:mod:`sqm.broker`)
sends after each batch of input. That split lets tests drive thousands of random event sequences in
milliseconds (see tests/unit/sqm/test_properties.py).

Invariants kept after every public call:

- a message is in flight on at most one live worker, one that serves its
  method (or advertised none: it serves every method);
- no worker has a free slot while a message it can serve is pending;
- within a priority level, the message of a method dispatched is always the
  oldest one of that method pending (by submission order, redeliveries
  included); a worker takes the highest level first over its methods;
- every accepted message ends exactly once: completed by a worker
  (:meth:`done`) or failed back to its originator (a :class:`Fail` entry);
  with :attr:`QueueCore.track_ends` set, each accepted message also gets
  exactly one :class:`Ended` entry.

Draining (an operator's "stop dispatching") is one state of the queue,
checked in two places only: the admission fast path and
:meth:`QueueCore._take`, through which every other dispatch passes.
"""

from __future__ import annotations

import bisect
import heapq
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from typing import Any

from ..metrics import BOUNDS, MethodStats
from ..protocol import RECLAIM_AFTER_S
from .events import (
    COMPLETED,
    FAILED,
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
)
from .methods import LEVELS, PENDING, MethodQueue, read_methods
from .stats import queue_status
from .workers import (
    DETACHED,
    GONE,
    LEAVING,
    READY,
    REPORT_EVERY,
    STOPPING,
    WorkerState,
    beat_id_of,
    concurrency_of,
)

_new_tuple = tuple.__new__  # builds a Dispatch without NamedTuple.__new__'s Python frame

MAX_METHODS = 1000  # distinct method names tracked; the rest count as OTHER_METHOD
OTHER_METHOD = b"(other)"

INFLIGHT, FINISHED = 1, 2
SCHEDULED = 3  # accepted, held until its due time (delay=, not_before=, a Retry)
NEVER = float("inf")
TIME_LIMIT = "TimeLimitExceeded"
RETRIES_EXHAUSTED = "RetriesExhausted"
CANCELLED = "Cancelled"
UNADMITTED = MethodStats()  # placeholder stats of a message not admitted; never reported
UNKNOWN_METHOD = "UnknownMethod"
# What a method nobody serves and nothing pends for looks like to submit's
# fast path (read only): no dict entry is made for a message dispatched at once.
NO_QUEUE = MethodQueue(b"")



def _slots(info: dict[str, Any]) -> int:
    """The slots a worker's HELLO announces (1 when missing or out of range)."""
    slots = info.get("slots", 1)
    return slots if isinstance(slots, int) and 1 <= slots <= 10_000 else 1

class Message:
    """One submitted message, as the broker tracks it.

    ``frames`` is opaque to the core: the I/O layer keeps the received frame
    list there so a dispatch forwards it without re-encoding.
    """

    __slots__ = (
        "id",
        "origin",
        "frames",
        "size",
        "oneway",
        "retries",
        "priority",
        "deadline",
        "submitted_at",
        "seq",
        "deliveries",
        "worker",
        "state",
        "method",
        "stats",
        "dispatched_at",
        "not_before",
        "time_limit",
        "attempts",
    )

    def __init__(
        self,
        id: bytes,  # noqa: A002
        origin: bytes,
        frames: Any = None,
        *,
        size: int = 0,
        oneway: bool = False,
        retries: int = 0,
        priority: int = 1,
        deadline: float = 0.0,
        method: bytes = b"",
        not_before: float = 0.0,
        time_limit: float = 0.0,
        attempts: int = 0,
    ) -> None:
        self.id = id
        self.origin = origin
        self.frames = frames
        self.size = size
        self.oneway = oneway
        self.retries = retries
        self.priority = priority if 0 <= priority < LEVELS else 1
        self.deadline = deadline
        self.submitted_at = 0.0
        self.seq = 0
        self.deliveries = 0
        self.worker: WorkerState | None = None
        self.state = PENDING
        self.method = method
        self.stats = UNADMITTED  # its method's stats once the core admits it
        self.dispatched_at = 0.0
        self.not_before = not_before  # unix s; dispatched no earlier (0: at once)
        self.time_limit = time_limit  # s a dispatch may run before sqm fails it (0: none)
        self.attempts = attempts  # Retry rounds done so far (worker-requested re-runs)

    def __repr__(self) -> str:
        return f"<Message {self.id!r} seq={self.seq} state={self.state}>"


class QueueCore:
    """One queue's state machine. Not thread-safe; owned by one I/O loop.

    ``hold_unknown`` (``sqm serve --hold-unknown``): a message whose method
    no registered worker serves waits for one (until its deadline) instead
    of failing at once with ``UnknownMethod``.
    """

    def __init__(
        self,
        name: str,
        now: float,
        *,
        heartbeat: float = 1.0,
        liveness: int = 3,
        max_pending: int = 100_000,
        max_message_size: int = 64 * 1024 * 1024,
        max_deliveries: int | None = None,
        hold_unknown: bool = False,
        report_every: float = REPORT_EVERY,
    ) -> None:
        self.name = name
        self.started_at = now
        self.heartbeat = heartbeat
        self.liveness = liveness
        # A watched worker sends its self-report every report_every heartbeats.
        self.report_every = report_every
        self.watched = 0  # registered workers whose connection is watched (no heartbeats)
        # Workers whose connection closed, until they say HELLO again or are removed.
        self._detached: dict[bytes, WorkerState] = {}
        # No worker can be dead before this: ticks before it skip the walk over them.
        self._expiry_at = NEVER
        self.max_pending = max_pending
        self.max_message_size = max_message_size
        self.max_deliveries = max_deliveries
        self.hold_unknown = hold_unknown
        self.outbox: list[OutboxEntry] = []
        # Set by the server when a plugin listens for ends (the journal):
        # each accepted message then gets one Ended entry when it ends.
        self.track_ends = False
        self.pending = 0
        self.in_flight = 0
        self._live: dict[bytes, Message] = {}  # accepted, not ended
        self._seq = 0
        # Per method: pending messages and free slots of the workers serving it.
        self._mq: dict[bytes, MethodQueue] = {}
        self._waiting: dict[MethodQueue, None] = {}  # the method queues with pending messages
        # Free slots of workers that serve every method (advertised none).
        self._idle: deque[WorkerState] = deque()
        self._universal = 0  # registered workers that serve every method
        self.workers: dict[bytes, WorkerState] = {}
        self._by_id: dict[str, WorkerState] = {}
        self.ever: set[str] = set()  # ids of every worker seen since start
        #: Workers :meth:`tick` removed as dead: (id, seconds silent or detached,
        #: messages held, silent rather than detached): the I/O layer logs and clears them.
        self.expired: list[tuple[str, float, int, bool]] = []
        self.dead_busy_s = 0.0  # busy and lifetime seconds of removed workers
        self.dead_lifetime_s = 0.0
        self._last_sweep = now
        self.assigned_total = 0
        self.completed_total = 0
        self.failed_total = 0
        self.expired_total = 0
        self.rejected_total = 0
        self.redelivered_total = 0
        self.malformed_total = 0
        self.nacked_total = 0
        self.unknown_total = 0  # refused as UnknownMethod (also in failed_total)
        self.forwarded_total = 0  # chain steps handed on by a worker (worker.forward)
        self.dispatching = True  # False while drained by an operator
        self.methods: dict[bytes, MethodStats] = {}
        # Timers (heaps, never scanned): held messages by due time, running
        # ones by time limit. Stale entries (cancelled, ended) are skipped
        # when they come up. ``timer_at`` is the earliest entry (the loop's wake-up).
        self.scheduled = 0
        self._due: list[tuple[float, int, Message]] = []
        self._limits: list[tuple[float, int, Message, float]] = []
        # Busy workers with room for more, by when sqm checks they still end
        # messages (prefetch reclaim; one live entry per worker at most).
        self._stalls: list[tuple[float, int, WorkerState]] = []
        #: Seconds a busy worker with room for more may go without ending a
        #: message before sqm asks it to give back what waits behind its
        #: callback and park its free slots (:class:`Reclaim`).
        self.reclaim_after = RECLAIM_AFTER_S
        self.reclaims_total = 0  # Reclaim asks sent
        self.timer_at = NEVER
        self._timer_n = 0  # tie-breaker of heap entries
        self.retried_total = 0
        self.cancelled_total = 0
        self.time_limited_total = 0

    # ------------------------------------------------------------------ senders

    def submit(self, now: float, msg: Message) -> bool:
        """Accept a message (or refuse it at once) and dispatch what can be.

        Returns True when the message is accepted (the originator may be told
        so), including a re-send of a message this originator already has
        here (senders re-send what sqm had not acknowledged after a
        reconnect); False when it was refused with a :class:`Fail` entry.
        """
        known = self._live.get(msg.id)
        if known is not None:
            if known.origin == msg.origin:
                return True  # a re-send: acknowledge again, keep one copy
            self.malformed_total += 1
            self.outbox.append(Fail(msg, "Malformed", "message id already in use"))
            return False
        if msg.size > self.max_message_size:
            self.rejected_total += 1
            self.outbox.append(
                Fail(
                    msg,
                    "MessageTooLarge",
                    f"payload of {msg.size} bytes exceeds this queue's limit of "
                    f"{self.max_message_size} bytes",
                )
            )
            return False
        if msg.deadline and msg.deadline <= now:
            self.expired_total += 1
            self.outbox.append(Fail(msg, "Expired", "deadline passed before sqm got it"))
            return False
        mq = self._mq.get(msg.method, NO_QUEUE)
        if not mq.workers and not self._universal and self.workers and not self.hold_unknown:
            self._refuse_unknown(msg)
            return False
        stats = self.methods.get(msg.method)
        if stats is None:
            stats = self._method_stats(msg.method)
        msg.stats = stats
        if msg.not_before and msg.not_before > now:
            return self._hold(now, msg)
        if not mq.pending and self.dispatching and (mq.idle or self._idle):
            # Fast path: a free slot and nothing of this method queued ahead.
            own = mq.idle
            w: WorkerState | None
            if own and not self._idle:  # only specialised workers: the usual case
                head = own.popleft()
                while head.free <= 0 and own:  # stale: took work elsewhere, or left
                    head = own.popleft()
                w = head if head.free > 0 else None
            else:
                w = self._idle_worker(mq)
            if w is not None:
                # _dispatch, inlined and specialised for the hot path: the
                # message waited 0 s (the first bucket of the wait histogram).
                self._seq += 1
                mid = msg.id
                msg.seq = self._seq
                msg.submitted_at = msg.dispatched_at = now
                self._live[mid] = msg
                if msg.time_limit or w.time_limit:
                    self._limit(msg, w)
                msg.state = INFLIGHT
                msg.worker = w
                msg.deliveries += 1
                stats.assigned += 1
                stats.wait.counts[0] += 1
                if not w.in_flight:
                    w.busy_since = now
                w.in_flight[mid] = msg
                if (len(w.in_flight) >= w.concurrency and w.prefetches and not w.watch_at
                        and len(self.workers) > 1):
                    self._watch(w, now + self.reclaim_after)  # busy, with room for more: watch
                w.free -= 1
                w.last_sent = now
                self.in_flight += 1
                self.assigned_total += 1
                self.outbox.append(_new_tuple(Dispatch, (w.rid, msg)))
                return True
        if self.pending >= self.max_pending:
            self.rejected_total += 1
            self.outbox.append(
                Fail(msg, "QueueFull", f"queue {self.name!r} has {self.pending} pending")
            )
            return False
        self._seq += 1
        msg.seq = self._seq
        msg.submitted_at = now
        self._live[msg.id] = msg
        if mq is NO_QUEUE:
            mq = self._method_queue(msg.method)
        mq.levels[msg.priority].append(msg)  # _enqueue, inlined
        if not mq.pending:
            self._waiting[mq] = None
        mq.pending += 1
        self.pending += 1
        if mq.idle or self._idle:
            self._place(now, mq)
        return True

    def _refuse_unknown(self, msg: Message) -> None:
        self.failed_total += 1
        self.unknown_total += 1
        self.outbox.append(
            Fail(
                msg,
                UNKNOWN_METHOD,
                f"no worker of queue {self.name!r} serves method "
                f"{msg.method.decode('utf-8', 'replace')!r}",
            )
        )

    def _method_stats(self, method: bytes) -> MethodStats:
        if len(self.methods) >= MAX_METHODS:
            method = OTHER_METHOD
        stats = self.methods.get(method)
        if stats is None:
            stats = self.methods[method] = MethodStats()
        return stats

    def restore(self, now: float, msg: Message) -> None:
        """Queue a message recovered from the journal (accepted before a restart).

        It skips the admission checks (it was admitted once) but not expiry:
        an expired one is failed back at dispatch or by the sweep.
        """
        if msg.id in self._live:
            return
        msg.stats = self.methods.get(msg.method) or self._method_stats(msg.method)
        self._seq += 1
        msg.seq = self._seq
        msg.submitted_at = now
        self._live[msg.id] = msg
        if msg.not_before > now:
            self._hold_admitted(now, msg)
            return
        mq = self._method_queue(msg.method)
        self._enqueue(mq, msg)
        if mq.idle or self._idle:
            self._place(now, mq)

    def forward(self, now: float, rid: bytes, msg_id: bytes, frames: Any, *, method: bytes,
                size: int, priority: int) -> Message | None:
        """Worker ``rid`` hands its message ``msg_id`` on to ``method`` (a chain step).

        The step ends (its slot is freed) and the message is admitted again
        with the same id, originator, deadline and remaining retries, as a
        fresh message of ``method`` carrying ``frames``. Returns the new
        message, or None when the worker does not hold ``msg_id`` (nothing
        happens). Refusals (expired, unknown method, queue full) fail back to
        the original caller like any message.
        """
        w = self.workers.get(rid)
        if w is None:
            return None
        old = w.in_flight.get(msg_id)
        if old is None:
            return None
        nxt = Message(
            msg_id,
            old.origin,
            frames,
            size=size,
            oneway=old.oneway,
            retries=old.retries,
            priority=priority,
            deadline=old.deadline,
            method=method,
        )
        # The step ends (not the message: no Ended, not completed)...
        del w.in_flight[msg_id]
        old.state = FINISHED
        del self._live[msg_id]
        self.in_flight -= 1
        self.forwarded_total += 1
        w.tasks_done += 1
        h = old.stats.service
        d = now - old.dispatched_at
        h.counts[bisect_left(BOUNDS, d)] += 1
        h.sum += d
        if not w.in_flight:
            w.busy_s += now - w.busy_since
            w.idle_since = now
        # ...the next one queues before the slot is freed, so that slot may take it.
        if not self.submit(now, nxt) and self.track_ends:
            refusal = self.outbox[-1]
            if type(refusal) is Fail:
                self.outbox.append(Ended(nxt, refusal.error))
        if w.state >= LEAVING:
            self._ended_off_duty(now, w)
        elif w.methods is None:
            w.free += 1
            taken = self._take(now, w) if self.pending else None
            if taken is None:
                self._idle.append(w)
            else:
                self._dispatch(now, w, taken)
        else:
            self._freed(now, w)
        return nxt

    # ------------------------------------------------------------------ workers

    def hello(self, now: float, rid: bytes, info: dict[str, Any], *,
              watchable: bool = False) -> WorkerState:
        """Register a worker connection (again) with ``info['slots']`` free slots.

        ``info['methods']`` lists the methods it serves; without it the
        worker serves every method. ``watchable``: the I/O layer will say
        when this connection closes (:meth:`gone`); a worker that asks for
        it (``info['watch']``) is then watched instead of heartbeated. A
        worker detached by a closed connection that says HELLO again is
        back: what it holds stays in flight (nothing is run twice).
        """
        old = self.workers.get(rid)
        if old is not None:
            if old.state == READY or old.state == DETACHED:
                return self._hello_again(now, old, info, watchable)
            # A leaving or stopping worker starts afresh: what it held is lost.
            self._remove_worker(now, old, "worker re-registered while holding it")
        slots = _slots(info)
        wid = str(info.get("id") or rid.hex())
        w = WorkerState(rid, wid, info, slots, now)
        self._set_liveness(now, w, info, watchable)
        self.workers[rid] = w
        self._by_id[wid] = w
        self.ever.add(wid)
        if len(self.workers) == 2:  # no longer alone: the first is watched if busy
            for v in self.workers.values():
                self._watch_if_busy(now, v)
        self._serve(w, read_methods(info))
        w.free = 0
        self._offer(now, w, slots)
        return w

    def _watch_if_busy(self, now: float, w: WorkerState) -> None:
        """Watch ``w`` if it is busy with room for more and not alone (what
        :meth:`_dispatch` checks inline, for the paths that change it otherwise)."""
        if (len(w.in_flight) >= w.concurrency and w.prefetches and not w.watch_at
                and (w.state == READY or w.state == STOPPING) and len(self.workers) > 1):
            self._watch(w, now + self.reclaim_after)

    def _hello_again(self, now: float, w: WorkerState, info: dict[str, Any],
                     watchable: bool) -> WorkerState:
        """A registered worker said HELLO again: it reconnected, or answered a
        BYE meant for traffic it queued while we were away (one per DONE or
        beat). It still runs what it holds, so that stays in flight; its
        slots, methods and liveness are refreshed and parked slots cleared.
        Slots still busy with another broker's messages come back as NACK.
        """
        slots = _slots(info)
        if w.state == DETACHED:
            w.move(READY)
            del self._detached[w.rid]
        self._unserve(w)
        wid = str(info.get("id") or w.rid.hex())
        if wid != w.id:
            if self._by_id.get(w.id) is w:
                del self._by_id[w.id]
            w.id = wid
            self.ever.add(wid)
        self._by_id[wid] = w
        w.info = info
        held = len(w.in_flight) + len(w.abandoned)  # abandoned: still running there
        w.slots = max(slots, held)  # it holds more: its DONEs free none
        w.batch = w.slots > 1 and info.get("batch") is True
        w.compact = info.get("compact") is True
        w.concurrency = concurrency_of(info)
        w.prefetches = w.slots > w.concurrency
        w.beat_rid = beat_id_of(info) or w.beat_rid
        w.parked = 0
        self._set_liveness(now, w, info, watchable)
        self._serve(w, read_methods(info))
        w.free = 0
        self._watch_if_busy(now, w)  # its concurrency or slots may have changed
        self._offer(now, w, w.slots - held)
        return w

    def _set_liveness(self, now: float, w: WorkerState, info: dict[str, Any],
                      watchable: bool) -> None:
        """Set how long ``w`` may stay silent: ``liveness`` beats of sqm's
        heartbeat or of its own, whichever is longer, idle or busy, watched
        or not (SPEC). A watched worker is told so (:class:`Watch`): sqm
        sends it no heartbeats, and it sends its self-report only every
        ``report_s`` (its beats in between are bare)."""
        own = info.get("heartbeat")
        own = float(own) if isinstance(own, (int, float)) and 0 < own <= 3600 else 0.0
        beat = max(self.heartbeat, own)
        w.ttl = self.liveness * beat
        w.heard_at = now
        if now + w.ttl < self._expiry_at:
            self._expiry_at = now + w.ttl
        watched = watchable and info.get("watch") is True
        if watched != w.watched:
            self.watched += 1 if watched else -1
            w.watched = watched
        w.report_s = self.report_every * beat if watched else 0.0
        if watched:
            self.outbox.append(Watch(w.rid))

    def _offer(self, now: float, w: WorkerState, n: int) -> None:
        """``n`` more free slots of ``w``: they take pending work it can do, or wait idle."""
        if w.methods is None:
            w.free += n
            self._idle.extend([w] * n)
            if self.pending:
                self._assign(now)
        else:
            for _ in range(n):
                self._freed(now, w)

    def abilities(self, now: float, rid: bytes, info: dict[str, Any]) -> bool:
        """Worker ``rid`` now serves ``info['methods']`` (its callbacks changed).

        What it holds it finishes; its free slots move to its new methods
        and take what pends there. False if the worker is unknown.
        """
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard_at = now
        methods = read_methods(info)
        if methods == w.methods:
            return True
        self._unserve(w)
        self._serve(w, methods)
        if w.state != READY and w.state != STOPPING:
            return True
        for _ in range(w.free):
            w.free -= 1  # _freed gives each free slot back, to the new methods
            self._freed(now, w)
        return True

    def done(self, now: float, rid: bytes, msg_id: bytes, ok: bool = True) -> bool:
        """A worker finished ``msg_id`` (its reply went straight to the sender).

        Returns False when the worker or the assignment is unknown, e.g. after
        a broker restart; the I/O layer then asks the worker to re-register.
        """
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard_at = now
        msg = w.in_flight.pop(msg_id, None)
        if msg is None:
            if w.abandoned and w.abandoned.pop(msg_id, None) is not None:
                self._slot_back(now, w)  # a late reply after a time limit or cancel
            return True
        msg.state = FINISHED
        del self._live[msg_id]
        if self.track_ends:
            self.outbox.append(Ended(msg, COMPLETED if ok else FAILED))
        self.in_flight -= 1
        w.tasks_done += 1
        w.done_at = now
        stats = msg.stats
        h = stats.service  # Histogram.record, inlined: this runs once per message
        d = now - msg.dispatched_at
        h.counts[bisect_left(BOUNDS, d)] += 1
        h.sum += d
        if ok:
            self.completed_total += 1
            stats.completed += 1
        else:
            self.failed_total += 1
            stats.failed += 1
        if not w.in_flight:
            w.busy_s += now - w.busy_since
            w.idle_since = now
        if w.state >= LEAVING:
            self._ended_off_duty(now, w)
            return True
        if w.methods is None:
            w.free += 1
            nxt = None
            if self.pending:
                waiting = self._waiting
                if len(waiting) == 1 and self.dispatching:
                    # one method pending: the common case
                    nxt = self._pop(now, next(iter(waiting)))
                else:
                    nxt = self._take(now, w)
            if nxt is None:
                self._idle.append(w)
            else:
                self._dispatch(now, w, nxt)
        else:  # _freed, inlined for a worker that serves one method
            queues = w.queues
            if len(queues) != 1:
                self._freed(now, w)
                return True
            w.free += 1
            mq = queues[0]
            nxt = self._pop(now, mq) if mq.pending and self.dispatching else None
            if nxt is None:
                mq.park(w)
            else:
                self._dispatch(now, w, nxt)
        return True

    def holds(self, msg_id: bytes) -> bool:
        """Message ``msg_id`` was accepted and has not ended (queued, scheduled or running)."""
        return msg_id in self._live

    def done_many(self, now: float, rid: bytes, ids: list[bytes], ok: bool = True) -> bool:
        """A multi-id DONE: :meth:`done` for each id, in order.

        False (ask it to register) only when the worker is unknown; ids after
        its removal (it was leaving and this DONE ended its last message) are
        ignored rather than answered with BYE.
        """
        if rid not in self.workers:
            return False
        done = self.done
        for msg_id in ids:
            if not done(now, rid, msg_id, ok):
                break
        return True

    def nack(self, now: float, rid: bytes, msg_id: bytes) -> bool:
        """The worker hands ``msg_id`` back unstarted: it was full when the message
        arrived (it serves several brokers), or the message waited in its local
        queue behind a callback that runs long (prefetch reclaim).

        The message goes back to the queue in its place without using a
        delivery, and the slot that carried it is parked until the worker
        gives it back with :meth:`credit`. A message sqm already gave up on
        (time limit, cancel) only parks its slot: it never ran and has ended.
        Returns False if the worker is unknown.
        """
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard_at = now
        msg = w.in_flight.pop(msg_id, None)
        if msg is None:
            if w.abandoned and w.abandoned.pop(msg_id, None) is not None:
                w.parked += 1  # free stays as it was: the slot waits for CREDIT
                if w.state == LEAVING and not w.in_flight and not w.abandoned:
                    self._remove_worker(now, w, "worker left")
            return True
        self.nacked_total += 1
        self.in_flight -= 1
        self.assigned_total -= 1
        msg.stats.assigned -= 1
        msg.deliveries -= 1
        if not w.in_flight:
            w.busy_s += now - w.busy_since
            w.idle_since = now
        w.parked += 1
        self._requeue(msg)
        if w.state == LEAVING and not w.in_flight:
            self._remove_worker(now, w, "worker left")
        else:
            self._assign(now)
        return True

    def give_back(self, now: float, rid: bytes, ids: list[bytes]) -> bool:
        """Prefetch reclaim: the worker's callback runs long, so it hands back the
        messages it holds unstarted (each as :meth:`nack`: back in its place, no
        delivery used) and parks its free slots with them, so no new work waits
        behind that callback; its CREDIT after the callback gives them back.

        Ids it no longer holds in sqm's view (a time limit or cancel crossed
        the give-back) change nothing but their slot. False if the worker is unknown.
        """
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard_at = now
        w.asked_at = now  # it answered (asked or not): no ask while it runs that callback
        if w.free > 0:  # before the requeues below: they must not come straight back
            w.parked += w.free
            w.free = 0
            # Its idle entries go (not left stale): CREDIT puts its slots at the
            # back of the line, as if they had just become free.
            if w.methods is None:
                if w in self._idle:
                    self._idle = deque(x for x in self._idle if x is not w)
            else:
                for mq in w.queues:
                    mq.forget(w)
        nack = self.nack
        for msg_id in ids:
            if not nack(now, rid, msg_id):
                break  # removed (it was leaving and held nothing more)
        return True

    def credit(self, now: float, rid: bytes, n: int) -> bool:
        """The worker has room again for ``n`` of the slots it parked (NACK, GIVE_BACK)."""
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard_at = now
        n = max(0, min(n, w.parked))
        if not n or w.state >= LEAVING:  # leaving or detached: no new work
            return True
        w.parked -= n
        self._offer(now, w, n)
        return True

    def report(self, now: float, wid: str, raw: bytes, rid: bytes = b"") -> bool:
        """A heartbeat that carries the worker's self-report (rss, nice, busy_s...).

        Kept as it came (JSON bytes): only a status decodes it.
        """
        w = self._by_id.get(wid)
        if w is None:
            return False
        w.heard_at = now
        w.report = raw
        w.report_at = now
        if rid:
            w.beat_rid = rid
        return True

    def seen(self, now: float, rid: bytes) -> bool:
        """Any traffic from a worker proves it alive. False if unknown."""
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard_at = now
        return True

    def gone(self, now: float, rid: bytes) -> bool:
        """Worker ``rid``'s connection closed (the I/O layer saw it): detach it.

        A killed process closes its connection at once, but so does a live
        one whose connection dropped briefly (it reconnects and says HELLO
        again). So no new work goes to it, and what it holds stays in
        flight: if it comes back, nothing runs twice; if it is dead, its
        silence removes it within ``ttl`` (:meth:`tick`), and only then is
        what it held redelivered or failed back (``WorkerLost``). False if
        unknown.
        """
        w = self.workers.get(rid)
        if w is None:
            return False
        self._detach(now, w)
        return True

    def _detach(self, now: float, w: WorkerState) -> None:
        """No new work for ``w`` until it says HELLO again (it may already be
        reconnected: :class:`Bye` asks it to); a leaving worker stays leaving."""
        if w.state == READY or w.state == STOPPING:
            w.move(DETACHED)
            w.detached_at = now
            self._detached[w.rid] = w
            if now + w.ttl < self._expiry_at:
                self._expiry_at = now + w.ttl
            self.outbox.append(Bye(w.rid))

    def _ended_off_duty(self, now: float, w: WorkerState) -> None:
        """A leaving or detached worker ended a message: its slot takes no new work.

        A leaving one that holds nothing more is removed; a detached one
        proves it is reachable again, so it is asked (again) to register.
        """
        if w.state == LEAVING:
            if not w.in_flight:
                self._remove_worker(now, w, "worker left")
        elif w.state == DETACHED:
            self.outbox.append(Bye(w.rid))

    def seen_id(self, now: float, wid: str, rid: bytes = b"") -> bool:
        """A heartbeat naming the worker by id, sent from its process's heartbeat
        thread on connection ``rid`` (where a :class:`Reclaim` for it goes)."""
        w = self._by_id.get(wid)
        if w is None:
            return False
        w.heard_at = now
        if rid:
            w.beat_rid = rid
        return True

    def seen_ids(self, now: float, wids: Iterable[str], rid: bytes = b"") -> int:
        """A packed heartbeat: every worker of one process names itself (one message
        per interval, however many workers the process runs). Unknown ids (a
        worker gone, or not registered yet) are skipped, as :meth:`seen_id` does.
        Returns how many were known."""
        by_id = self._by_id
        known = 0
        for wid in wids:
            w = by_id.get(wid)
            if w is not None:
                w.heard_at = now
                w.beat_rid = rid
                known += 1
        return known

    def unreachable(self, now: float, rid: bytes, msg: Message) -> None:
        """A dispatch of ``msg`` to ``rid`` could not be sent: the connection is gone.

        ``msg`` never reached the worker, so it goes back to the queue without
        using a retry; the worker is detached like on :meth:`gone` (what else
        it holds stays in flight until it is back or removed).
        """
        w = self.workers.get(rid)
        if w is None or w.in_flight.get(msg.id) is not msg:
            return
        del w.in_flight[msg.id]
        if not w.in_flight:
            w.busy_s += now - w.busy_since
        self.in_flight -= 1
        self.assigned_total -= 1
        msg.stats.assigned -= 1
        msg.deliveries -= 1
        self._requeue(msg)
        self._detach(now, w)
        if self.pending:
            self._assign(now)

    def bye(self, now: float, rid: bytes) -> None:
        """A worker asks to leave: no new work for it; it finishes what it holds.

        The acknowledgement (:class:`Bye`) tells the worker that nothing more was
        sent after it, so it may exit once it has finished what it holds.
        """
        w = self.workers.get(rid)
        if w is None:
            self.outbox.append(Bye(rid))
            return
        if w.state == DETACHED:
            del self._detached[rid]
        w.move(LEAVING)  # its idle slots become stale entries
        self.outbox.append(Bye(rid))
        if not w.in_flight:
            self._remove_worker(now, w, "worker left")

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        """Expire silent workers, heartbeat quiet ones, sweep expired pending, run timers.

        Dead: nothing heard for ``ttl`` (every worker heartbeats, idle or
        busy, watched or not), or detached for ``ttl`` without saying HELLO
        again. A dead worker is told :class:`Bye` (a stopped process that
        resumes registers again). Only heartbeated (unwatched) workers get
        sqm's heartbeats.
        """
        if self.timer_at <= now:
            self.timers(now)
        if now >= self._expiry_at:
            self._expire(now)
        if len(self.workers) > self.watched:
            for w in self.workers.values():
                if not w.watched and now - w.last_sent >= self.heartbeat:
                    w.last_sent = now
                    self.outbox.append(Heartbeat(w.rid))
        if self.pending and now - self._last_sweep >= self.heartbeat:
            self._last_sweep = now
            self._sweep_expired(now)

    def _expire(self, now: float) -> None:
        """Remove the dead workers (see :meth:`tick`); note when the next one can die.

        Heard times only grow, so the walk runs about once per ``ttl`` minus a
        beat, not at every tick (a HELLO or a detach with an earlier limit
        brings it forward).
        """
        dead = []
        soonest = NEVER
        for w in self.workers.values():
            at = w.heard_at + w.ttl
            if w.state == DETACHED and w.detached_at + w.ttl < at:
                at = w.detached_at + w.ttl
            if now - w.heard_at > w.ttl or (w.state == DETACHED
                                            and now - w.detached_at > w.ttl):
                dead.append(w)
            elif at < soonest:
                soonest = at
        self._expiry_at = soonest
        for w in dead:
            w.move(GONE)  # all of them first: a retry must not go to another dead one
        for w in dead:
            self.outbox.append(Bye(w.rid))
            silent = now - w.heard_at > w.ttl
            since = w.heard_at if silent else w.detached_at
            self.expired.append((w.id, now - since, len(w.in_flight), silent))
            self._remove_worker(now, w, "worker stopped heartbeating" if silent
                                else "worker connection closed and it did not come back")

    def shutdown(self, now: float, *, fail_pending: bool = True) -> None:
        """Fail every pending message back and tell every worker we stop.

        In-flight messages are not failed: their workers still reply
        straight to the originators. With a journal (``fail_pending=False``)
        pending messages are kept for the next start instead.
        """
        if fail_pending:
            self._drop_pending("BrokerShutdown", "sqm stopped before a worker took it")
            self._drop_scheduled("BrokerShutdown", "sqm stopped before it was due")
        for w in self.workers.values():
            self.outbox.append(Bye(w.rid))

    def purge(self, now: float) -> int:
        """Drop every pending message, failing each back to its originator."""
        return self._drop_pending("Purged", "purged by an operator")

    def _drop_pending(self, kind: str, text: str) -> int:
        n = 0
        for mq in sorted(self._waiting, key=_oldest_first):
            for level in mq.levels:
                while level:
                    msg = level.popleft()
                    if msg.state == PENDING:
                        n += 1
                        self._finish_failed(msg, kind, text)
            mq.pending = 0
            if not mq.workers:
                self._mq.pop(mq.name, None)
        self._waiting.clear()
        self.pending = 0
        return n

    def drain(self) -> None:
        """Stop dispatching: pending messages stay, new ones are still accepted."""
        self.dispatching = False

    def resume(self, now: float) -> None:
        """Dispatch again after :meth:`drain`."""
        self.dispatching = True
        if self.pending:
            self._assign(now)

    def stop_worker(self, wid: str) -> bool:
        """Ask worker ``wid`` to finish what it holds and exit; False if unknown."""
        w = self._by_id.get(wid)
        if w is None:
            return False
        if w.state == READY:
            w.move(STOPPING)
        self.outbox.append(Stop(w.rid))
        return True

    # ------------------------------------------------------------------ status

    def status(self, now: float) -> dict[str, Any]:
        """The figures ``sqm status --json`` prints (built by :mod:`sqm.core.stats`)."""
        return queue_status(self, now)

    @property
    def universal_workers(self) -> int:
        """Registered workers that advertised no methods (they serve every method)."""
        return self._universal

    def method_load(self) -> dict[bytes, tuple[int, int]]:
        """``{method: (pending, workers)}`` for every method pending or served."""
        universal = self._universal
        return {name: (mq.pending, mq.workers + universal) for name, mq in self._mq.items()
                if mq.pending or mq.workers}

    # ------------------------------------------------------------------ failure handling

    def _hold(self, now: float, msg: Message) -> bool:
        """Accept a message due later (``not_before``), or refuse it when the queue is full."""
        if self.pending + self.scheduled >= self.max_pending:
            self.rejected_total += 1
            self.outbox.append(
                Fail(msg, "QueueFull", f"queue {self.name!r} holds {self.pending} pending "
                     f"and {self.scheduled} scheduled")
            )
            return False
        self._hold_admitted(now, msg)
        return True

    def _hold_admitted(self, now: float, msg: Message) -> None:
        self._seq += 1
        msg.seq = self._seq
        msg.submitted_at = now
        self._live[msg.id] = msg
        self._schedule(msg)

    def _schedule(self, msg: Message) -> None:
        """Put ``msg`` on the due heap; a deadline before its due time comes up first."""
        msg.state = SCHEDULED
        msg.worker = None
        at = msg.not_before
        if msg.deadline and msg.deadline < at:
            at = msg.deadline  # expiry wins over the due time
        self._timer_n += 1
        heapq.heappush(self._due, (at, self._timer_n, msg))
        self.scheduled += 1
        if at < self.timer_at:
            self.timer_at = at

    def _limit(self, msg: Message, w: WorkerState) -> None:
        """Watch a dispatch of ``msg`` to ``w`` for its time limit: the message's
        or the worker's own (``Worker(time_limit=)``), the smaller one."""
        limit = msg.time_limit
        if w.time_limit and (not limit or w.time_limit < limit):
            limit = w.time_limit
        at = msg.dispatched_at + limit
        self._timer_n += 1
        heapq.heappush(self._limits, (at, self._timer_n, msg, msg.dispatched_at))
        if at < self.timer_at:
            self.timer_at = at

    def timers(self, now: float) -> None:
        """Queue the scheduled messages now due; fail running ones past their time limit."""
        due = self._due
        released = False
        while due and due[0][0] <= now:
            msg = heapq.heappop(due)[2]
            if msg.state != SCHEDULED:
                continue  # cancelled while held
            self.scheduled -= 1
            if msg.deadline and msg.deadline <= now:
                self._finish_failed(msg, "Expired", "deadline passed before it was due")
                continue
            self._seq += 1  # FIFO by due time within its priority level
            msg.seq = self._seq
            msg.submitted_at = now
            msg.state = PENDING
            self._enqueue(self._method_queue(msg.method), msg)
            released = True
        limits = self._limits
        while limits and limits[0][0] <= now:
            _at, _n, msg, started = heapq.heappop(limits)
            w = msg.worker
            if msg.state != INFLIGHT or w is None or msg.dispatched_at != started:
                continue  # ended, or dispatched again since
            self.time_limited_total += 1
            self._abandon(w, msg)
            self._finish_failed(msg, TIME_LIMIT,
                                f"still running after its time limit of {_at - started:g} s")
        stalls = self._stalls
        while stalls and stalls[0][0] <= now:
            at, _n, w = heapq.heappop(stalls)
            if w.watch_at != at:
                continue  # rescheduled since
            w.watch_at = 0.0
            held = len(w.in_flight)
            if (held < w.concurrency or not w.prefetches
                    or (w.state != READY and w.state != STOPPING)):
                continue  # a free turn, no room for more, or it takes no work: no watch
            if len(self.workers) < 2:
                continue  # alone: nobody to give back to (watched again when one joins)
            after = self.reclaim_after
            if w.done_at > at - after:  # it ended one since the watch began: it moves
                self._watch(w, max(w.done_at, now - after / 2) + after)
                continue
            # Busy and ended nothing for `after`: its callback runs long. Ask it (on
            # its heartbeat connection: its runner is in the callback) to give back
            # what waits behind it and to park its free slots, so nothing more
            # queues there; again every `after` while messages still wait there.
            # Only while another worker could run them sooner: alone, or beside
            # workers as stuck, a give-back only moves the wait into sqm.
            if (w.beat_rid and (held > w.concurrency or w.asked_at <= w.done_at)
                    and self._room_elsewhere(w, now)):
                w.asked_at = now
                self.reclaims_total += 1
                self.outbox.append(Reclaim(w.beat_rid, w.id))
            self._watch(w, now + after)
        self.timer_at = min(due[0][0] if due else NEVER, limits[0][0] if limits else NEVER,
                            stalls[0][0] if stalls else NEVER)
        if released and self.pending:
            self._assign(now)

    def _room_elsewhere(self, w: WorkerState, now: float) -> bool:
        """Whether another worker that serves what ``w`` holds has a free slot and
        moves (a free turn, or it ended a message within ``reclaim_after``); ``w``
        itself, stalled, never does.

        Only a stall check asks (at most once per ``reclaim_after`` per stuck
        worker), so a look along the idle deques, stopping at the first, is cheap.
        """
        soon = now - self.reclaim_after
        deques = [self._idle]
        mqs = self._mq
        for method in {m.method for m in w.in_flight.values()}:
            mq = mqs.get(method)
            if mq is not None:
                deques.append(mq.idle)
        for idle in deques:
            for v in idle:
                if v.free > 0 and (len(v.in_flight) < v.concurrency or v.done_at > soon):
                    return True
        return False

    def _watch(self, w: WorkerState, at: float) -> None:
        """Check at ``at`` that ``w``, busy with room for more, still ends messages."""
        w.watch_at = at
        self._timer_n += 1
        heapq.heappush(self._stalls, (at, self._timer_n, w))
        if at < self.timer_at:
            self.timer_at = at

    def _abandon(self, w: WorkerState, msg: Message) -> None:
        """``w`` keeps running ``msg`` but sqm no longer waits for it: its slot
        stays taken until the worker reports the end (or dies)."""
        del w.in_flight[msg.id]
        self.in_flight -= 1
        w.abandoned[msg.id] = msg

    def _slot_back(self, now: float, w: WorkerState) -> None:
        """A slot of ``w`` that held no live message (retried, abandoned) is free again."""
        if w.state == LEAVING:
            if not w.in_flight and not w.abandoned:
                self._remove_worker(now, w, "worker left")
        elif w.state == GONE or w.state == DETACHED:
            return  # a detached one gets its free slots back when it says HELLO again
        elif w.methods is None:
            w.free += 1
            nxt = self._take(now, w) if self.pending else None
            if nxt is None:
                self._idle.append(w)
            else:
                self._dispatch(now, w, nxt)
        else:
            self._freed(now, w)

    def cancel(self, now: float, msg_id: bytes, origin: bytes | None = None,
               why: str = "cancelled by its sender") -> bool:
        """End ``msg_id`` with ``Cancelled`` if it is scheduled, pending or running.

        ``origin``: only a message of that originator (a sender cancels its
        own). A running one is abandoned (its worker is told, with a
        :class:`Cancel` entry, and its slot stays taken until it answers).
        False for an unknown or ended message.
        """
        msg = self._live.get(msg_id)
        if msg is None or (origin is not None and msg.origin != origin):
            return False
        state = msg.state
        if state == SCHEDULED:
            self.scheduled -= 1  # its heap entry is skipped when it comes up
        elif state == PENDING:
            self.pending -= 1  # its queue entry is skipped when it comes up
            mq = self._mq.get(msg.method)
            if mq is not None and mq.pending:
                mq.pending -= 1
                if not mq.pending:
                    self._waiting.pop(mq, None)
                    if not mq.workers:
                        self._mq.pop(mq.name, None)
        elif state == INFLIGHT and msg.worker is not None:
            w = msg.worker
            self._abandon(w, msg)
            self.outbox.append(Cancel(w.rid, msg))
        else:
            return False
        self._finish_failed(msg, CANCELLED, why)
        return True

    def retry(self, now: float, rid: bytes, msg_id: bytes, delay: float, max_retries: int,
              error: str) -> Message | None:
        """Worker ``rid`` asks to run ``msg_id`` again in ``delay`` seconds (``Retry``).

        The slot is freed; the message is scheduled again (for any worker
        able to serve it) with one more attempt, or, when ``max_retries``
        attempts were already made, failed back as ``RetriesExhausted``
        carrying ``error`` (the last error, "Type: message"). Returns the
        message, or None when the worker does not hold it.
        """
        w = self.workers.get(rid)
        if w is None:
            return None
        w.heard_at = now
        msg = w.in_flight.pop(msg_id, None)
        if msg is None:
            if w.abandoned and w.abandoned.pop(msg_id, None) is not None:
                self._slot_back(now, w)
            return None
        self.in_flight -= 1
        if not w.in_flight:
            w.busy_s += now - w.busy_since
            w.idle_since = now
        if msg.attempts >= max_retries:
            self._finish_failed(msg, RETRIES_EXHAUSTED,
                                f"gave up after {msg.attempts} retries; last error {error}")
        else:
            msg.attempts += 1
            self.retried_total += 1
            msg.not_before = now + max(0.0, delay)
            self._schedule(msg)
        self._slot_back(now, w)
        if self.timer_at <= now:
            self.timers(now)
        return msg

    def _drop_scheduled(self, kind: str, text: str) -> int:
        n = 0
        for _at, _n, msg in self._due:
            if msg.state == SCHEDULED:
                n += 1
                self._finish_failed(msg, kind, text)
        self._due.clear()
        self.scheduled = 0
        self.timer_at = min(self._limits[0][0] if self._limits else NEVER,
                            self._stalls[0][0] if self._stalls else NEVER)
        return n

    # ------------------------------------------------------------------ internals

    def _dispatch(self, now: float, w: WorkerState, msg: Message) -> None:
        msg.state = INFLIGHT
        msg.worker = w
        msg.deliveries += 1
        msg.dispatched_at = now
        if msg.time_limit or w.time_limit:
            self._limit(msg, w)
        stats = msg.stats
        stats.assigned += 1
        h = stats.wait  # Histogram.record, inlined
        d = now - msg.submitted_at
        h.counts[bisect_left(BOUNDS, d)] += 1
        h.sum += d
        if not w.in_flight:
            w.busy_since = now
        w.in_flight[msg.id] = msg
        if (len(w.in_flight) >= w.concurrency and w.prefetches and not w.watch_at
                and len(self.workers) > 1):  # alone: no give-back could help (no timer)
            self._watch(w, now + self.reclaim_after)  # busy, with room for more: watch
        w.free -= 1
        w.last_sent = now
        self.in_flight += 1
        self.assigned_total += 1
        self.outbox.append(_new_tuple(Dispatch, (w.rid, msg)))

    def _method_queue(self, method: bytes) -> MethodQueue:
        mq = self._mq.get(method)
        if mq is None:
            mq = self._mq[method] = MethodQueue(method)
        return mq

    def _enqueue(self, mq: MethodQueue, msg: Message) -> None:
        mq.levels[msg.priority].append(msg)
        if not mq.pending:
            self._waiting[mq] = None
        mq.pending += 1
        self.pending += 1

    def _serve(self, w: WorkerState, methods: tuple[bytes, ...] | None) -> None:
        """Record what ``w`` serves (no free slot is handed out here)."""
        w.methods = methods
        if methods is None:
            w.queues = []
            self._universal += 1
            return
        w.queues = queues = [self._method_queue(m) for m in methods]
        for mq in queues:
            mq.workers += 1
            mq.slots += w.slots

    def _unserve(self, w: WorkerState) -> None:
        """Forget what ``w`` serves: its idle entries and its counts."""
        if w.methods is None:
            self._universal -= 1
            if w in self._idle:
                self._idle = deque(x for x in self._idle if x is not w)
            return
        for mq in w.queues:
            mq.workers -= 1
            mq.slots -= w.slots
            mq.forget(w)
            if not mq.workers and not mq.pending:
                self._mq.pop(mq.name, None)
        w.queues = []

    def _freed(self, now: float, w: WorkerState) -> None:
        """One more slot of worker ``w`` is free: fill it or park it."""
        w.free += 1
        nxt = self._take(now, w) if self.pending else None
        if nxt is not None:
            self._dispatch(now, w, nxt)
        elif w.methods is None:
            self._idle.append(w)
        else:
            for mq in w.queues:
                mq.park(w)

    def _idle_worker(self, mq: MethodQueue) -> WorkerState | None:
        """Take the longest idle free slot able to serve ``mq`` (None if there is none)."""
        own = mq.idle
        while own and own[0].free <= 0:
            own.popleft()  # stale: the worker took work through another method, or left
        anyone = self._idle
        while anyone and anyone[0].free <= 0:
            anyone.popleft()
        if own:
            if anyone and anyone[0].idle_since < own[0].idle_since:
                return anyone.popleft()
            return own.popleft()
        if anyone:
            return anyone.popleft()
        return None

    def _take(self, now: float, w: WorkerState) -> Message | None:
        """The oldest live pending message ``w`` can serve, of the highest level; or None.

        None as well while drained: every dispatch but the admission fast
        path takes its message from here, so this is where draining holds.
        """
        if not self.dispatching:
            return None
        queues: Any = self._waiting if w.methods is None else w.queues
        if len(queues) == 1:
            return self._pop(now, next(iter(queues)))
        while self.pending:
            best: MethodQueue | None = None
            best_key: tuple[int, int] | None = None
            for mq in queues:
                if mq.pending:
                    key = mq.head()
                    if key is not None and (best_key is None or key < best_key):
                        best, best_key = mq, key
            if best is None or best_key is None:
                return None
            msg = best.levels[best_key[0]].popleft()
            best.pending -= 1
            if not best.pending:
                self._waiting.pop(best, None)
                if not best.workers:
                    self._mq.pop(best.name, None)
            self.pending -= 1
            if msg.deadline and msg.deadline <= now:
                self._finish_failed(msg, "Expired", "deadline passed before a worker was free")
                continue
            return msg
        return None

    def _pop(self, now: float, mq: MethodQueue) -> Message | None:
        """The oldest live pending message of ``mq``'s highest level, or None (one method)."""
        for level in mq.levels:
            while level:
                msg = level.popleft()
                if msg.state != PENDING:
                    continue
                self.pending -= 1
                mq.pending -= 1
                if not mq.pending:
                    self._waiting.pop(mq, None)
                    if not mq.workers:
                        self._mq.pop(mq.name, None)
                if msg.deadline and msg.deadline <= now:
                    self._finish_failed(msg, "Expired", "deadline passed before a worker was free")
                    continue
                return msg
        return None

    def _place(self, now: float, mq: MethodQueue) -> None:
        """Hand ``mq``'s pending messages to idle workers able to serve them."""
        while mq.pending and (mq.idle or self._idle):
            w = self._idle_worker(mq)
            if w is None:
                return
            msg = self._take(now, w)
            if msg is None:
                (self._idle if w.methods is None else mq.idle).appendleft(w)
                return
            self._dispatch(now, w, msg)

    def _assign(self, now: float) -> None:
        """Hand pending messages to every idle worker that can take one (rare paths)."""
        idle = self._idle
        while self.pending and idle:
            w = idle.popleft()
            if w.free <= 0:
                continue  # stale slot of a gone or leaving worker
            msg = self._take(now, w)
            if msg is None:
                idle.appendleft(w)
                break
            self._dispatch(now, w, msg)
        if self.pending and len(self.workers) > self._universal:
            for mq in sorted(self._waiting, key=_oldest_first):
                self._place(now, mq)

    def _requeue(self, msg: Message) -> None:
        """Put a redelivered message back in submission order within its level."""
        mq = self._method_queue(msg.method)
        level = mq.levels[msg.priority]
        msg.state = PENDING
        msg.worker = None
        if not level or level[-1].seq < msg.seq:
            level.append(msg)
        else:
            # Older than something queued: insert by seq (rare; short scan).
            seqs = [m.seq for m in level]
            level.insert(bisect.bisect_left(seqs, msg.seq), msg)
        if not mq.pending:
            self._waiting[mq] = None
        mq.pending += 1
        self.pending += 1

    def _remove_worker(self, now: float, w: WorkerState, why: str) -> None:
        if w.state != GONE:
            w.move(GONE)
        del self.workers[w.rid]
        self._detached.pop(w.rid, None)
        if w.watched:
            self.watched -= 1
        if self._by_id.get(w.id) is w:
            del self._by_id[w.id]
        self._unserve_gone(w)
        if w.in_flight:
            w.busy_s += now - w.busy_since
        self.dead_busy_s += w.busy_s
        self.dead_lifetime_s += now - w.registered_at
        held = sorted(w.in_flight.values(), key=lambda m: m.seq)
        w.in_flight.clear()
        self.in_flight -= len(held)
        for msg in held:
            can_retry = msg.retries > 0 and (
                self.max_deliveries is None or msg.deliveries < self.max_deliveries
            )
            if can_retry:
                msg.retries -= 1
                self.redelivered_total += 1
                self._requeue(msg)
            else:
                self._finish_failed(msg, "WorkerLost", why)
        if self.pending:
            self._assign(now)

    def _unserve_gone(self, w: WorkerState) -> None:
        """A removed worker no longer counts; its idle entries are stale (free == 0)."""
        if w.methods is None:
            self._universal -= 1
            return
        for mq in w.queues:
            mq.workers -= 1
            mq.slots -= w.slots
            if not mq.workers and not mq.pending:
                self._mq.pop(mq.name, None)
        w.queues = []

    def _finish_failed(self, msg: Message, kind: str, text: str) -> None:
        """End an accepted message by failing it back to its originator."""
        msg.state = FINISHED
        msg.worker = None
        self._live.pop(msg.id, None)
        if kind == "Expired":
            self.expired_total += 1
        elif kind == CANCELLED:
            self.cancelled_total += 1
        else:  # WorkerLost, BrokerShutdown, Purged, TimeLimitExceeded, RetriesExhausted
            self.failed_total += 1
            msg.stats.failed += 1
        self.outbox.append(Fail(msg, kind, text))
        if self.track_ends:
            self.outbox.append(Ended(msg, kind))

    def _sweep_expired(self, now: float) -> None:
        for mq in sorted(self._waiting, key=_oldest_first):
            for i, level in enumerate(mq.levels):
                if not level:
                    continue
                keep: deque[Message] = deque()
                for msg in level:
                    if msg.state != PENDING:
                        continue
                    if msg.deadline and msg.deadline <= now:
                        self.pending -= 1
                        mq.pending -= 1
                        self._finish_failed(msg, "Expired", "deadline passed while pending")
                    else:
                        keep.append(msg)
                mq.levels[i] = keep
            if not mq.pending:
                self._waiting.pop(mq, None)
                if not mq.workers:
                    self._mq.pop(mq.name, None)


def _oldest_first(mq: MethodQueue) -> tuple[int, int]:
    """Sort key: a method queue's oldest pending message (level, seq); empty ones last."""
    return mq.head() or (LEVELS, 0)
