"""The core's operator controls, NACK/CREDIT, self-reports and metrics (pure, no I/O)."""

from __future__ import annotations

import pytest

from sqm.core import OUT_DISPATCH, OUT_FAIL, OUT_STOP, Message, QueueCore, as_tuple
from sqm.metrics import BOUNDS, Histogram

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0


def make_core(**kw) -> QueueCore:
    return QueueCore("jobs", T0, **kw)


def msg(mid: str, method: bytes = b"work", **kw) -> Message:
    return Message(mid.encode(), b"origin", [mid.encode()], method=method, **kw)


def hello(core: QueueCore, rid: bytes, slots: int = 1, now: float = T0) -> None:
    core.hello(now, rid, {"slots": slots, "id": rid.decode()})


def take(core: QueueCore) -> list[tuple]:
    """The outbox in the ``(OUT_*, fields...)`` shape, emptied."""
    out = [as_tuple(e) for e in core.outbox]
    core.outbox.clear()
    return out


def dispatched(out: list[tuple]) -> list[tuple[bytes, bytes]]:
    return [(e[1], e[2].id) for e in out if e[0] == OUT_DISPATCH]


# ------------------------------------------------------------------ drain / resume / purge


def test_drain_stops_dispatch_but_accepts_and_resume_dispatches_in_order():
    core = make_core()
    hello(core, b"w1")
    core.drain()
    assert core.submit(T0, msg("a")) and core.submit(T0, msg("b"))
    assert dispatched(take(core)) == [] and core.pending == 2
    assert core.status(T0)["draining"] is True
    core.resume(T0 + 1)
    assert dispatched(take(core)) == [(b"w1", b"a")]
    core.done(T0 + 2, b"w1", b"a")
    assert dispatched(take(core)) == [(b"w1", b"b")]
    assert core.status(T0)["draining"] is False


def test_drain_holds_a_freed_slot_and_new_workers():
    core = make_core()
    hello(core, b"w1")
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    take(core)
    core.drain()
    core.done(T0 + 1, b"w1", b"a")
    hello(core, b"w2")
    assert dispatched(take(core)) == []
    assert core.pending == 1 and core.in_flight == 0


def test_purge_fails_every_pending_message_back_and_keeps_in_flight():
    core = make_core()
    hello(core, b"w1")
    for m in "abc":
        core.submit(T0, msg(m))
    take(core)
    assert core.purge(T0) == 2
    out = take(core)
    assert sorted(e[1].id for e in out if e[0] == OUT_FAIL and e[2] == "Purged") == [b"b", b"c"]
    assert core.pending == 0 and core.in_flight == 1
    assert core.status(T0)["failed_total"] == 2


def test_stop_worker_sends_stop_to_that_worker_only():
    core = make_core()
    hello(core, b"w1")
    hello(core, b"w2")
    take(core)
    assert core.stop_worker("w2") is True
    assert take(core) == [(OUT_STOP, b"w2")]
    assert core.stop_worker("nobody") is False
    states = {w["id"]: w["state"] for w in core.status(T0)["workers"]}
    assert states == {"w1": "idle", "w2": "leaving"}


# ------------------------------------------------------------------ NACK / CREDIT


def test_nack_requeues_at_the_head_without_a_delivery_and_parks_the_slot():
    core = make_core()
    hello(core, b"w1")
    core.submit(T0, msg("a"))
    core.submit(T0, msg("b"))
    assert dispatched(take(core)) == [(b"w1", b"a")]
    assert core.nack(T0 + 1, b"w1", b"a") is True
    # the slot is parked: nothing goes back to w1, "a" is first in line again
    assert dispatched(take(core)) == []
    assert core.pending == 2 and core.in_flight == 0
    st = core.status(T0 + 1)
    assert st["assigned_total"] == 0 and st["nacked_total"] == 1
    hello(core, b"w2")
    assert dispatched(take(core)) == [(b"w2", b"a")]
    assert core._live[b"a"].deliveries == 1  # the NACKed hand-over did not count
    core.credit(T0 + 2, b"w1", 1)
    assert dispatched(take(core)) == [(b"w1", b"b")]


