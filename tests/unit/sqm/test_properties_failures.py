"""Property tests for failure handling: scheduling, Retry, time limits and cancel.

A hypothesis ``RuleBasedStateMachine`` drives :class:`sqm.core.QueueCore`
with submits that may be scheduled (``not_before``), time-limited or carry
a deadline, worker hellos (some with a time limit of their own), dones
(also late ones, for messages sqm gave up on), retries (a worker's
``Retry``, with a random limit), cancels (of live, ended and unknown ids),
NACKs (also give-backs that cross sqm's own decision about the message:
prefetch reclaim), heartbeats and ticks with time advancing; a shutdown ends each run.
It checks, after every step:

- every accepted message ends exactly once (done, or one Fail: now also
  ``Cancelled``, ``TimeLimitExceeded``, ``RetriesExhausted``), and gets
  exactly one ``Ended``; a cancel returns True exactly for live messages;
- nothing is dispatched before its due time, nor after its deadline, nor
  after it was cancelled;
- attempts never exceed the limit a retry named; a retry past it ends the
  message as ``RetriesExhausted``;
- no dispatch stays in flight past its time limit once a tick has run,
  the smaller of the message's and the worker's limit applying;
- a due message is never left held: after a tick nothing scheduled is due;
- the counts (``pending``, ``scheduled``, ``in_flight``) match the messages'
  states, and a slot held by an abandoned message stays taken until the
  worker reports it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sqm.core import (
    FINISHED,
    INFLIGHT,
    PENDING,
    SCHEDULED,
    Cancel,
    Dispatch,
    Ended,
    Fail,
    Message,
    QueueCore,
    Reclaim,
)
from sqm.core.workers import READY, STOPPING

pytestmark = pytest.mark.timeout(120)

T0 = 1_000_000.0
NEW_KINDS = {"Cancelled", "TimeLimitExceeded", "RetriesExhausted"}


class FailureMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.core = QueueCore("q", T0, heartbeat=1.0, liveness=3, max_pending=8)
        self.core.track_ends = True
        self.ids = itertools.count(1)
        self.rids = itertools.count(1)
        self.accepted: list[Message] = []
        self.ends: dict[bytes, list[str]] = {}
        self.ended: dict[bytes, list[str]] = {}
        self.cancelled: set[bytes] = set()
        self.limits: dict[bytes, int] = {}  # id -> the max_retries its retries name
        self.worker_limits: dict[bytes, float] = {}
        self.stopped = False
        self.reclaims = 0

    # ------------------------------------------------------------ plumbing

    def _drain(self, label: str) -> None:
        for entry in self.core.outbox:
            if type(entry) is Dispatch:
                msg = entry.msg
                assert msg.not_before <= self.now, f"{label}: {msg.id!r} dispatched before due"
                assert not (msg.deadline and msg.deadline <= self.now), (
                    f"{label}: {msg.id!r} dispatched past its deadline")
                assert msg.id not in self.cancelled, f"{label}: {msg.id!r} dispatched after cancel"
                assert not self.ends.get(msg.id), f"{label}: {msg.id!r} dispatched after its end"
            elif type(entry) is Fail:
                if entry.msg.seq:  # accepted (refusals have no seq)
                    self._end(entry.msg, entry.error)
                    if entry.error == "RetriesExhausted":
                        assert entry.msg.attempts >= self.limits[entry.msg.id]
            elif type(entry) is Ended:
                prev = self.ended.setdefault(entry.msg.id, [])
                assert not prev, f"{label}: two Ended for {entry.msg.id!r}"
                prev.append(entry.outcome)
            elif type(entry) is Cancel:
                assert entry.msg.id in self.cancelled
            elif type(entry) is Reclaim:
                # asked only while messages wait behind its callback, and it ended
                # none for reclaim_after; on its heartbeat connection
                w = self.core._by_id[entry.wid]
                assert w.slots > w.concurrency, f"{label}: reclaim of a worker without prefetch"
                assert len(w.in_flight) >= w.concurrency, f"{label}: reclaim, it has a free turn"
                assert self.now - w.done_at >= self.core.reclaim_after, f"{label}: it moves"
                assert entry.rid == b"beat-" + w.rid
                # and only while another worker could take what it gives back (one
                # still registered, or one this very tick removed after the ask)
                assert any(v is not w for v in self.core.workers.values()) or any(
                    wid != entry.wid for wid, *_ in self.core.expired), (
                    f"{label}: reclaim of a worker alone")
                self.reclaims += 1
                event("a reclaim asked")
        self.core.outbox.clear()

    def _busy_unwatched(self) -> list[bytes]:
        """Workers busy with room for more, not alone, that no stall check watches."""
        core = self.core
        if len(core.workers) < 2:
            return []
        return [rid for rid, w in core.workers.items()
                if w.state in (READY, STOPPING) and w.prefetches
                and len(w.in_flight) >= w.concurrency
                and not w.watch_at]

    def _end(self, msg: Message, how: str) -> None:
        prev = self.ends.setdefault(msg.id, [])
        assert not prev, f"{msg.id!r} ended twice: {prev[0]} then {how}"
        prev.append(how)

    def _held(self) -> list[tuple[bytes, Message]]:
        return [(rid, m) for rid, w in self.core.workers.items() for m in w.in_flight.values()]

    def _abandoned(self) -> list[tuple[bytes, bytes]]:
        return [(rid, mid) for rid, w in self.core.workers.items() for mid in w.abandoned]

    # ------------------------------------------------------------ rules

    @precondition(lambda self: not self.stopped)
    @rule(priority=st.integers(0, 2),
          delay=st.one_of(st.none(), st.sampled_from([0.0, 0.3, 1.0, 2.5, 5.0])),
          deadline=st.one_of(st.none(), st.sampled_from([0.5, 2.0, 6.0])),
          time_limit=st.sampled_from([0.0, 0.0, 0.7, 2.0]))
    def submit(self, priority: int, delay: float | None, deadline: float | None,
               time_limit: float) -> None:
        mid = b"m%d" % next(self.ids)
        msg = Message(mid, b"origin", [mid], priority=priority,
                      deadline=0.0 if deadline is None else self.now + deadline,
                      not_before=0.0 if delay is None else self.now + delay,
                      time_limit=time_limit)
        if self.core.submit(self.now, msg):
            self.accepted.append(msg)
        self._drain("submit")

    @precondition(lambda self: not self.stopped)
    @rule(slots=st.integers(1, 3), limit=st.sampled_from([0.0, 0.0, 0.5, 3.0]))
    def hello(self, slots: int, limit: float) -> None:
        rid = b"w%d" % next(self.rids)
        info = {"slots": slots, "id": rid.decode(), **({"time_limit": limit} if limit else {})}
        self.worker_limits[rid] = limit
        self.core.hello(self.now, rid, info)
        self.core.seen_id(self.now, rid.decode(), b"beat-" + rid)  # its heartbeat connection
        self._drain("hello")

    @precondition(lambda self: not self.stopped and bool(self.core.workers))
    @rule(data=st.data(), slots=st.integers(1, 3))
    def hello_again(self, data: st.DataObject, slots: int) -> None:
        """A registered worker says HELLO again (it reconnected): abandoned slots stay taken."""
        rid = data.draw(st.sampled_from(sorted(self.core.workers)))
        limit = self.worker_limits.get(rid, 0.0)
        info = {"slots": slots, "id": rid.decode(), **({"time_limit": limit} if limit else {})}
        self.core.hello(self.now, rid, info)
        self._drain("hello again")

    @precondition(lambda self: bool(self._held()))
    @rule(data=st.data(), ok=st.booleans())
    def done(self, data: st.DataObject, ok: bool) -> None:
        rid, msg = data.draw(st.sampled_from(self._held()))
        self._end(msg, "done")
        assert self.core.done(self.now, rid, msg.id, ok)
        self._drain("done")

    @precondition(lambda self: bool(self._abandoned()))
    @rule(data=st.data())
    def late_done(self, data: st.DataObject) -> None:
        """The worker finally reports a message sqm gave up on: its slot comes back."""
        rid, mid = data.draw(st.sampled_from(self._abandoned()))
        w = self.core.workers[rid]
        taken = len(w.in_flight) + len(w.abandoned)
        assert self.core.done(self.now, rid, mid, True)
        assert mid not in w.abandoned
        assert len(w.in_flight) + len(w.abandoned) <= taken
        self._drain("late done")

    @precondition(lambda self: not self.stopped and bool(self._held()))
    @rule(data=st.data(), delay=st.sampled_from([0.0, 0.4, 1.5]), max_retries=st.integers(0, 3))
    def retry(self, data: st.DataObject, delay: float, max_retries: int) -> None:
        rid, msg = data.draw(st.sampled_from(self._held()))
        before = msg.attempts
        # one limit per message (a worker's max_retries, or its Retry's own)
        max_retries = self.limits.setdefault(msg.id, max_retries)
        got = self.core.retry(self.now, rid, msg.id, delay, max_retries, "ValueError: boom")
        assert got is msg
        if before >= max_retries:
            assert msg.state == FINISHED and msg.attempts == before
        else:
            assert msg.attempts == before + 1
            assert msg.not_before == self.now + delay
        self._drain("retry")

    @precondition(lambda self: not self.stopped)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        ids = [m.id for m in self.accepted] + [b"unknown"]
        mid = data.draw(st.sampled_from(ids))
        live = mid in self.core._live
        if live:
            self.cancelled.add(mid)
        assert self.core.cancel(self.now, mid) is live
        self._drain("cancel")
        if live:
            assert self.ends[mid] == ["Cancelled"]

    @precondition(lambda self: not self.stopped and bool(self._held()))
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        rid, msg = data.draw(st.sampled_from(self._held()))
        self.core.nack(self.now, rid, msg.id)
        self.core.credit(self.now, rid, 1)
        self._drain("nack")

    @precondition(lambda self: not self.stopped and bool(self.core.workers))
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        """Prefetch reclaim: a worker whose callback runs long hands back messages
        unstarted (GIVE_BACK), and sqm parks them and its free slots until CREDIT.
        An id may be one sqm gave up on meanwhile (time limit, cancel: the give-back
        crossed sqm's decision) or one the worker does not hold (a stale id)."""
        rid = data.draw(st.sampled_from(sorted(self.core.workers)))
        w = self.core.workers[rid]
        known = [*w.in_flight, *w.abandoned, *(m.id for m in self.accepted)]
        ids = data.draw(st.lists(st.sampled_from(known), unique=True, max_size=3)
                        if known else st.just([]))
        held = [mid for mid in ids if mid in w.in_flight]
        abandoned = [mid for mid in ids if mid in w.abandoned]
        parked, free = w.parked, w.free
        ended = {mid: list(self.ends.get(mid, [])) for mid in ids}
        assert self.core.give_back(self.now, rid, ids)
        self._drain("give back")
        for mid in ids:
            assert mid not in w.in_flight and mid not in w.abandoned, "given back, still held"
            if mid not in held:  # nothing about the message changed: ended, or where it was
                assert self.ends.get(mid, []) == ended[mid]
        if w.alive:
            # its free slots and the given-back ones wait for CREDIT: nothing new came
            assert w.parked == parked + free + len(held) + len(abandoned)
            assert w.free == 0
        for m in self.accepted:  # what it gave back went to another worker, or waits
            if m.id in held:
                assert m.worker is not w and m.state in (PENDING, INFLIGHT, FINISHED)

    @precondition(lambda self: not self.stopped and any(
        len(w.in_flight) >= w.concurrency for w in self.core.workers.values()))
    @rule()
    def stall(self) -> None:
        """Messages wait behind a callback and time passes with no DONE: sqm asks."""
        self.now += self.core.reclaim_after
        self.core.tick(self.now)
        self._drain("stall")

    @precondition(lambda self: not self.stopped and any(
        w.parked for w in self.core.workers.values()))
    @rule(data=st.data(), n=st.integers(1, 3))
    def credit_back(self, data: st.DataObject, n: int) -> None:
        """The long callback ended: the worker gives its parked slots back."""
        rid = data.draw(st.sampled_from(sorted(r for r, w in self.core.workers.items()
                                               if w.parked)))
        assert self.core.credit(self.now, rid, n)
        self._drain("credit back")

    @precondition(lambda self: not self.stopped)
    @rule(dt=st.sampled_from([0.0, 0.2, 0.5, 1.0, 2.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        for rid in list(self.core.workers):
            self.core.seen(self.now, rid)  # keep workers alive: deaths are test_properties'
        self.core.tick(self.now)
        self._drain("tick")
        for _rid, msg in self._held():
            w = msg.worker
            assert w is not None
            limits = [x for x in (msg.time_limit, w.time_limit) if x]
            if limits:
                assert msg.dispatched_at + min(limits) > self.now, (
                    f"{msg.id!r} in flight past its time limit")
        assert not (self.core._due and self.core._due[0][0] <= self.now and any(
            m.state == SCHEDULED for _a, _n, m in self.core._due if _a <= self.now)), \
            "a due message left held"

    # ------------------------------------------------------------ invariants

    @invariant()
    def stuck_workers_can_be_found(self) -> None:
        """Not alone, a busy worker with room for more is always watched: a stall
        check will see it if it stops ending messages (none is armed for one alone)."""
        assert self._busy_unwatched() == [], "busy with room for more, not watched"

    @invariant()
    def counts(self) -> None:
        core = self.core
        states = [m.state for m in self.accepted]
        assert core.pending == states.count(PENDING)
        assert core.scheduled == states.count(SCHEDULED)
        assert core.in_flight == states.count(INFLIGHT) == len(self._held())
        for m in self.accepted:
            assert (m.state == FINISHED) == bool(self.ends.get(m.id)), (m.id, m.state)
            assert len(self.ended.get(m.id, [])) == len(self.ends.get(m.id, []))
            if m.id in self.limits:
                assert m.attempts <= self.limits[m.id]
        for w in core.workers.values():
            assert w.free == w.slots - len(w.in_flight) - len(w.abandoned) - w.parked
            if core.pending and core.dispatching:
                assert w.free == 0
        for mid, how in self.ends.items():
            assert len(how) == 1, (mid, how)

    def teardown(self) -> None:
        self.core.shutdown(self.now)
        self._drain("shutdown")
        for rid, msg in self._held():
            self._end(msg, "done")
            self.core.done(self.now, rid, msg.id, True)
        self._drain("final dones")
        for m in self.accepted:
            assert len(self.ends.get(m.id, [])) == 1, (m.id, self.ends.get(m.id))
            assert len(self.ended.get(m.id, [])) == 1
        kinds = {how[0] for how in self.ends.values()}
        assert kinds <= {"done", "Expired", "QueueFull", "BrokerShutdown", "WorkerLost"} | NEW_KINDS


TestFailureHandling = FailureMachine.TestCase
TestFailureHandling.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
