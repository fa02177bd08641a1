"""Routing by method in :class:`sqm.core.QueueCore`: abilities, UnknownMethod, forward."""

from __future__ import annotations

import pytest

from sqm.core import OUT_DISPATCH, OUT_ENDED, OUT_FAIL, Message, QueueCore, as_tuple

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0


def make_core(**kw) -> QueueCore:
    return QueueCore("jobs", T0, heartbeat=1.0, liveness=3, **kw)


def msg(mid: str, method: str = "a", **kw) -> Message:
    return Message(mid.encode(), b"origin", [mid.encode()], method=method.encode(), **kw)


def hello(core: QueueCore, rid: str, methods: list[str] | None, slots: int = 1,
          now: float = T0) -> None:
    info: dict = {"slots": slots, "id": rid}
    if methods is not None:
        info["methods"] = methods
    core.hello(now, rid.encode(), info)


def take(core: QueueCore) -> list[tuple]:
    out = [as_tuple(e) for e in core.outbox]
    core.outbox.clear()
    return out


def dispatches(out: list[tuple]) -> list[tuple[str, str]]:
    return [(e[1].decode(), e[2].id.decode()) for e in out if e[0] == OUT_DISPATCH]


def fails(out: list[tuple]) -> list[tuple[str, str]]:
    return [(e[1].id.decode(), e[2]) for e in out if e[0] == OUT_FAIL]


def test_message_goes_only_to_a_worker_that_serves_its_method():
    core = make_core()
    hello(core, "wa", ["a"])
    hello(core, "wb", ["b"])
    core.submit(T0, msg("1", "b"))
    core.submit(T0, msg("2", "a"))
    assert dispatches(take(core)) == [("wb", "1"), ("wa", "2")]


def test_longest_idle_capable_worker_first():
    core = make_core()
    hello(core, "w1", ["a", "b"], now=T0)
    hello(core, "w2", ["a"], now=T0 + 1)
    hello(core, "w3", ["b"], now=T0 + 2)
    core.submit(T0 + 3, msg("1", "a"))  # w1 idle longest among a's
    core.submit(T0 + 3, msg("2", "b"))  # w1 busy: w3
    core.submit(T0 + 3, msg("3", "a"))  # w2
    assert dispatches(take(core)) == [("w1", "1"), ("w3", "2"), ("w2", "3")]


def test_fifo_per_method_and_priorities_across_methods():
    core = make_core()
    hello(core, "w", ["a", "b"])
    core.submit(T0, msg("busy", "a"))
    core.submit(T0, msg("a1", "a"))
    core.submit(T0, msg("b1", "b"))
    core.submit(T0, msg("a2", "a"))
    core.submit(T0, msg("b-high", "b", priority=0))
    take(core)
    order = []
    current = "busy"
    for _ in range(4):
        core.done(T0 + 1, b"w", current.encode())
        current = dispatches(take(core))[0][1]
        order.append(current)
    assert order == ["b-high", "a1", "b1", "a2"]


def test_a_worker_serving_another_method_stays_idle_while_this_one_pends():
    core = make_core()
    hello(core, "wa", ["a"])
    hello(core, "wb", ["b"])
    core.submit(T0, msg("1", "a"))
    core.submit(T0, msg("2", "a"))  # wa busy: waits, wb cannot take it
    assert dispatches(take(core)) == [("wa", "1")]
    assert core.pending == 1
    st = core.status(T0)
    assert st["methods"]["a"]["pending"] == 1 and st["methods"]["a"]["workers"] == 1
    assert st["methods"]["b"]["pending"] == 0 and st["methods"]["b"]["workers"] == 1
    assert sorted(w["methods"] for w in st["workers"]) == [["a"], ["b"]]


def test_unknown_method_fails_at_once_when_workers_exist():
    core = make_core()
    hello(core, "wa", ["a"])
    assert core.submit(T0, msg("1", "zzz")) is False
    assert fails(take(core)) == [("1", "UnknownMethod")]
    st = core.status(T0)
    assert st["failed_total"] == 1 and st["pending"] == 0


def test_unknown_method_waits_when_no_worker_is_registered():
    core = make_core()
    assert core.submit(T0, msg("1", "a", deadline=T0 + 5)) is True
    hello(core, "wb", ["b"])
    assert core.pending == 1 and not dispatches(take(core))  # still waiting, not failed
    hello(core, "wa", ["a"])
    assert dispatches(take(core)) == [("wa", "1")]


def test_hold_unknown_makes_new_messages_wait_until_their_deadline():
    core = make_core(hold_unknown=True)
    hello(core, "wb", ["b"])
    assert core.submit(T0, msg("1", "a", deadline=T0 + 2)) is True
    assert core.pending == 1 and not take(core)
    core.tick(T0 + 3)
    assert fails(take(core)) == [("1", "Expired")]


def test_waiting_message_keeps_waiting_when_the_last_capable_worker_leaves():
    core = make_core()
    hello(core, "wa", ["a"])
    core.submit(T0, msg("busy", "a"))
    core.submit(T0, msg("1", "a", deadline=T0 + 10))
    take(core)
    hello(core, "wb", ["b"])
    core.bye(T0 + 1, b"wa")
    core.done(T0 + 1, b"wa", b"busy")
    assert "wa" not in {w["id"] for w in core.status(T0 + 1)["workers"]}
    assert core.pending == 1 and not fails(take(core))
    hello(core, "wa2", ["a"], now=T0 + 2)
    assert dispatches(take(core)) == [("wa2", "1")]


