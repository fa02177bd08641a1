"""A worker's side of a watched connection: when it reports, how it judges its broker.

sqm answers a HELLO that asks to be watched with ``[SQM1, H, interval-ms,
report-ms]`` and sends no heartbeats after it (sqm/liveness.py). The
worker then reports while busy, once when it goes idle, or every
``report-ms``; and judges that broker by its connection, not its silence.
"""

from __future__ import annotations

import time

import pytest

from sqm.protocol import HEARTBEAT, SIGNATURE
from worker.links import BrokerLink, ReportPlan

pytestmark = pytest.mark.timeout(30)

HB = 1.0


def test_a_heartbeated_broker_gets_a_report_every_beat() -> None:
    plan = ReportPlan(["a"], HB)
    assert [plan.due(t, False) for t in (1.0, 2.0, 3.0)] == [["a"], ["a"], ["a"]]


def test_a_watching_broker_gets_one_while_busy_and_once_idle_else_every_report_interval() -> None:
    plan = ReportPlan(["a", "b"], HB, rng=lambda: 0.0)
    assert plan.due(1.0, False) == ["a", "b"]
    plan.watch("a", 10.0, 1.0)  # "b" is an older sqm: heartbeated
    sent = {t: plan.due(float(t), False) for t in range(2, 12)}
    assert [t for t, due in sent.items() if "a" in due] == [11]  # idle: every 10 s
    assert all("b" in due for due in sent.values())
    assert plan.due(12.0, True) == ["a", "b"]  # a callback runs: every beat
    assert plan.due(13.0, True) == ["a", "b"]
    assert plan.due(14.0, False) == ["a", "b"]  # just gone idle: once more
    assert plan.due(15.0, False) == ["b"]
    plan.watch("a", None, 15.5)  # re-registered: heartbeated until sqm says it watches again
    assert plan.due(16.0, False) == ["a", "b"]


def test_the_first_idle_report_to_a_watching_broker_falls_anywhere_in_the_interval() -> None:
    firsts = []
    for phase in (0.0, 0.25, 0.5, 0.75):
        plan = ReportPlan(["a"], HB, rng=lambda p=phase: p)
        plan.watch("a", 10.0, 0.0)
        firsts.append(next(t for t in range(1, 12) if plan.due(float(t), False)))
    assert firsts == [10, 7, 5, 2]  # the first beat at or past 9.5 - 10 * phase (half a beat early)


def test_a_watched_link_is_never_silent_and_forgets_it_on_a_new_hello() -> None:
    link = BrokerLink("tcp://127.0.0.1:1", b"W1", heartbeat=HB, liveness=3)
    link.last_heard = 0.0
    assert link.silent(100.0, HB, 3)
    link.watch(10.0)
    assert link.watched and link.report_s == 10.0
    assert not link.silent(100.0, HB, 3)  # it sends nothing while we are idle
    link.watch(None)  # heartbeated again: silence counts from now, not from long ago
    assert not link.watched
    assert not link.silent(link.last_heard + 2.9, HB, 3)
    assert link.silent(link.last_heard + 3.1, HB, 3)


def test_the_session_reads_sqm_heartbeats_with_and_without_the_watch_frame() -> None:
    from worker.session import Session

    plan = ReportPlan(["tcp://127.0.0.1:1"], HB, rng=lambda: 0.0)
    session = Session.__new__(Session)  # only what on_control and hello read
    session.reports = plan
    session.heartbeat = HB
    link = BrokerLink("tcp://127.0.0.1:1", b"W1", heartbeat=HB, liveness=3)
    session.on_control(link, [SIGNATURE, HEARTBEAT, b"2000", b"20000"])
    assert link.watched and link.report_s == 20.0 and link.broker_heartbeat == 2.0
    now = time.monotonic()
    assert plan.due(now + 1.0, False) == []  # the next one in 20 s
    session.on_control(link, [SIGNATURE, HEARTBEAT, b"1000"])  # it heartbeats: not watching
    assert not link.watched and link.broker_heartbeat == 1.0
    assert plan.due(now + 2.0, False) == ["tcp://127.0.0.1:1"]
