"""Example-based tests of :class:`sqm.core.QueueCore`: one behaviour per test."""

from __future__ import annotations

import pytest

from sqm.core import (
    OUT_BYE,
    OUT_DISPATCH,
    OUT_FAIL,
    OUT_HEARTBEAT,
    Message,
    QueueCore,
    as_tuple,
)

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0

SPEC_KEYS = {
    "queue",
    "started_at",
    "uptime_s",
    "pending",
    "in_flight",
    "workers",
    "workers_current",
    "workers_ever",
    "assigned_total",
    "completed_total",
    "failed_total",
    "utilization",
}
SPEC_WORKER_KEYS = {"id", "host", "pid", "state", "started_at", "idle_s", "tasks_done"}


def make_core(**kw) -> QueueCore:
    kw.setdefault("heartbeat", 1.0)
    kw.setdefault("liveness", 3)
    return QueueCore("jobs", T0, **kw)


def msg(mid: str, **kw) -> Message:
    return Message(mid.encode(), b"origin-" + mid.encode(), [mid.encode()], **kw)


def take(core: QueueCore) -> list[tuple]:
    """The outbox in the ``(OUT_*, fields...)`` shape, emptied."""
    out = [as_tuple(e) for e in core.outbox]
    core.outbox.clear()
    return out


def dispatches(out: list[tuple]) -> list[tuple[bytes, bytes]]:
    """(worker rid, message id) of each OUT_DISPATCH, in order."""
    return [(e[1], e[2].id) for e in out if e[0] == OUT_DISPATCH]


def fails(out: list[tuple]) -> list[tuple[bytes, str]]:
    """(message id, error type) of each OUT_FAIL, in order; reasons must be non-empty."""
    for e in out:
        if e[0] == OUT_FAIL:
            assert isinstance(e[3], str) and e[3].strip(), e
    return [(e[1].id, e[2]) for e in out if e[0] == OUT_FAIL]


def hello(core: QueueCore, rid: bytes, now: float = T0, slots: int = 1, **info) -> None:
    core.hello(now, rid, {"slots": slots, "id": rid.decode(), **info})


# --------------------------------------------------------------------------- status


def test_status_has_spec_keys_before_any_activity():
    core = make_core()
    st = core.status(T0 + 2.5)
    assert SPEC_KEYS <= st.keys()
    assert st["queue"] == "jobs"
    assert st["started_at"] == T0
    assert st["uptime_s"] == pytest.approx(2.5)
    assert st["pending"] == 0
    assert st["in_flight"] == 0
    assert st["workers"] == []
    assert st["workers_current"] == 0
    assert st["workers_ever"] == 0
    assert st["assigned_total"] == 0
    assert st["completed_total"] == 0
    assert st["failed_total"] == 0
    assert st["utilization"] == 0.0


def test_status_after_100_messages_to_3_workers():
    core = make_core()
    for i, rid in enumerate((b"w1", b"w2", b"w3")):
        hello(core, rid, host=f"host{i}", pid=1000 + i, started_at=T0 - 10 - i)
    for i in range(100):
        core.submit(T0, msg(f"m{i}"))
    # Workers finish in the order messages were handed out; each freed slot
    # immediately gets the next pending message.
    queue = dispatches(take(core))
    assert len(queue) == 3
    handled = []
    now = T0
    while queue:
        rid, mid = queue.pop(0)
        now += 0.01
        handled.append((rid, mid))
        assert core.done(now, rid, mid, True) is True
        queue.extend(dispatches(take(core)))
    assert [m for _, m in handled] == [f"m{i}".encode() for i in range(100)]  # FIFO

    st = core.status(now + 5)
    assert st["assigned_total"] == 100
    assert st["completed_total"] == 100
    assert st["failed_total"] == 0
    assert st["pending"] == 0
    assert st["in_flight"] == 0
    assert st["workers_current"] == 3
    assert st["workers_ever"] == 3
    workers = {w["id"]: w for w in st["workers"]}
    assert set(workers) == {"w1", "w2", "w3"}
    for w in st["workers"]:
        assert SPEC_WORKER_KEYS <= w.keys()
        assert isinstance(w["id"], str)
        assert w["state"] == "idle"
    assert sum(w["tasks_done"] for w in st["workers"]) == 100
    assert [workers[k]["tasks_done"] for k in ("w1", "w2", "w3")] == [34, 33, 33]
    assert workers["w2"]["host"] == "host1"
    assert workers["w2"]["pid"] == 1001
    assert workers["w2"]["started_at"] == T0 - 11
    # idle_s counts from each worker's last completion and grows with now
    idle_now = {w["id"]: w["idle_s"] for w in st["workers"]}
    later = {w["id"]: w["idle_s"] for w in core.status(now + 65)["workers"]}
    for wid in idle_now:
        assert idle_now[wid] >= 5.0
        assert later[wid] == pytest.approx(idle_now[wid] + 60)
    assert 0.0 < st["utilization"] <= 1.0


