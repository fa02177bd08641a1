"""Property tests: random event sequences against :class:`sqm.core.QueueCore`.

A hypothesis ``RuleBasedStateMachine`` drives the core with submits (random
priority, retries, deadline, oneway; also duplicate ids), worker hellos (new
and repeated rids, 1-3 slots, heartbeated or with their connection
watched), dones (genuine, ok or not, and bogus ones for unknown rids/ids or
another worker's message; batched ones, as sqm's server handles a
multi-id DONE: one ``done`` per id in one step, with ids the worker does
not hold or already ended), byes (graceful leave: the worker finishes what
it holds), failed sends (``unreachable``), closed connections (``gone``),
heartbeats (``seen``), purges, ticks with time advancing (sometimes past
``heartbeat * liveness`` so silent workers die, and detached ones not back
die) and at most one shutdown, late; dones may follow the shutdown.

Alongside the core runs a small, deliberately naive reference model (lists
and dicts, no cleverness) of what SPEC's delivery semantics require. After
every step the core's outbox is taken and checked entry by entry against
the model, and the core's state and counters are compared with it:

- a message is in flight on at most one live worker, and is never dispatched
  again while the worker holding it is alive;
- no live worker has a free slot while a message is pending;
- FIFO: each dispatch is of the oldest pending message (submission order,
  redeliveries keep their place) of the highest non-empty priority level;
- longest idle first: a message goes to the free slot that became free
  earliest;
- a worker found dead by a tick never receives a message in that tick;
- liveness: any worker (heartbeated or watched, idle or busy) dies
  ``heartbeat * liveness`` after it was last heard, and is told BYE; a
  watched one gets no heartbeats; a closed connection (or a failed
  dispatch) detaches a worker: no new work, what it holds stays in flight
  (a HELLO brings it back and nothing is run twice), and it dies
  ``heartbeat * liveness`` after it was detached unless it said HELLO;
- every message ends exactly once (done, or one OUT_FAIL with a reason), and
  after shutdown every message not in flight has ended;
- a message whose worker died is redelivered iff it had retries left (which
  are decremented), else fails with ``WorkerLost``;
- no message is dispatched at or after its deadline;
- batching: the dispatches of one step, grouped by worker as sqm's server
  sends them (one multi-message DISPATCH each), name distinct messages, no
  more than the worker's slots, each in flight on that worker afterwards;
- counters (assigned/completed/failed/expired/rejected/redelivered/
  malformed totals, ``pending``, ``in_flight``) agree with the model.

Model semantics for a tick that finds several workers dead at once: they are
removed one after another (registration order); each removal requeues or
fails what that worker held and then hands pending messages to free slots of
workers that are *not* among the dead of this tick. ``CoreMachine`` explores
that case; ``OneDeathPerTickMachine`` lets at most one worker die per tick,
so all other checks keep running while the core mishandles simultaneous
deaths (see test_queue.py::test_simultaneous_deaths_do_not_hand_a_retry_
to_a_dead_worker).
"""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sqm.core import (
    COMPLETED,
    FAILED,
    OUT_BYE,
    OUT_DISPATCH,
    OUT_ENDED,
    OUT_FAIL,
    OUT_HEARTBEAT,
    OUT_WATCH,
    Message,
    QueueCore,
    as_tuple,
)

pytestmark = pytest.mark.timeout(120)

HEARTBEAT = 1.0
LIVENESS = 3
REPORT_EVERY = 4.0  # heartbeats between a watched worker's reports (only told to it)
MAX_PENDING = 6
T0 = 1_000_000.0

FAIL_KINDS = {"Malformed", "Expired", "QueueFull", "WorkerLost", "BrokerShutdown", "Purged"}


# --------------------------------------------------------------------------- model


class MWorker:
    """The model's view of one registered worker connection."""

    def __init__(self, rid: bytes, slots: int, now: float, watched: bool) -> None:
        self.rid = rid
        self.slots = slots
        self.free = slots
        self.inflight: dict[Message, None] = {}  # ordered set
        self.heard = now  # last traffic from it
        self.watched = watched
        self.detached = False  # its connection closed: no new work until HELLO
        self.detached_at = 0.0
        self.last_sent = now
        self.alive = True
        self.leaving = False
        self.tasks_done = 0
        self.parked = 0  # slots handed back with NACK, until CREDIT


class MMsg:
    """The model's view of one submitted message."""

    def __init__(self, msg: Message, order: int, retries: int) -> None:
        self.msg = msg
        self.order = order  # submission order among accepted messages
        self.retries = retries
        self.state = "new"
        self.worker: MWorker | None = None
        self.deliveries = 0


