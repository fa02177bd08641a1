"""The core's prefetch reclaim (pure, no I/O): when it asks a worker to give back, and
what a give-back does to the queue and the worker's slots."""

from __future__ import annotations

import math

import pytest

from sqm.core import Dispatch, Message, QueueCore, Reclaim

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0


def msg(mid: str) -> Message:
    return Message(mid.encode(), b"origin", [mid.encode()])


def setup(slots: int = 4, concurrency: int = 1, beat: bool = True,
          other: bool = True) -> QueueCore:
    """w1 under test; with ``other``, an idle w2 (one slot) after it in the line, so a
    give-back has somewhere to go (w1's slots come first: w2 gets nothing until they
    are taken)."""
    core = QueueCore("q", T0)
    core.hello(T0, b"w1", {"slots": slots, "id": "w1", "concurrency": concurrency})
    if beat:
        core.seen_id(T0, "w1", b"beat-1")  # its process's heartbeat connection
    if other:
        core.hello(T0, b"w2", {"slots": 1, "id": "w2"})
    core.outbox.clear()
    return core


def asks(core: QueueCore, now: float) -> list[Reclaim]:
    core.tick(now)
    out = [e for e in core.outbox if type(e) is Reclaim]
    core.outbox.clear()
    return out


def test_a_worker_that_ends_nothing_while_messages_wait_behind_it_is_asked():
    core = setup()
    for i in range(3):
        core.submit(T0, msg(f"m{i}"))  # 1 runs, 2 wait there
    T = core.reclaim_after
    assert core.timer_at == T0 + T
    assert asks(core, T0 + T / 2) == []
    assert asks(core, T0 + T) == [Reclaim(b"beat-1", "w1")]  # on its heartbeat connection
    assert core.reclaims_total == 1
    assert asks(core, T0 + 1.5 * T) == []  # once per `after`
    assert asks(core, T0 + 2 * T) == [Reclaim(b"beat-1", "w1")]  # still stuck: again


def test_a_worker_that_ends_messages_is_not_asked():
    core = setup()
    for i in range(3):
        core.submit(T0, msg(f"m{i}"))
    T = core.reclaim_after
    core.done(T0 + 0.9 * T, b"w1", b"m0")  # it moves (m3 fills the slot: still surplus)
    core.submit(T0 + 0.9 * T, msg("m3"))
    assert asks(core, T0 + T) == []
    assert asks(core, T0 + 1.8 * T) == []
    assert asks(core, T0 + 1.9 * T) == [Reclaim(b"beat-1", "w1")]  # silent since 0.9 T


def test_a_busy_worker_with_room_for_more_is_asked_once_to_park_its_slots():
    """Nothing waits behind its long callback yet, but sqm would queue more there:
    one ask (the worker answers with a GIVE_BACK of no ids, which parks its free slots)."""
    core = setup(slots=4, concurrency=2)
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))  # both run, 2 free slots
    T = core.reclaim_after
    assert asks(core, T0 + T) == [Reclaim(b"beat-1", "w1")]
    assert asks(core, T0 + 5 * T) == []  # once: nothing waits there
    core.done(T0 + 6 * T, b"w1", b"a")
    core.submit(T0 + 6 * T, msg("c"))  # busy again: a new stall, a new ask
    assert asks(core, T0 + 7 * T) == []  # it moved at 6 T: the check moves on
    assert asks(core, T0 + 8 * T) == [Reclaim(b"beat-1", "w1")]


def test_no_ask_with_a_free_turn_without_prefetch_or_without_a_heartbeat_connection():
    core = setup(slots=4, concurrency=2)
    core.submit(T0, msg("a"))  # one runs, one turn free: nothing can wait
    assert asks(core, T0 + 10) == []
    core = setup(slots=2, concurrency=2)  # no prefetch beyond its turns: nothing can queue
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    assert asks(core, T0 + 10) == []
    core = setup(slots=4, concurrency=1, beat=False)
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    assert asks(core, T0 + 10) == []  # no heartbeat connection known yet: nobody to ask
    assert core.reclaims_total == 0


