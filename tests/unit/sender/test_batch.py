"""The map() state machine (sender/_batch.py), driven by hand with a stand-in correlator."""

from __future__ import annotations

import time
from typing import Any

from sender._batch import DONE, EMIT, NEED, WAIT, Batch
from sender._correlator import OK, Outcome
from sqm.errors import Timeout


class Core:
    """Just what Batch uses of a Correlator: deadlines, forget, result."""

    def __init__(self) -> None:
        self.outstanding: dict[str, float | None] = {}
        self.forgotten: list[str] = []

    def forget(self, mid: str) -> None:
        self.outstanding.pop(mid, None)
        self.forgotten.append(mid)

    def result(self, outcome: Outcome) -> Any:
        return outcome.data.decode()


def send(batch: Batch, core: Core, mid: str, deadline: float) -> None:
    assert batch.step() == NEED
    core.outstanding[mid] = deadline
    batch.sent(mid)


def finish(batch: Batch, core: Core, mid: str, value: str) -> None:
    core.outstanding.pop(mid)
    batch.sink.finish(core, mid, Outcome(OK, data=value.encode()))


def test_fills_the_window_then_waits_then_emits_in_input_order() -> None:
    core = Core()
    batch = Batch(core, 2, ordered=True)
    far = time.monotonic() + 60
    send(batch, core, "a", far)
    send(batch, core, "b", far)
    assert batch.step() == WAIT and batch.next_deadline() == far
    finish(batch, core, "b", "B")
    assert batch.step() == NEED  # b's slot is free again; its item waits for a
    assert not batch.out
    batch.exhausted = True
    assert batch.step() == WAIT
    finish(batch, core, "a", "A")
    assert batch.step() == EMIT and list(batch.out) == ["A", "B"]
    batch.out.clear()
    assert batch.step() == DONE


def test_unordered_items_come_as_index_pairs() -> None:
    core = Core()
    batch = Batch(core, 5, ordered=False)
    send(batch, core, "a", time.monotonic() + 60)
    send(batch, core, "b", time.monotonic() + 60)
    batch.exhausted = True
    finish(batch, core, "b", "B")
    assert batch.step() == EMIT and list(batch.out) == [(1, "B")]


def test_a_passed_deadline_becomes_a_timeout_item() -> None:
    core = Core()
    batch = Batch(core, 5, ordered=True)
    send(batch, core, "a", time.monotonic() - 1)
    batch.exhausted = True
    assert batch.step() == EMIT
    item = batch.out.popleft()
    assert isinstance(item, Timeout) and core.forgotten == ["a"]
    assert batch.step() == DONE


def test_grace_keeps_an_item_waiting_for_sqms_verdict() -> None:
    core = Core()
    asked: list[str] = []

    def grace(mid: str, now: float) -> float:
        asked.append(mid)
        return 30.0

    batch = Batch(core, 5, ordered=True, grace=grace)
    past = time.monotonic() - 1
    send(batch, core, "a", past)
    batch.exhausted = True
    assert batch.step() == WAIT and asked == ["a"]
    assert batch.next_deadline() > time.monotonic() + 20  # the grace's end, not the past deadline
    core.outstanding.pop("a")
    batch.sink.finish(core, "a", Outcome(OK, data=b"Expired-ish", from_broker=True))
    assert batch.step() == EMIT and list(batch.out) == ["Expired-ish"]  # sqm's verdict


def test_a_worker_s_reply_in_the_grace_is_late_a_timeout() -> None:
    """Without FLAG_ACK a started message looks pending: its reply after the
    caller's deadline must not turn a Timeout into a result."""
    core = Core()
    batch = Batch(core, 5, ordered=True, grace=lambda mid, now: 30.0)
    send(batch, core, "a", time.monotonic() - 1)
    batch.exhausted = True
    assert batch.step() == WAIT
    core.outstanding.pop("a")
    batch.sink.finish(core, "a", Outcome(OK, data=b"too late"))
    assert batch.step() == EMIT
    (item,) = batch.out
    assert isinstance(item, Timeout)


def test_close_forgets_what_is_outstanding() -> None:
    core = Core()
    batch = Batch(core, 5, ordered=True)
    send(batch, core, "a", time.monotonic() + 60)
    batch.close()
    assert core.forgotten == ["a"] and not batch.inflight