class Model:
    def __init__(self, now: float) -> None:
        self.now = now
        self.workers: dict[bytes, MWorker] = {}
        self.idle: list[MWorker] = []  # one entry per free slot, longest idle first
        self.pending: list[MMsg] = []
        self.live: dict[bytes, MMsg] = {}  # id -> pending or in-flight message
        self.info: dict[Message, MMsg] = {}
        self.seq = 0
        self.last_sweep = now
        self.dying: set[bytes] = set()
        self.expected: list[tuple] = []
        self.assigned = self.completed = self.failed = 0
        self.expired = self.rejected = self.redelivered = self.malformed = 0
        self.dispatching = True  # False while drained

    # -- helpers
    def key(self, mm: MMsg) -> tuple[int, int]:
        return (mm.msg.priority, mm.order)

    def fail(self, mm: MMsg, kind: str) -> None:
        mm.state = "ended"
        mm.worker = None
        self.expected.append(("F", mm.msg, kind))

    def dispatch(self, w: MWorker, mm: MMsg) -> None:
        mm.state = "inflight"
        mm.worker = w
        mm.deliveries += 1
        w.inflight[mm.msg] = None
        w.free -= 1
        w.last_sent = self.now
        self.assigned += 1
        self.expected.append(("D", w.rid, mm.msg))

    def pop_pending(self) -> MMsg | None:
        for mm in sorted(self.pending, key=self.key):
            self.pending.remove(mm)
            d = mm.msg.deadline
            if d and d <= self.now:
                self.expired += 1
                del self.live[mm.msg.id]
                self.fail(mm, "Expired")
                continue
            return mm
        return None

    def next_idle(self) -> MWorker | None:
        while self.idle:
            w = self.idle.pop(0)
            if w.alive and w.rid not in self.dying:
                return w
        return None

    def assign(self) -> None:
        if not self.dispatching:
            return
        while self.pending and self.idle:
            w = self.next_idle()
            if w is None:
                return
            mm = self.pop_pending()
            if mm is None:
                self.idle.insert(0, w)
                return
            self.dispatch(w, mm)

    def remove_worker(self, w: MWorker) -> None:
        w.alive = False
        del self.workers[w.rid]
        self.idle = [x for x in self.idle if x is not w]
        held = sorted((self.info[m] for m in w.inflight), key=lambda mm: mm.order)
        w.inflight.clear()
        for mm in held:
            if mm.retries > 0:
                mm.retries -= 1
                self.redelivered += 1
                mm.state = "pending"
                mm.worker = None
                self.pending.append(mm)
            else:
                self.failed += 1
                del self.live[mm.msg.id]
                self.fail(mm, "WorkerLost")
        if self.pending and self.idle:
            self.assign()

    # -- events (each mirrors one QueueCore method)
    def submit(self, msg: Message, retries: int) -> MMsg:
        mm = MMsg(msg, 0, retries)
        self.info[msg] = mm
        if msg.id in self.live:
            self.malformed += 1
            self.fail(mm, "Malformed")
            return mm
        if msg.deadline and msg.deadline <= self.now:
            self.expired += 1
            self.fail(mm, "Expired")
            return mm
        if self.idle and not self.pending and self.dispatching:
            w = self.next_idle()
            if w is not None:
                self.seq += 1
                mm.order = self.seq
                self.live[msg.id] = mm
                self.dispatch(w, mm)
                return mm
        if len(self.pending) >= MAX_PENDING:
            self.rejected += 1
            self.fail(mm, "QueueFull")
            return mm
        self.seq += 1
        mm.order = self.seq
        mm.state = "pending"
        self.live[msg.id] = mm
        self.pending.append(mm)
        if self.idle:
            self.assign()
        return mm

    def dead(self, w: MWorker, now: float | None = None) -> bool:
        """At ``now`` (default the model's): silent ``HEARTBEAT * LIVENESS`` (any
        worker), or detached that long without a HELLO."""
        now = self.now if now is None else now
        ttl = HEARTBEAT * LIVENESS
        return now - w.heard > ttl or (w.detached and now - w.detached_at > ttl)

    def hello(self, rid: bytes, slots: int, watched: bool = False) -> None:
        old = self.workers.get(rid)
        if old is not None and not old.leaving:
            # Repeat hello: what it holds stays in flight; slots refreshed,
            # parked ones cleared, the free ones go to the back of the line.
            old.slots = max(slots, len(old.inflight))
            old.parked = 0
            old.heard = self.now
            old.detached = False
            old.watched = watched
            if watched:
                self.expected.append(("W", rid))
            old.free = old.slots - len(old.inflight)
            self.idle = [x for x in self.idle if x is not old] + [old] * old.free
            if self.pending:
                self.assign()
            return
        if old is not None:
            self.remove_worker(old)
        w = MWorker(rid, slots, self.now, watched)
        if watched:
            self.expected.append(("W", rid))
        self.workers[rid] = w
        self.idle.extend([w] * slots)
        if self.pending:
            self.assign()

    def done(self, rid: bytes, msg: Message, ok: bool) -> bool:
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard = self.now
        if msg not in w.inflight:
            return True
        del w.inflight[msg]
        mm = self.info[msg]
        mm.state = "ended"
        mm.worker = None
        del self.live[msg.id]
        w.tasks_done += 1
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        if w.leaving:
            if not w.inflight:
                self.remove_worker(w)
            return True
        if w.detached:  # it is reachable again: asked to register; no new work till then
            self.expected.append(("B", rid))
            return True
        w.free += 1
        if self.pending and self.dispatching:
            nxt = self.pop_pending()
            if nxt is None:
                self.idle.append(w)
            else:
                self.dispatch(w, nxt)
        else:
            self.idle.append(w)
        return True

    def drain(self) -> None:
        self.dispatching = False

    def resume(self) -> None:
        self.dispatching = True
        if self.pending and self.idle:
            self.assign()

    def nack(self, rid: bytes, msg: Message) -> bool:
        """The worker was full: the message goes back unassigned, its slot is parked."""
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard = self.now
        if msg not in w.inflight:
            return True
        del w.inflight[msg]
        mm = self.info[msg]
        mm.deliveries -= 1
        self.assigned -= 1
        mm.state = "pending"
        mm.worker = None
        self.pending.append(mm)
        w.parked += 1
        if w.leaving and not w.inflight:
            self.remove_worker(w)
        elif self.idle and self.dispatching:
            self.assign()
        return True

    def give_back(self, rid: bytes, msgs: list[Message]) -> bool:
        """Prefetch reclaim: the free slots park first, then each message as NACK."""
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard = self.now
        if w.free > 0:
            w.parked += w.free
            w.free = 0
            self.idle = [x for x in self.idle if x is not w]
        for msg in msgs:
            if rid not in self.workers:
                break
            self.nack(rid, msg)
        return True

    def credit(self, rid: bytes, n: int) -> bool:
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard = self.now
        n = max(0, min(n, w.parked))
        if not n or w.leaving or w.detached:
            return True
        w.parked -= n
        w.free += n
        self.idle.extend([w] * n)
        if self.pending and self.dispatching:
            self.assign()
        return True

    def seen(self, rid: bytes) -> bool:
        w = self.workers.get(rid)
        if w is None:
            return False
        w.heard = self.now
        return True

    def gone(self, rid: bytes) -> bool:
        """Its connection closed: detached (unless leaving or detached already)."""
        w = self.workers.get(rid)
        if w is None:
            return False
        self.detach(w)
        return True

    def detach(self, w: MWorker) -> None:
        """No new work; what it holds stays; told BYE (register again if you are back)."""
        if w.leaving or w.detached:
            return
        w.detached = True
        w.detached_at = self.now
        w.free = 0
        self.idle = [x for x in self.idle if x is not w]
        self.expected.append(("B", w.rid))

    def bye(self, rid: bytes) -> None:
        """A graceful leave: acknowledged at once; no new work; gone once idle."""
        self.expected.append(("B", rid))
        w = self.workers.get(rid)
        if w is None:
            return
        w.leaving = True
        w.detached = False
        w.free = 0
        self.idle = [x for x in self.idle if x is not w]
        if not w.inflight:
            self.remove_worker(w)

    def unreachable(self, rid: bytes, msg: Message) -> None:
        """A dispatch could not be sent: requeue it without using a retry, detach the worker."""
        w = self.workers.get(rid)
        if w is None or msg not in w.inflight:
            return
        del w.inflight[msg]
        mm = self.info[msg]
        mm.deliveries -= 1
        self.assigned -= 1
        mm.state = "pending"
        mm.worker = None
        self.pending.append(mm)
        self.detach(w)
        if self.pending and self.idle:
            self.assign()

    def tick(self) -> None:
        dead = [w for w in self.workers.values() if self.dead(w)]
        self.dying = {w.rid for w in dead}
        for w in dead:
            self.expected.append(("B", w.rid))  # a stopped process that resumes registers again
            self.remove_worker(w)
        self.dying = set()
        for w in self.workers.values():
            if not w.watched and self.now - w.last_sent >= HEARTBEAT:
                w.last_sent = self.now
                self.expected.append(("H", w.rid))
        if self.pending and self.now - self.last_sweep >= HEARTBEAT:
            self.last_sweep = self.now
            for mm in sorted(self.pending, key=self.key):
                d = mm.msg.deadline
                if d and d <= self.now:
                    self.pending.remove(mm)
                    self.expired += 1
                    del self.live[mm.msg.id]
                    self.fail(mm, "Expired")

    def drop_pending(self, kind: str = "BrokerShutdown") -> int:
        n = 0
        for mm in sorted(self.pending, key=self.key):
            n += 1
            self.failed += 1
            del self.live[mm.msg.id]
            self.fail(mm, kind)
        self.pending = []
        return n

    def shutdown(self) -> None:
        self.drop_pending()
        for w in self.workers.values():
            self.expected.append(("B", w.rid))