def test_a_give_back_requeues_at_the_head_parks_the_slots_and_stops_the_asks():
    core = setup(slots=4)
    for i in range(6):
        core.submit(T0, msg(f"m{i}"))
    sent = [(e.rid, e.msg.id) for e in core.outbox if type(e) is Dispatch]
    assert sent[:4] == [(b"w1", b"m0"), (b"w1", b"m1"), (b"w1", b"m2"), (b"w1", b"m3")]
    core.outbox.clear()
    # w1 runs m0 for long; it gives back m1..m3 (w2 is busy with m4; m5 pending)
    assert core.give_back(T0 + 0.01, b"w1", [b"m1", b"m2", b"m3"])
    w1 = core.workers[b"w1"]
    assert list(w1.in_flight) == [b"m0"] and w1.parked == 3 and w1.free == 0
    assert core.pending == 4 and core.nacked_total == 3
    assert asks(core, T0 + 1) == []  # nothing waits behind m0 any more
    core.done(T0 + 1, b"w2", b"m4")  # w2 takes the head of the queue: m1, in order
    assert [(e.rid, e.msg.id) for e in core.outbox if type(e) is Dispatch] == [(b"w2", b"m1")]
    core.outbox.clear()
    core.done(T0 + 2, b"w1", b"m0")  # its DONE frees one slot: one message, not four
    assert [(e.rid, e.msg.id) for e in core.outbox if type(e) is Dispatch] == [(b"w1", b"m2")]
    core.credit(T0 + 2, b"w1", 99)  # CREDIT frees at most what was parked
    assert w1.parked == 0 and w1.free + len(w1.in_flight) == 4


def test_the_heartbeat_connection_named_in_hello_is_asked_before_any_beat():
    core = QueueCore("q", T0)
    core.hello(T0, b"w1", {"slots": 4, "id": "w1", "beat_id": b"B-beat".hex()})
    core.hello(T0, b"w0", {"slots": 1, "id": "w0"})  # somewhere for a give-back to go
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    core.outbox.clear()
    assert asks(core, T0 + core.reclaim_after) == [Reclaim(b"B-beat", "w1")]
    core.hello(T0 + 1, b"w2", {"slots": 4, "id": "w2", "beat_id": "not hex"})
    assert core.workers[b"w2"].beat_rid == b""  # a bad one is ignored: learnt from beats


def test_alone_it_is_not_asked_until_another_worker_has_room():
    """A give-back only helps if another worker could run the messages sooner: a
    worker alone is left alone (under CPU load a quick callback can end nothing for
    3 ms), and is asked at its next check once another worker joins."""
    core = setup(other=False)
    for i in range(3):
        core.submit(T0, msg(f"m{i}"))
    assert core.timer_at == math.inf, "alone, it is not even watched: no timer wakes sqm"
    T = core.reclaim_after
    for k in range(1, 6):
        assert asks(core, T0 + k * T) == []
    assert core.reclaims_total == 0
    core.hello(T0 + 5.5 * T, b"w2", {"slots": 1, "id": "w2"})  # watched from now on
    assert core.timer_at == pytest.approx(T0 + 6.5 * T)
    assert asks(core, T0 + 6.6 * T) == [Reclaim(b"beat-1", "w1")]


def test_not_asked_while_the_others_are_as_stuck():
    """Another worker's free slot counts only if it moves: a free turn, or a message
    ended within ``reclaim_after``. A spare slot behind its own long callback does not."""
    core = setup(other=False)
    core.hello(T0, b"w2", {"slots": 2, "id": "w2"})  # after w1 in the line
    for i in range(5):
        core.submit(T0, msg(f"m{i}"))  # w1: m0..m3 (m0 runs); w2: m4 runs, one spare slot
    w2 = core.workers[b"w2"]
    assert list(w2.in_flight) == [b"m4"] and w2.free == 1
    T = core.reclaim_after
    assert asks(core, T0 + T) == []
    assert asks(core, T0 + 2 * T) == []
    core.done(T0 + 2.5 * T, b"w2", b"m4")  # w2 moves (and is idle): w1 is asked
    assert asks(core, T0 + 3 * T) == [Reclaim(b"beat-1", "w1")]


def test_only_a_worker_that_serves_what_it_holds_counts():
    """A free worker of another method is no room for w1's messages."""
    core = QueueCore("q", T0)
    core.hello(T0, b"w1", {"slots": 4, "id": "w1", "methods": ["a"]})
    core.seen_id(T0, "w1", b"beat-1")
    core.hello(T0, b"w2", {"slots": 1, "id": "w2", "methods": ["b"]})
    for i in range(3):
        core.submit(T0, Message(b"m%d" % i, b"origin", [b"x"], method=b"a"))
    core.outbox.clear()
    T = core.reclaim_after
    assert asks(core, T0 + T) == []
    core.hello(T0 + 1.5 * T, b"w3", {"slots": 1, "id": "w3", "methods": ["b", "a"]})
    assert asks(core, T0 + 2 * T) == [Reclaim(b"beat-1", "w1")]


def test_once_alone_again_the_watch_stops():
    """The other worker leaves: the next check finds the stuck one alone, asks
    nothing and arms no further check (no timer wakes sqm every 3 ms for nothing)."""
    core = setup()
    for i in range(3):
        core.submit(T0, msg(f"m{i}"))
    T = core.reclaim_after
    assert core.timer_at == pytest.approx(T0 + T)
    core.bye(T0 + 0.5 * T, b"w2")
    assert asks(core, T0 + 1.1 * T) == []
    assert core.timer_at == math.inf
