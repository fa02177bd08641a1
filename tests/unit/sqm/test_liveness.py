"""When the core takes a worker for dead: heartbeated workers, watched ones, closed connections.

A *watched* worker asked for it in HELLO (``watch``) over a connection the
I/O layer can watch (``watchable``): sqm sends it no heartbeats and learns
of its connection closing (:meth:`QueueCore.gone`). Every worker still
heartbeats every interval, and any worker silent for 3 intervals is dead
(SPEC); a closed connection only detaches a worker (no new work) until it
says HELLO again or is silent / not back for 3 intervals. See sqm/liveness.py.
"""

from __future__ import annotations

import pytest

from sqm.core import (
    OUT_BYE,
    OUT_DISPATCH,
    OUT_FAIL,
    OUT_HEARTBEAT,
    OUT_WATCH,
    Message,
    QueueCore,
    as_tuple,
)

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0
HB = 1.0
REPORT_EVERY = 10.0  # a watched worker attaches its report every 10 beats (default: 30)


def make_core() -> QueueCore:
    return QueueCore("jobs", T0, heartbeat=HB, liveness=3, report_every=REPORT_EVERY)


def hello(core: QueueCore, rid: bytes, *, now: float = T0, asks: bool = True,
          watchable: bool = True, slots: int = 1) -> list[tuple]:
    info = {"id": rid.decode(), "slots": slots, **({"watch": True} if asks else {})}
    core.hello(now, rid, info, watchable=watchable)
    return take(core)


def msg(mid: str, **kw) -> Message:
    return Message(mid.encode(), b"origin", [mid.encode()], **kw)


def take(core: QueueCore) -> list[tuple]:
    out = [as_tuple(e) for e in core.outbox]
    core.outbox.clear()
    return out


def kinds(out: list[tuple], kind: int) -> list[tuple]:
    return [e for e in out if e[0] == kind]


def alive(core: QueueCore) -> set[bytes]:
    return set(core.workers)


def test_a_watched_worker_is_told_so_and_gets_no_heartbeats() -> None:
    core = make_core()
    assert hello(core, b"w1") == [(OUT_WATCH, b"w1")]
    assert hello(core, b"w2", asks=False) == []  # an older worker: heartbeated
    assert core.watched == 1 and core.workers[b"w1"].watched
    assert core.workers[b"w1"].report_s == REPORT_EVERY * HB
    beats = []
    for k in range(1, 9):
        core.tick(T0 + k * 0.25)
        beats += kinds(take(core), OUT_HEARTBEAT)
    assert beats and {e[1] for e in beats} == {b"w2"}


def test_a_connection_that_cannot_be_watched_is_heartbeated_even_when_asked() -> None:
    core = make_core()
    assert hello(core, b"w1", watchable=False) == []
    core.tick(T0 + HB)
    assert take(core) == [(OUT_HEARTBEAT, b"w1")]
    assert core.watched == 0


def test_any_worker_silent_for_three_intervals_dies_idle_or_busy_watched_or_not() -> None:
    core = make_core()
    hello(core, b"w1")  # watched, will be busy (longest idle)
    hello(core, b"w2", asks=False)  # heartbeated, idle
    hello(core, b"w3")  # watched, idle
    assert core.submit(T0, msg("a"))
    take(core)
    assert core.workers[b"w1"].in_flight
    for k in range(1, 6):  # all beat (w1 and w3 bare, by id) for 5 s: all stay
        assert core.seen_id(T0 + k, "w1") and core.seen_id(T0 + k, "w3")
        assert core.seen(T0 + k, b"w2")
        core.tick(T0 + k + 0.5)
    assert alive(core) == {b"w1", b"w2", b"w3"}
    core.tick(T0 + 7.9)  # silent 2.9 s
    assert alive(core) == {b"w1", b"w2", b"w3"}
    core.tick(T0 + 8.1)  # silent 3.1 s: every one of them dead, each told BYE
    assert alive(core) == set()
    out = take(core)
    assert {e[1] for e in kinds(out, OUT_BYE)} == {b"w1", b"w2", b"w3"}
    assert [(e[1].id, e[2], e[3]) for e in kinds(out, OUT_FAIL)] == [
        (b"a", "WorkerLost", "worker stopped heartbeating")]
    # for the I/O layer's one log line each: who, silent how long, holding what
    assert sorted((i, round(s, 1), n, silent) for i, s, n, silent in core.expired) == [
        ("w1", 3.1, 1, True), ("w2", 3.1, 0, True), ("w3", 3.1, 0, True)]