# --------------------------------------------------------------------------- machine


_KIND_NAMES = {"H": "HEARTBEAT", "B": "BYE", "W": "WATCH"}


def _fmt(entry: tuple) -> str:
    kind = entry[0]
    if kind == "D":
        m = entry[2]
        return f"DISPATCH {m.id!r}(prio={m.priority}) -> {entry[1]!r}"
    if kind == "F":
        return f"FAIL {entry[1].id!r} {entry[2]}"
    return f"{_KIND_NAMES[kind]} {entry[1]!r}"


def _marks_failure(fn):
    """Record a failed check so teardown does not pile more errors on top of it."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except BaseException:
            self.healthy = False
            raise

    return wrapper


class CoreMachine(RuleBasedStateMachine):
    core_class = QueueCore

    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        self.core = self.core_class(
            "q", T0, heartbeat=HEARTBEAT, liveness=LIVENESS, max_pending=MAX_PENDING,
            report_every=REPORT_EVERY,
        )
        self.model = Model(T0)
        self.ids = itertools.count(1)
        self.rids = itertools.count(1)
        self.known_rids: list[bytes] = []
        self.submitted: list[Message] = []
        self.ends: dict[Message, list[str]] = {}
        # Ended events (track_ends on): one per accepted message, when it ends
        self.core.track_ends = True
        self.accepted: set[Message] = set()
        self.ended: dict[Message, list[str]] = {}
        self.dispatches = 0
        self.steps = 0
        self.stopped = False

    @initialize()
    def start(self) -> None:
        assert self.core.outbox == []

    # ---------------------------------------------------------------- plumbing

    @property
    def now(self) -> float:
        return self.model.now

    def _holders(self) -> dict[Message, tuple[bytes, object]]:
        return {m: (rid, w) for rid, w in self.core.workers.items() for m in w.in_flight.values()}

    @_marks_failure
    def _run(self, label: str, call, *, dying: frozenset[bytes] = frozenset(), expect=None,
             released: Message | list[Message] | None = None,
             ending: Message | set[Message] | None = None):
        """Call the core, then check its outbox against the model's expectation.

        ``released`` is a message the call takes off its worker (NACK, a
        failed send): it may be dispatched again by the same call. ``ending`` is a message the
        caller already recorded as ended by this call (a worker's DONE).
        """
        before = self._holders()
        for m in released if isinstance(released, list) else [released]:
            before.pop(m, None)
        endings = ending if isinstance(ending, (set, frozenset)) else {ending}
        result = call()
        actual_raw = [as_tuple(e) for e in self.core.outbox]
        self.core.outbox.clear()
        actual: list[tuple] = []
        ends_before = {m: list(v) for m, v in self.ends.items() if m not in endings}
        ended_now: list[tuple[Message, str]] = []
        for e in actual_raw:
            if e[0] == OUT_ENDED:
                ended_now.append((e[1], e[2]))
            elif e[0] == OUT_DISPATCH:
                _, rid, msg = e
                actual.append(("D", rid, msg))
                self.dispatches += 1
                assert rid not in dying, (
                    f"{label}: {msg.id!r} dispatched to {rid!r}, a worker this very tick "
                    f"found dead (silent past heartbeat*liveness)"
                )
                d = msg.deadline
                assert not (d and d <= self.now), (
                    f"{label}: {msg.id!r} dispatched at {self.now} with deadline {d}"
                )
                if msg in before:
                    hrid, hobj = before[msg]
                    assert self.core.workers.get(hrid) is not hobj, (
                        f"{label}: {msg.id!r} dispatched to {rid!r} while still in flight on "
                        f"live worker {hrid!r}"
                    )
            elif e[0] == OUT_FAIL:
                _, msg, kind, text = e
                assert kind in FAIL_KINDS, e
                assert isinstance(text, str) and text, f"OUT_FAIL without a reason: {e}"
                actual.append(("F", msg, kind))
                self._end(msg, kind)
            elif e[0] == OUT_HEARTBEAT:
                actual.append(("H", e[1]))
            elif e[0] == OUT_BYE:
                actual.append(("B", e[1]))
            elif e[0] == OUT_WATCH:
                w = self.core.workers.get(e[1])
                assert w is None or w.report_s == REPORT_EVERY * HEARTBEAT, e
                actual.append(("W", e[1]))
            else:  # pragma: no cover - unknown outbox kind
                raise AssertionError(f"unknown outbox entry {e!r}")
        self._check_batches(label, actual)
        expected = self.model.expected
        self.model.expected = []
        if actual != expected:
            lines = [f"{label}: outbox differs from the model (time {self.now - T0:+.2f})"]
            for i in range(max(len(actual), len(expected))):
                a = _fmt(actual[i]) if i < len(actual) else "-"
                x = _fmt(expected[i]) if i < len(expected) else "-"
                mark = "  " if a == x else "!!"
                lines.append(f"{mark} core: {a:<45} model: {x}")
            raise AssertionError("\n".join(lines))
        self._check_ended_events(label, ended_now, ends_before)
        if expect is not None:
            assert result == expect, f"{label} returned {result!r}, expected {expect!r}"
        return result

    def _check_batches(self, label: str, actual: list[tuple]) -> None:
        """The step's dispatches as the server sends them: one DISPATCH per worker."""
        groups: dict[bytes, list[Message]] = {}
        for e in actual:
            if e[0] == "D":
                groups.setdefault(e[1], []).append(e[2])
        for rid, msgs in groups.items():
            if len(msgs) > 1:
                event("several messages to one worker in one step")
            w = self.core.workers.get(rid)
            assert len({m.id for m in msgs}) == len(msgs), (
                f"{label}: one DISPATCH to {rid!r} names a message twice: {[m.id for m in msgs]}")
            if w is None or not w.alive:
                continue  # removed later in the step (checked by the model)
            assert len(msgs) <= w.slots, (
                f"{label}: {len(msgs)} messages to {rid!r} in one DISPATCH, {w.slots} slot(s)")
            for m in msgs:
                if m.worker is w:
                    assert w.in_flight.get(m.id) is m, (
                        f"{label}: {m.id!r} batched to {rid!r} but not in flight there")

    def _check_ended_events(self, label: str, ended_now: list[tuple[Message, str]],
                            ends_before: dict[Message, list[str]]) -> None:
        """Each Ended names an accepted message that ended in this very call, with its outcome."""
        for msg, outcome in ended_now:
            assert msg in self.accepted, f"{label}: Ended for {msg.id!r}, never accepted"
            how = self.ends.get(msg, [])
            assert how and not ends_before.get(msg), (
                f"{label}: Ended for {msg.id!r}, which did not end in this call ({how})"
            )
            expected = {"done-ok": COMPLETED, "done-failed": FAILED}.get(how[0], how[0])
            assert outcome == expected, f"{label}: {msg.id!r} ended {how[0]}, Ended says {outcome}"
            prev = self.ended.setdefault(msg, [])
            assert not prev, f"{label}: two Ended events for {msg.id!r}"
            prev.append(outcome)

    def _end(self, msg: Message, how: str) -> None:
        prev = self.ends.setdefault(msg, [])
        assert not prev, f"message {msg.id!r} ended twice: {prev[0]} then {how}"
        prev.append(how)

    # ---------------------------------------------------------------- rules
    # Rules are picked uniformly among those enabled, so rare events (purge,
    # bogus dones, shutdown) share one rule and the shutdown only comes late.

    @precondition(lambda self: not self.stopped)
    @rule(
        priority=st.integers(0, 2),
        retries=st.integers(0, 3),
        deadline=st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 3.5, 6.0])),
        oneway=st.booleans(),
    )
    def submit(self, priority: int, retries: int, deadline: float | None, oneway: bool) -> None:
        self.steps += 1
        mid = b"m%d" % next(self.ids)
        msg = Message(
            mid,
            b"origin",
            [mid],
            oneway=oneway,
            retries=retries,
            priority=priority,
            deadline=0.0 if deadline is None else self.now + deadline,
        )
        self.submitted.append(msg)
        self.model.submit(msg, retries)
        if self._run(f"submit({mid!r})", lambda: self.core.submit(self.now, msg)):
            self.accepted.add(msg)

    def _hello(self, label: str, rid: bytes, slots: int, asks: bool, watchable: bool) -> None:
        """HELLO: ``asks`` to be watched (``watch`` in it), over a connection sqm can
        watch or not; watched only when both."""
        self.model.hello(rid, slots, watched=asks and watchable)
        info = {"slots": slots, "id": rid.decode(), **({"watch": True} if asks else {})}
        self._run(
            f"{label}({rid!r}, slots={slots}, asks={asks}, watchable={watchable})",
            lambda: self.core.hello(self.now, rid, info, watchable=watchable),
        )

    @precondition(lambda self: not self.stopped)
    @rule(slots=st.integers(1, 3), asks=st.booleans(), watchable=st.booleans())
    def hello_new(self, slots: int, asks: bool, watchable: bool) -> None:
        self.steps += 1
        rid = b"w%d" % next(self.rids)
        self.known_rids.append(rid)
        self._hello("hello", rid, slots, asks, watchable)

    @precondition(lambda self: not self.stopped and self.known_rids)
    @rule(data=st.data(), slots=st.integers(1, 3), asks=st.booleans(), watchable=st.booleans())
    def hello_again(self, data, slots: int, asks: bool, watchable: bool) -> None:
        self.steps += 1
        rid = data.draw(st.sampled_from(self.known_rids), label="rid")
        self._hello("re-hello", rid, slots, asks, watchable)

    @precondition(lambda self: any(w.inflight for w in self.model.workers.values()))
    @rule(data=st.data(), ok=st.booleans())
    def done(self, data, ok: bool) -> None:
        # also allowed after shutdown: workers still finish what they hold
        self.steps += 1
        pairs = [(rid, m) for rid, w in self.model.workers.items() for m in w.inflight]
        rid, msg = data.draw(st.sampled_from(pairs), label="in flight")
        self._done(rid, msg, ok)

    def _done(self, rid: bytes, msg: Message, ok: bool) -> None:
        expect = self.model.done(rid, msg, ok)
        assert expect is True
        self._end(msg, "done-ok" if ok else "done-failed")
        self._run(
            f"done({rid!r}, {msg.id!r}, ok={ok})",
            lambda: self.core.done(self.now, rid, msg.id, ok),
            expect=expect,
            ending=msg,
        )

    @precondition(lambda self: any(w.inflight for w in self.model.workers.values()))
    @rule(data=st.data(), ok=st.booleans())
    def done_batch(self, data, ok: bool) -> None:
        """A multi-id DONE ``[SIG, R|F, id, id, ...]``: the server calls ``done`` per id
        in one step (one outbox flush). Some of its ids the worker does not hold: another
        worker's, already ended (also earlier in the same DONE) or unknown."""
        self.steps += 1
        holders = [rid for rid, w in self.model.workers.items() if w.inflight]
        rid = data.draw(st.sampled_from(holders), label="worker")
        held = list(self.model.workers[rid].inflight)
        mine = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=len(held),
                                  unique_by=id), label="ends")
        # never a pending one: a worker cannot end what it has not been sent
        # (nor a duplicate-id refusal of one it holds: same id, the held message's DONE)
        held_ids = {m.id for m in held}
        foreign = [m for m in self.submitted if m.id not in held_ids and (
            self.model.info[m].state == "ended"
            or any(m in w.inflight for w in self.model.workers.values()))]
        others: list[Message | None] = data.draw(
            st.lists(st.sampled_from([*foreign, *mine, None]), max_size=3), label="others")
        order: list[Message | None] = data.draw(st.permutations([*mine, *others]), label="order")
        ended: set[Message] = set()
        ids = []
        for m in order:
            ids.append(b"unknown" if m is None else m.id)
            w = self.model.workers.get(rid)
            if w is None:
                continue  # it left, and this DONE ended its last message: the rest is ignored
            if m is None:
                w.heard = self.now
                continue
            if m in w.inflight:
                self._end(m, "done-ok" if ok else "done-failed")
                ended.add(m)
            assert self.model.done(rid, m, ok) is True

        self._run(f"done_batch({rid!r}, {ids}, ok={ok})",
                  lambda: self.core.done_many(self.now, rid, ids, ok), expect=True, ending=ended)

    @precondition(lambda self: not self.stopped and self.known_rids)
    @rule(data=st.data())
    def bye(self, data) -> None:
        self.steps += 1
        rid = data.draw(st.sampled_from([*self.known_rids, b"stranger"]), label="rid")
        self.model.bye(rid)
        self._run(f"bye({rid!r})", lambda: self.core.bye(self.now, rid))

    @precondition(
        lambda self: not self.stopped and any(w.inflight for w in self.model.workers.values())
    )
    @rule(data=st.data())
    def unreachable(self, data) -> None:
        self.steps += 1
        pairs = [(rid, m) for rid, w in self.model.workers.items() for m in w.inflight]
        rid, msg = data.draw(st.sampled_from(pairs), label="in flight")
        self.model.unreachable(rid, msg)
        self.dispatches -= 1  # that dispatch never left sqm
        self._run(
            f"unreachable({rid!r}, {msg.id!r})",
            lambda: self.core.unreachable(self.now, rid, msg),
            released=msg,  # it never reached that worker: it may go to another at once
        )

    @precondition(lambda self: not self.stopped and self.known_rids)
    @rule(data=st.data())
    def gone(self, data) -> None:
        """A worker's connection closed (sqm's socket monitor said so): known or not,
        holding messages or not, watched or heartbeated."""
        self.steps += 1
        rid = data.draw(st.sampled_from([*self.known_rids, b"stranger"]), label="rid")
        expect = self.model.gone(rid)
        self._run(f"gone({rid!r})", lambda: self.core.gone(self.now, rid), expect=expect)

    @precondition(lambda self: not self.stopped)
    @rule(resume=st.booleans())
    def drain_or_resume(self, resume: bool) -> None:
        self.steps += 1
        if resume:
            self.model.resume()
            self._run("resume", lambda: self.core.resume(self.now))
        else:
            self.model.drain()
            self._run("drain", lambda: self.core.drain())

    @precondition(
        lambda self: not self.stopped and any(w.inflight for w in self.model.workers.values())
    )
    @rule(data=st.data())
    def nack(self, data) -> None:
        self.steps += 1
        pairs = [(rid, m) for rid, w in self.model.workers.items() for m in w.inflight]
        rid, msg = data.draw(st.sampled_from(pairs), label="in flight")
        expect = self.model.nack(rid, msg)
        self.dispatches -= 1  # a NACKed hand-over is not an assignment
        self._run(f"nack({rid!r}, {msg.id!r})", lambda: self.core.nack(self.now, rid, msg.id),
                  expect=expect, released=msg)

    @precondition(lambda self: not self.stopped and self.model.workers)
    @rule(data=st.data())
    def give_back(self, data) -> None:
        """GIVE_BACK: a worker's callback runs long; it hands back some of what it holds
        (maybe nothing, maybe ids it does not hold: another worker's, ended, pending)."""
        self.steps += 1
        rid = data.draw(st.sampled_from(sorted(self.model.workers)), label="rid")
        w = self.model.workers[rid]
        # (by message id: a refused duplicate shares the id of the message held)
        held_ids = {m.id for m in w.inflight}
        pool = list(w.inflight) + [m for m in self.submitted if m.id not in held_ids][:4]
        msgs = data.draw(st.lists(st.sampled_from(pool), unique_by=lambda m: m.id, max_size=3)
                         if pool else st.just([]), label="given back")
        held = [m for m in msgs if m in w.inflight]
        expect = self.model.give_back(rid, msgs)
        self.dispatches -= len(held)  # a given-back hand-over is not an assignment
        self._run(f"give_back({rid!r}, {[m.id for m in msgs]!r})",
                  lambda: self.core.give_back(self.now, rid, [m.id for m in msgs]),
                  expect=expect, released=held)

    @precondition(
        lambda self: not self.stopped and any(w.parked for w in self.model.workers.values())
    )
    @rule(data=st.data(), n=st.integers(0, 3))
    def credit(self, data, n: int) -> None:
        self.steps += 1
        rid = data.draw(
            st.sampled_from([r for r, w in self.model.workers.items() if w.parked]), label="rid"
        )
        expect = self.model.credit(rid, n)
        self._run(f"credit({rid!r}, {n})", lambda: self.core.credit(self.now, rid, n),
                  expect=expect)

    @precondition(lambda self: not self.stopped and self.model.workers)
    @rule(data=st.data())
    def seen(self, data) -> None:
        self.steps += 1
        rid = data.draw(st.sampled_from(list(self.model.workers)), label="rid")
        expect = self.model.seen(rid)
        self._run(f"seen({rid!r})", lambda: self.core.seen(self.now, rid), expect=expect)

    @precondition(lambda self: not self.stopped and self.model.workers)
    @rule(data=st.data())
    def seen_packed(self, data) -> None:
        """One process's packed beat (worker/beats.py): some workers, maybe an unknown id."""
        self.steps += 1
        rids = data.draw(st.lists(st.sampled_from(list(self.model.workers)), unique=True),
                         label="rids")
        names = [r.decode() for r in rids] + data.draw(
            st.lists(st.sampled_from(["nobody", "gone:1"]), max_size=2), label="unknown")
        expect = sum(self.model.seen(r) for r in rids)
        self._run(f"seen_ids({names!r})", lambda: self.core.seen_ids(self.now, names),
                  expect=expect)

    @precondition(lambda self: not self.stopped)
    @rule(
        dt=st.one_of(
            st.sampled_from([0.0, 0.5, 1.0, 2.9, 3.0, 3.1, 4.0, 7.0, 11.9, 12.0, 12.1]),
            st.floats(0.0, 13.0, allow_nan=False),
        )
    )
    def tick(self, dt: float) -> None:
        self.steps += 1
        self._tick(dt, frozenset())

    def _tick(self, dt: float, spared: frozenset[bytes]) -> None:
        self.model.now += dt
        for rid in spared:  # their heartbeats (and HELLO, if detached) arrive just before the tick
            mw = self.model.workers[rid]
            if mw.detached:
                self._hello("back", rid, mw.slots, mw.watched, True)
            expect = self.model.seen(rid)
            self._run(f"seen({rid!r})", lambda r=rid: self.core.seen(self.now, r), expect=expect)
        dying = frozenset(rid for rid, w in self.model.workers.items() if self.model.dead(w))
        self.model.tick()
        self._run(f"tick(+{dt})", lambda: self.core.tick(self.now), dying=dying)

    @precondition(lambda self: not self.stopped)
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            [
                "purge",
                "duplicate-id",
                "done-unknown-rid",
                "done-unknown-id",
                "done-other-worker",
                "shutdown",
            ]
        ),
    )
    def rare(self, data, kind: str) -> None:
        self.steps += 1
        live = list(self.model.workers)
        if kind == "purge":
            expect = self.model.drop_pending("Purged")
            self._run("purge", lambda: self.core.purge(self.now), expect=expect)
        elif kind == "duplicate-id":
            if not self.model.live:
                return
            mid = data.draw(st.sampled_from(sorted(self.model.live)), label="live id")
            msg = Message(mid, b"other-origin", [mid])
            self.submitted.append(msg)
            self.model.submit(msg, 0)
            self._run(f"submit duplicate {mid!r}", lambda: self.core.submit(self.now, msg))
        elif kind == "shutdown":
            if self.steps >= 15:  # at most one, and only late in a run
                self._shutdown()
        else:
            if kind == "done-unknown-rid" or not live:
                rid, mid = b"nobody", data.draw(st.sampled_from([b"m1", b"zzz"]), label="id")
            elif kind == "done-unknown-id":
                rid, mid = data.draw(st.sampled_from(live), label="rid"), b"no-such-id"
            else:
                rid = data.draw(st.sampled_from(live), label="rid")
                others = [
                    m.id for r, w in self.model.workers.items() if r != rid for m in w.inflight
                ]
                mid = data.draw(st.sampled_from(others), label="id") if others else b"no-such-id"
            # a done from a known worker is still traffic: it proves the worker alive
            expect = self.model.seen(rid)
            self._run(
                f"bogus done({rid!r}, {mid!r})",
                lambda: self.core.done(self.now, rid, mid, True),
                expect=expect,
            )

    @precondition(lambda self: self.stopped)
    @rule()
    def after_shutdown(self) -> None:
        assert self.core.pending == 0

    def _shutdown(self) -> None:
        self.stopped = True
        self.model.shutdown()
        self._run("shutdown", lambda: self.core.shutdown(self.now))

    # ---------------------------------------------------------------- invariants

    @invariant()
    @_marks_failure
    def check_model(self) -> None:
        self._check_state()
        self._check_counters()
        self._check_ends()

    def _check_state(self) -> None:
        core, model = self.core, self.model
        assert core.outbox == []
        assert core.pending == len(model.pending), (core.pending, len(model.pending))
        n_inflight = sum(len(w.inflight) for w in model.workers.values())
        assert core.in_flight == n_inflight, (core.in_flight, n_inflight)
        assert list(core.workers) == list(model.workers)
        assert core.watched == sum(w.watched for w in model.workers.values())
        seen_msgs: dict[bytes, bytes] = {}
        for rid, w in core.workers.items():
            mw = model.workers[rid]
            assert w.alive
            assert w.slots == mw.slots
            assert 0 <= w.free <= w.slots
            assert w.leaving == mw.leaving
            assert w.detached == mw.detached, rid
            assert w.watched == mw.watched, rid
            assert w.parked == mw.parked, (rid, w.parked, mw.parked)
            free = 0 if mw.leaving or mw.detached else w.slots - len(w.in_flight) - w.parked
            assert w.free == free, (rid, w.free, len(w.in_flight), w.parked)
            assert w.free == mw.free, (rid, w.free, mw.free)
            assert set(w.in_flight) == {m.id for m in mw.inflight}, rid
            for mid in w.in_flight:
                assert mid not in seen_msgs, (
                    f"{mid!r} in flight on two live workers: {seen_msgs[mid]!r} and {rid!r}"
                )
                seen_msgs[mid] = rid
            if core.pending > 0 and core.dispatching:
                assert w.free == 0, (
                    f"worker {rid!r} has {w.free} free slot(s) while {core.pending} pending"
                )

    def _check_counters(self) -> None:
        core, model = self.core, self.model
        assert core.assigned_total == self.dispatches == model.assigned
        assert core.redelivered_total == model.redelivered
        assert core.completed_total == model.completed
        assert core.failed_total == model.failed
        assert core.expired_total == model.expired
        assert core.rejected_total == model.rejected
        assert core.malformed_total == model.malformed
        for msg in self.submitted:
            mm = model.info[msg]
            if mm.state != "ended":
                assert msg.retries == mm.retries, (msg.id, msg.retries, mm.retries)
                assert msg.deliveries == mm.deliveries

    def _check_ends(self) -> None:
        for msg in self.submitted:
            ended = self.model.info[msg].state == "ended"
            assert (len(self.ends.get(msg, ())) == 1) == ended, (msg.id, self.ends.get(msg))
            # exactly one Ended per accepted message that has ended; none otherwise
            got = len(self.ended.get(msg, ()))
            assert got == (1 if ended and msg in self.accepted else 0), (msg.id, self.ended.get(msg))

    def teardown(self) -> None:
        if not self.healthy:
            return  # a step already failed; its error is the one to report
        if not self.stopped:
            self._shutdown()
        in_flight = {m for w in self.core.workers.values() for m in w.in_flight.values()}
        for msg in self.submitted:
            ends = self.ends.get(msg, [])
            if msg in in_flight:
                assert ends == [], (msg.id, ends)
            else:
                assert len(ends) == 1, f"{msg.id!r} not in flight but ended {ends}"
        assert self.core.pending == 0
        st_ = self.core.status(self.now)
        assert st_["pending"] == 0
        assert st_["in_flight"] == len(in_flight)
        assert st_["assigned_total"] == self.dispatches
        # the workers still finish what they hold; then every message has ended
        for rid, w in list(self.model.workers.items()):
            for msg in list(w.inflight):
                self._done(rid, msg, True)
        assert self.core.in_flight == 0
        for msg in self.submitted:
            assert len(self.ends.get(msg, [])) == 1, (msg.id, self.ends.get(msg))
            assert len(self.ended.get(msg, [])) == (msg in self.accepted), (msg.id, self.ended)