def test_status_busy_worker_and_utilization():
    core = make_core()
    hello(core, b"w1", now=T0)
    core.submit(T0, msg("a"))
    take(core)
    st = core.status(T0 + 4)
    (w,) = st["workers"]
    assert w["state"] == "busy"
    assert w["idle_s"] == 0.0
    assert st["in_flight"] == 1
    assert st["utilization"] == pytest.approx(1.0)
    core.done(T0 + 5, b"w1", b"a")
    st = core.status(T0 + 10)  # busy 5 s of 10 s alive
    assert st["utilization"] == pytest.approx(0.5)
    assert st["workers"][0]["idle_s"] == pytest.approx(5.0)
    assert st["workers"][0]["tasks_done"] == 1


def test_status_counts_failed_and_dead_workers():
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    core.submit(T0, msg("ok"))
    core.submit(T0, msg("bad"))
    take(core)
    core.done(T0 + 1, b"w1", b"ok", True)
    core.done(T0 + 1, b"w2", b"bad", False)
    core.bye(T0 + 2, b"w2")
    st = core.status(T0 + 2)
    assert st["completed_total"] == 1
    assert st["failed_total"] == 1
    assert st["workers_current"] == 1
    assert st["workers_ever"] == 2
    assert [w["id"] for w in st["workers"]] == ["w1"]


# --------------------------------------------------------------------------- submit


def test_queue_full_at_max_pending():
    core = make_core(max_pending=2)
    for m in ("a", "b", "c"):
        core.submit(T0, msg(m))
    out = take(core)
    assert fails(out) == [(b"c", "QueueFull")]
    assert core.pending == 2
    assert core.rejected_total == 1
    # room again once a worker takes one
    hello(core, b"w1")
    core.submit(T0, msg("d"))
    out = take(core)
    assert dispatches(out) == [(b"w1", b"a")]
    assert fails(out) == []
    assert core.pending == 2


def test_message_too_large():
    core = make_core(max_message_size=10)
    hello(core, b"w1")
    core.submit(T0, msg("big", size=11))
    core.submit(T0, msg("fits", size=10))
    out = take(core)
    assert fails(out) == [(b"big", "MessageTooLarge")]
    assert dispatches(out) == [(b"w1", b"fits")]
    assert core.status(T0)["assigned_total"] == 1


def test_duplicate_id_from_another_origin_is_malformed_and_original_survives():
    core = make_core()
    core.submit(T0, msg("x"))
    dup = Message(b"x", b"someone-else", [b"x"])
    assert core.submit(T0, dup) is False
    out = take(core)
    assert len(out) == 1
    assert out[0][0] == OUT_FAIL and out[0][1] is dup and out[0][2] == "Malformed"
    assert core.pending == 1
    hello(core, b"w1")
    assert dispatches(take(core)) == [(b"w1", b"x")]
    # still in flight: still a duplicate
    core.submit(T0, Message(b"x", b"someone-else", [b"x"]))
    assert fails(take(core)) == [(b"x", "Malformed")]
    # once it has ended, the id may be used again
    core.done(T0, b"w1", b"x")
    core.submit(T0, msg("x"))
    assert dispatches(take(core)) == [(b"w1", b"x")]


def test_resend_from_same_origin_is_acknowledged_and_kept_once():
    core = make_core()
    assert core.submit(T0, msg("x")) is True
    assert core.submit(T0, msg("x")) is True  # the sender re-sent after a reconnect
    assert take(core) == [] and core.pending == 1
    hello(core, b"w1", slots=2)
    assert dispatches(take(core)) == [(b"w1", b"x")]
    assert core.submit(T0, msg("x")) is True  # still in flight: not dispatched twice
    assert take(core) == [] and core.in_flight == 1