def test_credit_never_exceeds_what_was_parked():
    core = make_core()
    hello(core, b"w1")
    core.submit(T0, msg("a"))
    take(core)
    core.nack(T0, b"w1", b"a")
    core.credit(T0, b"w1", 50)
    out = take(core)
    assert dispatched(out) == [(b"w1", b"a")]
    for m in "bcd":
        core.submit(T0, msg(m))
    assert dispatched(take(core)) == []  # still one slot, busy with "a"
    assert core.credit(T0, b"stranger", 1) is False


# ------------------------------------------------------------------ self-report


def test_heartbeat_report_shows_in_status():
    core = make_core()
    hello(core, b"w1")
    assert core.report(T0 + 1, "w1", b'{"rss_bytes": 12345678, "nice": 5, "busy_s": 2.5,'
                                      b' "host": "h", "pid": 42}')  # kept raw until asked
    (w,) = core.status(T0 + 1)["workers"]
    assert (w["rss_bytes"], w["nice"], w["busy_s"], w["pid"]) == (12_345_678, 5, 2.5, 42)
    assert core.report(T0, "nobody", b"{}") is False


def test_report_keeps_worker_alive():
    core = make_core(heartbeat=1.0, liveness=3)
    hello(core, b"w1")
    core.report(T0 + 2.5, "w1", b"{}")
    core.tick(T0 + 4.0)
    assert b"w1" in core.workers  # 3 s after hello, but 1.5 s after its report


# ------------------------------------------------------------------ metrics


def test_latency_histograms_per_method_and_total():
    core = make_core()
    core.submit(T0, msg("a", b"fast"))
    core.submit(T0, msg("b", b"slow"))
    hello(core, b"w1", now=T0 + 0.5)  # a is dispatched after waiting 0.5 s
    take(core)
    core.done(T0 + 0.6, b"w1", b"a")  # a: waited 0.5, served 0.1
    take(core)
    core.done(T0 + 2.6, b"w1", b"b", ok=False)  # b: waited 0.6, served 2.0
    st = core.status(T0 + 3)
    fast, slow = st["methods"]["fast"], st["methods"]["slow"]
    assert (fast["assigned_total"], fast["completed_total"], fast["failed_total"]) == (1, 1, 0)
    assert (slow["assigned_total"], slow["completed_total"], slow["failed_total"]) == (1, 0, 1)
    assert fast["latency"]["service"]["count"] == 1
    assert 0.05 < fast["latency"]["service"]["p50"] <= 0.2
    assert 1.0 < slow["latency"]["service"]["p50"] <= 2.0
    total = st["latency"]
    assert total["queue_wait"]["count"] == 2 and total["service"]["count"] == 2
    assert total["service"]["sum"] == pytest.approx(2.1)
    assert total["queue_wait"]["sum"] == pytest.approx(1.1)
    assert total["service"]["buckets"][-1] == [float("inf"), 2]


def test_method_table_is_bounded():
    core = make_core(max_pending=10_000)
    for i in range(1_100):
        core.submit(T0, msg(f"m{i}", f"method-{i}".encode()))
    methods = core.status(T0)["methods"]
    assert len(methods) == 1_001 and methods["(other)"]["assigned_total"] == 0
    assert core.pending == 1_100


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_histogram_quantile_lands_in_the_right_bucket(q):
    h = Histogram()
    values = [0.001 * (i + 1) for i in range(1000)]  # 1 ms .. 1 s uniformly
    for v in values:
        h.record(v)
    exact = sorted(values)[int(q * len(values)) - 1]
    est = h.quantile(q)
    # within the bucket that holds the exact value
    lo = max([b for b in BOUNDS if b < exact], default=0.0)
    hi = min(b for b in BOUNDS if b >= exact)
    assert lo <= est <= hi
    assert h.count == 1000 and h.sum == pytest.approx(sum(values))