def test_a_report_is_kept_raw_and_counts_as_a_beat() -> None:
    core = make_core()
    hello(core, b"w1")
    assert core.report(T0 + 2.0, "w1", b'{"rss_bytes": 7}')
    w = core.workers[b"w1"]
    assert (w.report, w.report_at, w.heard_at) == (b'{"rss_bytes": 7}', T0 + 2.0, T0 + 2.0)
    row = core.status(T0 + 2.5)["workers"][0]
    assert (row["rss_bytes"], row["last_report_at"]) == (7, T0 + 2.0)
    core.report(T0 + 3.0, "w1", b"not json")  # decoded only for a status: shown as none
    assert core.status(T0 + 3.0)["workers"][0]["rss_bytes"] is None
    assert not core.report(T0 + 3.0, "nobody", b"{}")


def test_a_closed_connection_detaches_the_worker_and_a_hello_brings_it_back() -> None:
    core = make_core()
    hello(core, b"w1", slots=2)
    core.submit(T0, msg("a", retries=1))
    take(core)
    assert core.gone(T0 + 0.1, b"w1")
    assert take(core) == [(OUT_BYE, b"w1")]  # if it is already back: register again
    w = core.workers[b"w1"]
    assert w.detached and w.free == 0 and list(w.in_flight) == [b"a"]
    assert core.status(T0 + 0.1)["workers"][0]["state"] == "detached"
    core.submit(T0 + 0.2, msg("b"))  # no new work to a detached worker
    assert kinds(take(core), OUT_DISPATCH) == []
    core.seen_id(T0 + 1.0, "w1")
    hello(core, b"w1", now=T0 + 1.5, slots=2)  # reconnected: "a" stays with it, "b" goes to it
    assert not w.detached and list(w.in_flight) == [b"a", b"b"]
    assert core.redelivered_total == 0
    assert core.done(T0 + 2.0, b"w1", b"a") and core.done(T0 + 2.0, b"w1", b"b")
    assert core.completed_total == 2 and core.redelivered_total == 0
    assert not core.gone(T0 + 3.0, b"nobody")


def test_a_detached_worker_that_does_not_come_back_is_dropped_after_three_intervals() -> None:
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    core.submit(T0, msg("a", retries=1))
    core.submit(T0, msg("b"))
    take(core)
    core.seen_id(T0 + 0.5, "w1")
    core.seen_id(T0 + 0.5, "w2")
    assert core.gone(T0 + 0.6, b"w1") and core.gone(T0 + 0.6, b"w2")
    hello(core, b"w3", now=T0 + 3.0)
    core.seen_id(T0 + 1.5, "w2")  # w2 still beats: alive, but its connection is not back
    core.seen_id(T0 + 2.5, "w2")
    core.tick(T0 + 3.4)
    assert alive(core) == {b"w1", b"w2", b"w3"}
    take(core)
    core.tick(T0 + 3.6)  # w1 silent 3.1 s (killed): its retry goes to w3; w2 detached 3.0 s
    assert alive(core) == {b"w2", b"w3"}
    out = take(core)
    assert [(e[1], e[2].id) for e in kinds(out, OUT_DISPATCH)] == [(b"w3", b"a")]
    core.tick(T0 + 3.7)  # w2 detached 3.1 s without a HELLO: dropped, "b" lost
    out = take(core)
    assert alive(core) == {b"w3"}
    assert [(e[1].id, e[2], e[3]) for e in kinds(out, OUT_FAIL)] == [
        (b"b", "WorkerLost", "worker connection closed and it did not come back")]
    assert [(i, round(s, 1), n, silent) for i, s, n, silent in core.expired] == [
        ("w1", 3.1, 1, True), ("w2", 3.1, 1, False)]  # w2: detached 3.1 s, heard 1.2 s ago