def test_deadline_already_passed_is_expired_on_submit():
    core = make_core()
    hello(core, b"w1")
    core.submit(T0, msg("late", deadline=T0))
    out = take(core)
    assert fails(out) == [(b"late", "Expired")]
    assert dispatches(out) == []
    assert core.expired_total == 1


def test_pending_message_never_dispatched_after_its_deadline():
    core = make_core()
    hello(core, b"w1")
    core.submit(T0, msg("first"))
    core.submit(T0, msg("soon", deadline=T0 + 1))
    core.submit(T0, msg("later"))
    take(core)
    core.done(T0 + 1, b"w1", b"first")  # deadline reached exactly now
    out = take(core)
    assert fails(out) == [(b"soon", "Expired")]
    assert dispatches(out) == [(b"w1", b"later")]


def test_tick_sweeps_expired_pending_messages():
    core = make_core()
    core.submit(T0, msg("a", deadline=T0 + 2))
    core.submit(T0, msg("b", deadline=T0 + 10))
    core.tick(T0 + 2.5)
    assert fails(take(core)) == [(b"a", "Expired")]
    assert core.pending == 1


def test_priorities_then_fifo():
    core = make_core()
    core.submit(T0, msg("low1", priority=2))
    core.submit(T0, msg("norm1", priority=1))
    core.submit(T0, msg("high1", priority=0))
    core.submit(T0, msg("norm2", priority=1))
    core.submit(T0, msg("high2", priority=0))
    core.submit(T0, msg("odd", priority=7))  # out of range: normal
    hello(core, b"w1", slots=6)
    got = [m for _, m in dispatches(take(core))]
    assert got == [b"high1", b"high2", b"norm1", b"norm2", b"odd", b"low1"]


# --------------------------------------------------------------------------- workers


def test_longest_idle_worker_gets_the_message():
    core = make_core()
    hello(core, b"w1", now=T0)
    hello(core, b"w2", now=T0 + 1)
    hello(core, b"w3", now=T0 + 2)
    core.submit(T0 + 3, msg("a"))
    core.submit(T0 + 3, msg("b"))
    assert dispatches(take(core)) == [(b"w1", b"a"), (b"w2", b"b")]
    core.done(T0 + 4, b"w2", b"b")
    core.done(T0 + 5, b"w1", b"a")
    take(core)
    # free since: w3 at +2, w2 at +4, w1 at +5
    for m in ("c", "d", "e"):
        core.submit(T0 + 6, msg(m))
    assert dispatches(take(core)) == [(b"w3", b"c"), (b"w2", b"d"), (b"w1", b"e")]


def test_no_free_slot_while_pending():
    core = make_core()
    for m in "abcde":
        core.submit(T0, msg(m))
    hello(core, b"w1", slots=3)
    assert dispatches(take(core)) == [(b"w1", b"a"), (b"w1", b"b"), (b"w1", b"c")]
    assert core.workers[b"w1"].free == 0
    assert core.pending == 2
    core.done(T0, b"w1", b"b")
    assert dispatches(take(core)) == [(b"w1", b"d")]
    assert core.workers[b"w1"].free == 0


def test_worker_death_redelivers_with_retries_then_worker_lost():
    core = make_core()
    hello(core, b"w1", now=T0)
    m = msg("m", retries=1)
    core.submit(T0, m)
    assert dispatches(take(core)) == [(b"w1", b"m")]
    hello(core, b"w2", now=T0 + 2)
    core.tick(T0 + 3.5)  # w1 silent for 3.5 s > 3 intervals; w2 heard 1.5 s ago
    out = take(core)
    assert dispatches(out) == [(b"w2", b"m")]
    assert fails(out) == []
    assert m.retries == 0
    assert core.redelivered_total == 1
    assert list(core.workers) == [b"w2"]
    core.tick(T0 + 6)  # w2 dies too: no retry left
    out = take(core)
    assert fails(out) == [(b"m", "WorkerLost")]
    assert core.failed_total == 1
    assert core.in_flight == 0
    assert core.status(T0 + 6)["assigned_total"] == 2


def test_no_retries_means_worker_lost_at_once():
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    core.submit(T0, msg("m"))
    take(core)
    core.seen(T0 + 3, b"w2")
    core.tick(T0 + 3.5)
    out = take(core)
    assert fails(out) == [(b"m", "WorkerLost")]
    assert dispatches(out) == []


def test_seen_keeps_a_worker_alive():
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    for t in (1, 2, 3, 4):
        assert core.seen(T0 + t, b"w1") is True
        core.tick(T0 + t + 0.5)
    assert list(core.workers) == [b"w1"]
    assert core.seen(T0 + 5, b"w2") is False