def test_worker_that_advertises_nothing_serves_every_method():
    core = make_core()
    hello(core, "old", None)
    core.submit(T0, msg("1", "anything"))
    assert dispatches(take(core)) == [("old", "1")]
    assert core.status(T0)["workers"][0]["methods"] is None


def test_abilities_change_moves_free_slots_and_takes_what_pends():
    core = make_core()
    hello(core, "w", ["a"])
    hello(core, "x", ["x"])
    core.submit(T0, msg("1", "a"))
    core.submit(T0, msg("2", "a"))
    take(core)
    core.done(T0 + 1, b"w", b"1")
    assert dispatches(take(core)) == [("w", "2")]
    core.submit(T0 + 1, msg("3", "x"))
    core.submit(T0 + 1, msg("4", "x"))  # x busy with 3
    take(core)
    assert core.abilities(T0 + 2, b"w", {"methods": ["b", "x"]})
    core.done(T0 + 2, b"w", b"2")
    assert dispatches(take(core)) == [("w", "4")]
    assert core.submit(T0 + 3, msg("5", "a")) is False  # nobody serves a any more
    assert fails(take(core)) == [("5", "UnknownMethod")]
    st = core.status(T0 + 3)
    assert st["methods"]["b"]["workers"] == 1 and st["methods"]["x"]["workers"] == 2


def test_multi_method_worker_takes_the_oldest_over_its_methods():
    core = make_core()
    hello(core, "w", ["a", "b", "c"])
    core.submit(T0, msg("busy", "c"))
    for i, m in enumerate(["b", "a", "c", "a", "b"]):
        core.submit(T0, msg(f"{m}{i}", m))
    take(core)
    got = []
    current = "busy"
    while True:
        core.done(T0 + 1, b"w", current.encode())
        d = dispatches(take(core))
        if not d:
            break
        current = d[0][1]
        got.append(current)
    assert got == ["b0", "a1", "c2", "a3", "b4"]


def test_stale_idle_entries_stay_bounded():
    core = make_core()
    hello(core, "w", ["a", "b"], slots=2)
    for i in range(1000):
        core.submit(T0, msg(f"m{i}", "a"))
        core.done(T0, b"w", f"m{i}".encode())
        take(core)
    mq_b = core._mq[b"b"]
    assert len(mq_b.idle) <= 2 * mq_b.slots + 8


def test_forward_keeps_origin_deadline_and_id_and_ends_once():
    core = make_core()
    core.track_ends = True
    hello(core, "w1", ["step1"])
    hello(core, "w2", ["step2"])
    m = Message(b"x", b"caller", [b"x"], method=b"step1", deadline=T0 + 5, retries=2)
    core.submit(T0, m)
    take(core)
    nxt = core.forward(T0 + 1, b"w1", b"x", [b"x2"], method=b"step2", size=1, priority=1)
    assert nxt is not None and nxt.origin == b"caller" and nxt.deadline == T0 + 5
    assert nxt.retries == 2
    out = take(core)
    assert dispatches(out) == [("w2", "x")]
    assert not [e for e in out if e[0] == OUT_ENDED]  # the message goes on
    core.done(T0 + 2, b"w2", b"x")
    ended = [e for e in take(core) if e[0] == OUT_ENDED]
    assert len(ended) == 1
    st = core.status(T0 + 2)
    assert st["completed_total"] == 1 and st["forwarded_total"] == 1


def test_forward_past_the_deadline_fails_back_to_the_caller():
    core = make_core()
    hello(core, "w1", ["step1"])
    hello(core, "w2", ["step2"])
    core.submit(T0, Message(b"x", b"caller", [b"x"], method=b"step1", deadline=T0 + 1))
    take(core)
    core.forward(T0 + 2, b"w1", b"x", [b"x2"], method=b"step2", size=1, priority=1)
    out = take(core)
    assert not dispatches(out)
    assert [(e[1].origin, e[2]) for e in out if e[0] == OUT_FAIL] == [(b"caller", "Expired")]


def test_forward_of_a_message_not_held_does_nothing():
    core = make_core()
    hello(core, "w1", ["a"])
    assert core.forward(T0, b"w1", b"nope", [b""], method=b"a", size=0, priority=1) is None
    assert core.forward(T0, b"ghost", b"nope", [b""], method=b"a", size=0, priority=1) is None
    assert not take(core)


def test_metrics_carry_per_method_pending_and_workers():
    from prometheus_client import CollectorRegistry, generate_latest

    from sqm.web.collector import SqmCollector

    core = make_core()
    hello(core, "wa", ["a"])
    hello(core, "wab", ["a", "b"])
    for i in range(3):
        core.submit(T0, msg(f"m{i}", "a"))
    snapshot = {"jobs": core.status(T0)}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SqmCollector(lambda: snapshot))
    text = generate_latest(reg).decode()
    assert 'sqm_method_pending{method="a",queue="jobs"} 1.0' in text
    assert 'sqm_method_workers{method="a",queue="jobs"} 2.0' in text
    assert 'sqm_method_workers{method="b",queue="jobs"} 1.0' in text
    assert 'sqm_method_pending{method="b",queue="jobs"} 0.0' in text