def test_a_failed_dispatch_detaches_the_worker_but_keeps_what_it_holds() -> None:
    core = make_core()
    hello(core, b"w1", slots=2)
    hello(core, b"w2")
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    out = take(core)
    sent = [(e[1], e[2]) for e in kinds(out, OUT_DISPATCH)]
    w1_msgs = [m for rid, m in sent if rid == b"w1"]
    assert len(w1_msgs) >= 1
    held, failed = w1_msgs[0], w1_msgs[-1]
    core.unreachable(T0 + 0.1, b"w1", failed)
    w = core.workers[b"w1"]
    assert w.detached and failed.id not in w.in_flight
    if held is not failed:
        assert held.id in w.in_flight
    assert core.redelivered_total == 0


def test_a_detached_worker_ending_a_message_is_asked_to_register_and_gets_no_work() -> None:
    core = make_core()
    hello(core, b"w1")
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    take(core)
    core.gone(T0 + 0.1, b"w1")
    take(core)
    assert core.done(T0 + 0.2, b"w1", b"a")
    out = take(core)
    assert kinds(out, OUT_DISPATCH) == [] and kinds(out, OUT_BYE) == [(OUT_BYE, b"w1")]
    assert core.pending == 1 and core.completed_total == 1


def test_hello_again_switches_between_watched_and_heartbeated() -> None:
    core = make_core()
    hello(core, b"w1", asks=False)
    assert core.watched == 0
    assert hello(core, b"w1", now=T0 + 1) == [(OUT_WATCH, b"w1")]
    assert core.watched == 1 and core.workers[b"w1"].report_s == REPORT_EVERY * HB
    hello(core, b"w1", now=T0 + 2, asks=False)  # reconnected somewhere it cannot be watched
    assert core.watched == 0 and core.workers[b"w1"].report_s == 0.0
    core.tick(T0 + 3.5)
    assert kinds(take(core), OUT_HEARTBEAT) == [(OUT_HEARTBEAT, b"w1")]


def test_a_slower_worker_heartbeat_stretches_its_limit() -> None:
    core = make_core()
    core.hello(T0, b"w1", {"id": "w1", "heartbeat": 2.0, "watch": True}, watchable=True)
    assert take(core) == [(OUT_WATCH, b"w1")]
    w = core.workers[b"w1"]
    assert (w.ttl, w.report_s) == (6.0, REPORT_EVERY * 2.0)


def test_a_packed_beat_keeps_every_worker_it_names_alive_and_skips_unknown_ids() -> None:
    """One process's beat names all its workers (worker/beats.py): each one named is
    heard, an unknown id (gone, or not registered yet) is skipped as seen_id does,
    and a worker it no longer names dies after 3 silent intervals."""
    core = make_core()
    for rid in (b"w1", b"w2", b"w3"):
        hello(core, rid)
    for k in range(1, 6):
        names = ["w1", "nobody", "w2"] + (["w3"] if k < 3 else [])  # w3 left the list
        assert core.seen_ids(T0 + k, names) == (3 if k < 3 else 2)
        core.tick(T0 + k + 0.5)
    assert alive(core) == {b"w1", b"w2"}  # w3: last named at T0 + 2, dead after T0 + 5
    assert kinds(take(core), OUT_BYE) == [(OUT_BYE, b"w3")]
    assert core.seen_ids(T0 + 6, []) == 0
    assert "nobody" not in {w.id for w in core.workers.values()}