def test_seen_id_keeps_a_worker_alive():
    core = make_core()
    core.hello(T0, b"\x00\x01", {"id": "host:42", "slots": 1})
    assert core.seen_id(T0 + 2.5, "host:42") is True
    assert core.seen_id(T0 + 2.5, "nobody") is False
    core.tick(T0 + 4)
    assert list(core.workers) == [b"\x00\x01"]
    core.tick(T0 + 6)
    assert core.workers == {}


def test_redelivered_message_keeps_its_place():
    core = make_core()
    hello(core, b"w1")
    core.submit(T0, msg("old", retries=1))
    core.submit(T0, msg("new1"))
    core.submit(T0, msg("new2"))
    assert dispatches(take(core)) == [(b"w1", b"old")]
    core.unreachable(T0, b"w1", core.workers[b"w1"].in_flight[b"old"])
    hello(core, b"w2", slots=3)
    assert dispatches(take(core)) == [(b"w2", b"old"), (b"w2", b"new1"), (b"w2", b"new2")]


def test_a_repeat_hello_keeps_what_the_worker_holds():
    """A worker that says HELLO again (it reconnected, or answered BYEs to
    DONEs it queued while sqm restarted) still runs what it holds: nothing is
    failed or redelivered; only its slots are refreshed."""
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    core.submit(T0, msg("keep", retries=2))
    core.submit(T0, msg("lose"))
    assert dispatches(take(core)) == [(b"w1", b"keep"), (b"w2", b"lose")]
    hello(core, b"w2", now=T0 + 1)
    hello(core, b"w2", now=T0 + 1)
    out = take(core)
    assert fails(out) == [] and dispatches(out) == []
    assert core.workers[b"w2"].in_flight.keys() == {b"lose"}
    assert core.workers[b"w2"].free == 0  # its one slot is still busy
    hello(core, b"w1", now=T0 + 1, slots=2)  # one more slot: it takes what pends
    core.submit(T0 + 1, msg("next"))
    assert dispatches(take(core)) == [(b"w1", b"next")]
    assert core.workers[b"w1"].in_flight.keys() == {b"keep", b"next"}
    assert core.done(T0 + 2, b"w2", b"lose")
    assert core.status(T0 + 2)["workers_ever"] == 2


def test_unreachable_requeues_without_using_a_retry():
    core = make_core()
    hello(core, b"w1")
    m = msg("m", retries=1)
    core.submit(T0, m)
    take(core)
    core.unreachable(T0, b"w1", m)
    out = take(core)
    assert fails(out) == []
    assert core.pending == 1
    assert core.assigned_total == 0
    assert core.workers[b"w1"].detached  # no new work until it says HELLO again
    hello(core, b"w2")
    assert dispatches(take(core)) == [(b"w2", b"m")]
    assert m.retries == 1  # the retry is still there for a real death
    assert m.deliveries == 1
    assert core.redelivered_total == 0


def test_done_bookkeeping_and_bogus_dones():
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    take(core)
    assert core.done(T0, b"ghost", b"a") is False  # unknown worker
    assert core.done(T0, b"w1", b"zzz") is True  # known worker, unknown message
    assert core.done(T0, b"w1", b"b") is True  # b is on w2, not w1
    assert take(core) == []
    assert core.in_flight == 2
    assert core.completed_total == 0
    assert core.done(T0, b"w2", b"b", False) is True
    assert core.failed_total == 1
    assert core.in_flight == 1
    assert core.done(T0, b"w2", b"b") is True  # twice: ignored
    assert core.failed_total == 1
    assert core.completed_total == 0


def test_bye_idle_worker_leaves_at_once():
    core = make_core()
    hello(core, b"w1")
    core.bye(T0, b"w1")
    assert take(core) == [(OUT_BYE, b"w1")]
    assert core.workers == {}
    core.submit(T0, msg("a"))
    assert dispatches(take(core)) == []
    assert core.pending == 1
    core.bye(T0, b"nobody")  # unknown: just acknowledged
    assert take(core) == [(OUT_BYE, b"nobody")]