class OneDeathPerTickMachine(CoreMachine):
    """The same checks, with at most one worker found dead per tick.

    Heartbeats from all but one of the workers a tick would find dead arrive
    just before it. This keeps every other invariant under test even while
    :class:`CoreMachine` fails on simultaneous deaths.
    """

    @precondition(lambda self: not self.stopped)
    @rule(
        dt=st.one_of(
            st.sampled_from([0.0, 0.5, 1.0, 2.9, 3.0, 3.1, 4.0, 7.0, 11.9, 12.0, 12.1]),
            st.floats(0.0, 13.0, allow_nan=False),
        )
    )
    def tick(self, dt: float) -> None:
        self.steps += 1
        now = self.model.now + dt
        doomed = [rid for rid, w in self.model.workers.items() if self.model.dead(w, now)]
        self._tick(dt, frozenset(doomed[1:]))


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CoreMachine.TestCase.settings = settings(SETTINGS, max_examples=500)
OneDeathPerTickMachine.TestCase.settings = SETTINGS
TestQueueCoreStateMachine = CoreMachine.TestCase
TestQueueCoreOneDeathPerTick = OneDeathPerTickMachine.TestCase


# --------------------------------------------------------------------------- abilities

METHODS = ["a", "b", "c"]


class AbilitiesMachine(RuleBasedStateMachine):
    """Heterogeneous workers (each serves a subset of the methods, some all of them).

    Checked after every step, on the core's own state and outbox:

    - a message is never dispatched to a worker that does not serve its method;
    - no worker able to take work has a free slot while a message it can serve
      pends (dispatching on);
    - FIFO per method: a message dispatched in a step is older (priority,
      then submission order) than every message of its method still pending;
    - every accepted message ends exactly once (one Ended entry), forwarded
      steps included, and none is both ended and live.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.core = QueueCore("q", T0, heartbeat=HEARTBEAT, liveness=LIVENESS, max_pending=20)
        self.core.track_ends = True
        self.rids = itertools.count()
        self.mids = itertools.count()
        self.ended: dict[bytes, int] = {}
        self.accepted: set[bytes] = set()

    def _step(self, call) -> None:
        call()
        out = list(self.core.outbox)
        self.core.outbox.clear()
        sent = []
        for entry in out:
            kind = as_tuple(entry)[0]
            if kind == OUT_DISPATCH:
                sent.append(entry.msg)
                w = self.core.workers.get(entry.rid)
                assert w is not None, "dispatch to an unknown worker"
                assert w.methods is None or entry.msg.method in w.methods, (
                    f"{entry.msg.method!r} dispatched to a worker serving {w.methods}")
            elif kind == OUT_ENDED:
                self.ended[entry.msg.id] = self.ended.get(entry.msg.id, 0) + 1
                assert self.ended[entry.msg.id] == 1, f"{entry.msg.id!r} ended twice"
        pending = [m for m in self.core._live.values() if m.state == 0]
        for m in sent:
            for p in pending:
                if p.method == m.method:
                    assert (p.priority, p.seq) > (m.priority, m.seq), (
                        f"FIFO per method: {m.id!r} dispatched before older {p.id!r}")

    def _free_workers(self):
        return [w for w in self.core.workers.values() if w.free > 0]

    @invariant()
    def no_capable_worker_idle_while_work_pends(self) -> None:
        if not self.core.dispatching:
            return
        pending = {m.method for m in self.core._live.values() if m.state == 0}
        for w in self._free_workers():
            serves = pending if w.methods is None else pending & set(w.methods)
            assert not serves, f"worker {w.id} idle while {serves} pend"

    @invariant()
    def ends_exactly_once(self) -> None:
        live = set(self.core._live)
        assert not live & {mid for mid, n in self.ended.items() if n}
        assert self.accepted <= live | set(self.ended)

    @rule(methods=st.one_of(st.none(), st.sets(st.sampled_from(METHODS))),
          slots=st.integers(1, 2))
    def hello(self, methods, slots: int) -> None:
        rid = b"w%d" % next(self.rids)
        info = {"slots": slots, "id": rid.decode()}
        if methods is not None:
            info["methods"] = sorted(methods)
        self._step(lambda: self.core.hello(self.now, rid, info))

    @rule(method=st.sampled_from(METHODS), priority=st.integers(0, 2),
          deadline=st.one_of(st.none(), st.floats(0.5, 6.0)))
    def submit(self, method: str, priority: int, deadline) -> None:
        mid = b"m%d" % next(self.mids)
        m = Message(mid, b"origin", None, method=method.encode(), priority=priority,
                    deadline=self.now + deadline if deadline else 0.0)
        result: list[bool] = []
        self._step(lambda: result.append(self.core.submit(self.now, m)))
        if result[0]:
            self.accepted.add(mid)

    @rule(data=st.data(), ok=st.booleans())
    def done(self, data, ok: bool) -> None:
        held = [(w.rid, mid) for w in self.core.workers.values() for mid in w.in_flight]
        if held:
            rid, mid = data.draw(st.sampled_from(held))
            self._step(lambda: self.core.done(self.now, rid, mid, ok))

    @rule(data=st.data(), method=st.sampled_from(METHODS))
    def forward(self, data, method: str) -> None:
        held = [(w.rid, m) for w in self.core.workers.values() for m in w.in_flight.values()]
        if held:
            rid, m = data.draw(st.sampled_from(held))
            self._step(lambda: self.core.forward(self.now, rid, m.id, None,
                                                 method=method.encode(), size=0,
                                                 priority=m.priority))

    @rule(data=st.data(), methods=st.one_of(st.none(), st.sets(st.sampled_from(METHODS))))
    def abilities(self, data, methods) -> None:
        if self.core.workers:
            rid = data.draw(st.sampled_from(sorted(self.core.workers)))
            info = {} if methods is None else {"methods": sorted(methods)}
            self._step(lambda: self.core.abilities(self.now, rid, info))

    @rule(data=st.data())
    def bye(self, data) -> None:
        if self.core.workers:
            rid = data.draw(st.sampled_from(sorted(self.core.workers)))
            self._step(lambda: self.core.bye(self.now, rid))

    @rule(resume=st.booleans())
    def drain_or_resume(self, resume: bool) -> None:
        self._step(lambda: self.core.resume(self.now) if resume else self.core.drain())

    @rule(dt=st.sampled_from([0.1, 1.0, 2.0, 3.5]), beat=st.booleans())
    def tick(self, dt: float, beat: bool) -> None:
        self.now += dt
        if beat:
            for rid in list(self.core.workers):
                self.core.seen(self.now, rid)
        self._step(lambda: self.core.tick(self.now))


AbilitiesMachine.TestCase.settings = settings(SETTINGS, max_examples=400)
TestAbilitiesStateMachine = AbilitiesMachine.TestCase
