"""When the core takes a worker for dead: heartbeated workers, watched ones, closed connections.

A *watched* worker asked for it in HELLO (``watch``) over a connection the
I/O layer can watch (``watchable``): sqm gets no heartbeats from it but its
self-reports, sends it none, and learns of its death from its connection
closing (:meth:`QueueCore.gone`). See sqm/liveness.py.
"""

from __future__ import annotations

import pytest

from sqm.core import OUT_DISPATCH, OUT_FAIL, OUT_HEARTBEAT, OUT_WATCH, Message, QueueCore, as_tuple

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0
HB = 1.0
REPORT_EVERY = 10.0  # an idle watched worker reports every 10 heartbeats (the default: 30)


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


def test_an_idle_watched_worker_lives_on_its_reports_and_dies_after_three_report_intervals() -> None:
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2", asks=False)
    core.seen(T0 + 2.9, b"w2")
    core.tick(T0 + 3.5)  # w2, heartbeated and silent 3.5 s since HELLO... heard at 2.9
    assert alive(core) == {b"w1", b"w2"}
    core.tick(T0 + 6.0)  # w2 silent 3.1 s: dead; w1 is only idle
    assert alive(core) == {b"w1"}
    assert core.report(T0 + 20.0, "w1", {"rss_bytes": 1})
    core.tick(T0 + 49.9)
    assert alive(core) == {b"w1"}
    core.tick(T0 + 50.1)  # 3 report intervals (30 s) without one: hung
    assert alive(core) == set()


def test_a_busy_watched_worker_dies_after_three_silent_heartbeats_from_its_dispatch() -> None:
    core = make_core()
    hello(core, b"w1")
    core.report(T0 + 20.0, "w1", {})
    assert core.submit(T0 + 25.0, msg("a"))  # idle 5 s: fine; now it holds a message
    take(core)
    core.tick(T0 + 27.9)
    assert alive(core) == {b"w1"}
    core.tick(T0 + 28.1)  # no report for 3 heartbeats since it got work: stuck
    assert alive(core) == set()
    fails = [(e[1].id, e[2]) for e in kinds(take(core), OUT_FAIL)]
    assert fails == [(b"a", "WorkerLost")]


def test_a_busy_watched_worker_that_reports_each_beat_stays() -> None:
    core = make_core()
    hello(core, b"w1")
    core.submit(T0 + 1.0, msg("a"))
    take(core)
    for k in range(2, 20):
        core.report(T0 + k, "w1", {})
        core.tick(T0 + k + 0.5)
    assert alive(core) == {b"w1"}
    assert core.done(T0 + 20.0, b"w1", b"a")
    core.tick(T0 + 49.0)  # idle again: report intervals, not heartbeats
    assert alive(core) == {b"w1"}


def test_a_closed_connection_is_a_dead_worker_at_once() -> None:
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    core.submit(T0, msg("a", retries=1))
    core.submit(T0, msg("b"))
    out = take(core)
    held = {e[1]: e[2].id for e in kinds(out, OUT_DISPATCH)}
    assert held == {b"w1": b"a", b"w2": b"b"}
    hello(core, b"w3")
    assert core.gone(T0 + 0.1, b"w1")  # a retry left: to w3
    out = take(core)
    assert [(e[1], e[2].id) for e in kinds(out, OUT_DISPATCH)] == [(b"w3", b"a")]
    assert core.gone(T0 + 0.2, b"w2")  # none left: WorkerLost, with why
    out = take(core)
    assert [(e[1].id, e[2], e[3]) for e in kinds(out, OUT_FAIL)] == [
        (b"b", "WorkerLost", "worker connection closed")]
    assert not core.gone(T0 + 0.3, b"w2")  # once
    assert not core.gone(T0 + 0.3, b"nobody")
    assert alive(core) == {b"w3"} and core.watched == 1


def test_hello_again_switches_between_watched_and_heartbeated() -> None:
    core = make_core()
    hello(core, b"w1", asks=False)
    assert core.watched == 0
    assert hello(core, b"w1", now=T0 + 1) == [(OUT_WATCH, b"w1")]
    assert core.watched == 1 and core.workers[b"w1"].idle_ttl == 3 * REPORT_EVERY * HB
    hello(core, b"w1", now=T0 + 2, asks=False)  # reconnected somewhere it cannot be watched
    assert core.watched == 0 and core.workers[b"w1"].idle_ttl == 3 * HB
    core.tick(T0 + 3.5)
    assert kinds(take(core), OUT_HEARTBEAT) == [(OUT_HEARTBEAT, b"w1")]


def test_a_slower_worker_heartbeat_stretches_both_limits() -> None:
    core = make_core()
    core.hello(T0, b"w1", {"id": "w1", "heartbeat": 2.0, "watch": True}, watchable=True)
    assert take(core) == [(OUT_WATCH, b"w1")]
    w = core.workers[b"w1"]
    assert (w.ttl, w.report_s, w.idle_ttl) == (6.0, REPORT_EVERY * 2.0, 60.0)