def test_bye_busy_worker_finishes_first_and_gets_nothing_new():
    core = make_core()
    hello(core, b"w1", slots=2)
    core.submit(T0, msg("a"))
    take(core)
    core.bye(T0, b"w1")
    assert take(core) == [(OUT_BYE, b"w1")]
    assert core.status(T0)["workers"][0]["state"] == "leaving"
    core.submit(T0, msg("b"))
    assert dispatches(take(core)) == []
    assert core.pending == 1
    assert core.done(T0 + 1, b"w1", b"a") is True
    assert take(core) == []
    assert core.completed_total == 1
    assert core.workers == {}
    assert core.pending == 1


def test_heartbeats_to_quiet_workers():
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    core.tick(T0 + 0.5)
    assert take(core) == []
    core.submit(T0 + 0.8, msg("a"))  # a dispatch counts as traffic to w1
    take(core)
    core.tick(T0 + 1.2)
    assert take(core) == [(OUT_HEARTBEAT, b"w2")]
    core.tick(T0 + 1.9)
    assert take(core) == [(OUT_HEARTBEAT, b"w1")]


def test_purge_fails_pending_only():
    core = make_core()
    hello(core, b"w1")
    for m in "abc":
        core.submit(T0, msg(m))
    take(core)
    assert core.purge(T0) == 2
    out = take(core)
    assert fails(out) == [(b"b", "Purged"), (b"c", "Purged")]
    assert core.pending == 0
    assert core.in_flight == 1
    assert core.failed_total == 2


def test_shutdown_fails_pending_says_bye_and_leaves_in_flight_alone():
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    for m in "abcd":
        core.submit(T0, msg(m))
    assert dispatches(take(core)) == [(b"w1", b"a"), (b"w2", b"b")]
    core.shutdown(T0 + 1)
    out = take(core)
    assert fails(out) == [(b"c", "BrokerShutdown"), (b"d", "BrokerShutdown")]
    assert sorted(e[1] for e in out if e[0] == OUT_BYE) == [b"w1", b"w2"]
    assert len(out) == 4
    assert core.pending == 0
    assert core.in_flight == 2
    assert core.failed_total == 2
    # in-flight messages still complete normally
    assert core.done(T0 + 2, b"w1", b"a") is True
    assert take(core) == []
    assert core.completed_total == 1


# --------------------------------------------------------------------------- bug


def test_simultaneous_deaths_do_not_hand_a_retry_to_a_dead_worker():
    """Two workers found dead in one tick: w1's message must go to a live worker.

    Bug: tick() removes the dead workers one at a time and assigns after each
    removal, so w1's requeued message is dispatched to w2's free slot (w2 is
    past its expiry and is removed later in the same tick). That burns the
    message's only retry and fails it with WorkerLost although w3 is alive
    and idle.
    """
    core = make_core()
    hello(core, b"w1", now=T0)
    hello(core, b"w2", now=T0)
    hello(core, b"w3", now=T0)
    m = msg("m", retries=1)
    core.submit(T0, m)
    assert dispatches(take(core)) == [(b"w1", b"m")]
    core.seen(T0 + 2.5, b"w3")
    core.tick(T0 + 3.5)  # w1 and w2 silent > 3 s; w3 heard 1 s ago
    out = take(core)
    assert list(core.workers) == [b"w3"]
    assert fails(out) == []
    assert dispatches(out) == [(b"w3", b"m")]
    assert core.in_flight == 1


# --------------------------------------------------------------------------- Ended events


def test_ended_events_only_with_track_ends_one_per_accepted_message():
    from sqm.core import Ended

    for track in (False, True):
        core = make_core(max_pending=2)
        core.track_ends = track
        hello(core, b"w1")
        core.submit(T0, msg("a"))  # dispatched at once
        core.submit(T0, msg("b"))  # pending
        core.submit(T0, msg("c"))  # pending
        core.submit(T0, msg("d"))  # refused: queue full, never accepted
        core.done(T0, b"w1", b"a", True)  # completed; b dispatched
        core.done(T0, b"w1", b"b", False)  # the worker's error reply; c dispatched
        core.drain()
        core.submit(T0, msg("e"))
        core.submit(T0, msg("f", deadline=T0 + 1))
        core.purge(T0)  # e and f purged
        core.tick(T0 + 10)  # w1 silent: c lost with it
        ended = [(e.msg.id, e.outcome) for e in core.outbox if type(e) is Ended]
        if track:
            assert ended == [(b"a", "completed"), (b"b", "failed"), (b"e", "Purged"),
                             (b"f", "Purged"), (b"c", "WorkerLost")]
        else:
            assert ended == []
