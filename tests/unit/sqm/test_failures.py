"""Failure handling in the core, step by step: scheduling, retry, time limits, cancel.

The random sequences are in test_properties_failures.py; these are the
cases worth reading one at a time (and the envelope's EXTRA tail).
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sqm import protocol
from sqm.core import FINISHED, PENDING, SCHEDULED, Cancel, Dispatch, Ended, Fail, Message, QueueCore
from sqm.web.collector import SqmCollector

T0 = 1_000_000.0


def core(**kw: object) -> QueueCore:
    c = QueueCore("q", T0, heartbeat=1.0, **kw)  # type: ignore[arg-type]
    c.track_ends = True
    return c


def take(c: QueueCore) -> list[object]:
    out = list(c.outbox)
    c.outbox.clear()
    return out


def msg(mid: str, **kw: object) -> Message:
    return Message(mid.encode(), b"origin", [mid.encode()], **kw)  # type: ignore[arg-type]


def dispatched(out: list[object]) -> list[bytes]:
    return [e.msg.id for e in out if type(e) is Dispatch]  # type: ignore[attr-defined]


def fails(out: list[object]) -> list[tuple[bytes, str]]:
    return [(e.msg.id, e.error) for e in out if type(e) is Fail]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- scheduling


def test_scheduled_message_waits_for_its_due_time_then_goes_by_priority():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    take(c)
    assert c.submit(T0, msg("busy"))  # occupies the one slot
    assert c.submit(T0, msg("low", not_before=T0 + 2, priority=2))
    assert c.submit(T0, msg("high", not_before=T0 + 2, priority=0))
    assert c.scheduled == 2 and c.pending == 0 and c.timer_at == T0 + 2
    assert dispatched(take(c)) == [b"busy"]
    c.tick(T0 + 1.99)
    assert c.scheduled == 2 and not dispatched(take(c))
    c.tick(T0 + 2)
    assert c.scheduled == 0 and c.pending == 2
    c.done(T0 + 2, b"w", b"busy")
    assert dispatched(take(c)) == [b"high"]
    assert c.status(T0 + 2)["scheduled"] == 0


def test_due_message_is_dispatched_at_once_to_a_free_slot():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    c.submit(T0, msg("a", not_before=T0 + 1))
    assert not dispatched(take(c))
    c.timers(T0 + 1)
    assert dispatched(take(c)) == [b"a"]


def test_expiry_wins_over_the_due_time():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    c.submit(T0, msg("a", not_before=T0 + 10, deadline=T0 + 3))
    assert c.timer_at == T0 + 3  # it comes up at its deadline, not at its due time
    c.tick(T0 + 3)
    out = take(c)
    assert fails(out) == [(b"a", "Expired")] and not dispatched(out)
    assert c.scheduled == 0


def test_scheduled_messages_count_towards_the_pending_bound():
    c = core(max_pending=2)
    assert c.submit(T0, msg("a", not_before=T0 + 5))
    assert c.submit(T0, msg("b"))
    assert not c.submit(T0, msg("c", not_before=T0 + 5))
    assert fails(take(c)) == [(b"c", "QueueFull")]


def test_restored_scheduled_message_goes_back_on_the_heap():
    c = core()
    c.restore(T0, msg("a", not_before=T0 + 4))
    assert c.scheduled == 1 and c.pending == 0
    c.tick(T0 + 4)
    assert c.pending == 1


def test_shutdown_fails_scheduled_messages_back():
    c = core()
    c.submit(T0, msg("a", not_before=T0 + 4))
    c.shutdown(T0)
    out = take(c)
    assert fails(out) == [(b"a", "BrokerShutdown")]
    assert [e.outcome for e in out if type(e) is Ended] == ["BrokerShutdown"]


# ---------------------------------------------------------------- retry


def test_retry_reschedules_with_one_more_attempt_then_gives_up():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    c.submit(T0, msg("a"))
    take(c)
    m = c.retry(T0 + 1, b"w", b"a", 0.5, 1, "ValueError: boom")
    assert m is not None and m.state == SCHEDULED and m.attempts == 1
    assert c.workers[b"w"].free == 1 and c.retried_total == 1
    c.tick(T0 + 1.49)
    assert not dispatched(take(c))
    c.tick(T0 + 1.5)  # the delay counts from when sqm learnt of the retry
    assert dispatched(take(c)) == [b"a"]
    c.retry(T0 + 2, b"w", b"a", 0.5, 1, "ValueError: boom again")
    out = take(c)
    assert fails(out) == [(b"a", "RetriesExhausted")]
    text = next(e.text for e in out if type(e) is Fail)  # type: ignore[attr-defined]
    assert "ValueError: boom again" in text
    assert m.state == FINISHED and m.attempts == 1


def test_retry_with_no_delay_may_go_to_another_worker():
    c = core()
    c.hello(T0, b"w1", {"slots": 1})
    c.submit(T0, msg("a"))
    take(c)
    c.hello(T0, b"w2", {"slots": 1})
    c.retry(T0, b"w1", b"a", 0.0, 3, "E: x")
    assert [e.rid for e in take(c) if type(e) is Dispatch] in ([b"w2"], [b"w1"])  # type: ignore[attr-defined]
    assert c.in_flight == 1


def test_retry_of_a_message_not_held_does_nothing():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    assert c.retry(T0, b"w", b"nope", 0.0, 3, "E: x") is None
    assert c.retry(T0, b"ghost", b"nope", 0.0, 3, "E: x") is None


# ---------------------------------------------------------------- time limits


def test_time_limit_fails_the_message_and_keeps_the_slot_until_the_worker_answers():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    c.submit(T0, msg("a", time_limit=2.0))
    c.submit(T0, msg("b"))
    take(c)
    c.tick(T0 + 2)
    out = take(c)
    assert fails(out) == [(b"a", "TimeLimitExceeded")]
    w = c.workers[b"w"]
    assert c.in_flight == 0 and w.free == 0 and b"a" in w.abandoned and c.pending == 1
    c.done(T0 + 5, b"w", b"a")  # the late DONE: no second end, the slot comes back
    out = take(c)
    assert dispatched(out) == [b"b"] and not [e for e in out if type(e) is Ended]
    assert c.completed_total == 0 and c.time_limited_total == 1


def test_the_smaller_of_the_message_and_worker_limits_applies():
    c = core()
    c.hello(T0, b"w", {"slots": 2, "time_limit": 1.0})
    c.submit(T0, msg("a", time_limit=5.0))
    c.submit(T0, msg("b"))
    take(c)
    c.tick(T0 + 1)
    assert sorted(fails(take(c))) == [(b"a", "TimeLimitExceeded"), (b"b", "TimeLimitExceeded")]


def test_a_message_done_in_time_is_not_failed_later():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    c.submit(T0, msg("a", time_limit=2.0))
    c.done(T0 + 1, b"w", b"a")
    take(c)
    c.tick(T0 + 3)
    assert not fails(take(c))


# ---------------------------------------------------------------- cancel


def test_cancel_pending_scheduled_running_and_ended():
    c = core()
    c.hello(T0, b"w", {"slots": 1})
    c.submit(T0, msg("run"))
    c.submit(T0, msg("pend"))
    c.submit(T0, msg("later", not_before=T0 + 9))
    take(c)
    assert c.cancel(T0, b"pend") and c.pending == 0
    assert c.cancel(T0, b"later") and c.scheduled == 0
    assert c.cancel(T0, b"run", b"origin")
    out = take(c)
    assert fails(out) == [(b"pend", "Cancelled"), (b"later", "Cancelled"), (b"run", "Cancelled")]
    assert [e.msg.id for e in out if type(e) is Cancel] == [b"run"]  # the worker is told
    assert not c.cancel(T0, b"run") and not c.cancel(T0, b"unknown")
    assert c.cancelled_total == 3 and c.failed_total == 0
    c.tick(T0 + 10)
    assert not dispatched(take(c))  # the cancelled scheduled one never comes up


def test_a_sender_cancels_only_its_own_messages():
    c = core()
    c.submit(T0, msg("a"))
    assert not c.cancel(T0, b"a", b"someone-else")
    assert c.cancel(T0, b"a", b"origin")


def test_cancelled_pending_message_is_skipped_by_dispatch():
    c = core()
    c.submit(T0, msg("a"))
    c.submit(T0, msg("b"))
    c.cancel(T0, b"a")
    take(c)
    c.hello(T0, b"w", {"slots": 2})
    assert dispatched(take(c)) == [b"b"]
    assert c.pending == 0 and c._live[b"b"].state != PENDING


# ---------------------------------------------------------------- metrics, envelope


def test_metrics_carry_scheduled_and_the_new_totals():
    c = core()
    c.submit(T0, msg("a", not_before=T0 + 5))
    c.submit(T0, msg("b"))
    c.cancel(T0, b"b")
    snapshot = {"q": c.status(T0)}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SqmCollector(lambda: snapshot))
    text = generate_latest(reg).decode()
    assert 'sqm_scheduled_messages{queue="q"} 1.0' in text
    assert 'sqm_messages_cancelled_total{queue="q"} 1.0' in text


def test_envelope_extra_tail_round_trip_and_retry_rewrite():
    plain = protocol.pack_envelope(0, 1, 1, 0.0, b"id", b"ipc:///x", b"m", b"json")
    assert protocol.read_extra(plain) == (0.0, 0.0, 0)
    env = protocol.pack_envelope(0, 1, 1, 0.0, b"id", b"ipc:///x", b"m", b"json",
                                 not_before=T0 + 1, time_limit=2.5)
    e = protocol.decode_envelope(env)
    assert (e.serializer, e.not_before, e.time_limit, e.attempts) == (b"json", T0 + 1, 2.5, 0)
    for base, limit in ((plain, 0.0), (env, 2.5)):
        again = protocol.decode_envelope(protocol.with_retry(base, T0 + 7, 3))
        assert (again.attempts, again.not_before, again.time_limit) == (3, T0 + 7, limit)
        assert again.serializer == b"json" and again.id == b"id"
    with pytest.raises(ValueError):
        protocol.read_head(env[:-1])  # the tail is counted in the length check
