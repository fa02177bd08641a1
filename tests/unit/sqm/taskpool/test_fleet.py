"""plan_fleet and recycle_due: which workers to retire and how many to start."""

from __future__ import annotations

from sqm.taskpool.fleet import Limits, Member, plan_fleet, recycle_due, waiting

MB = 1024 * 1024


def test_recycle_due_by_tasks_and_by_memory_after_a_message():
    assert not recycle_due(4, 10 * MB, Limits(max_tasks=5))
    assert recycle_due(5, 10 * MB, Limits(max_tasks=5))
    assert not recycle_due(0, 500 * MB, Limits(max_memory_mb=100))  # not before a message
    assert recycle_due(1, 101 * MB, Limits(max_memory_mb=100))
    assert not recycle_due(1, 99 * MB, Limits(max_memory_mb=100))
    assert not recycle_due(1000, 10**12, Limits())


def test_plan_keeps_capacity_while_retiring():
    members = [Member(1, 11, tasks_done=5), Member(2, 12, tasks_done=1), Member(3, 13)]
    plan = plan_fleet(3, members, Limits(max_tasks=5))
    assert plan.retire == [1] and plan.spawn == 1  # the replacement starts at once
    retiring = [Member(1, 11, tasks_done=6, retiring=True), Member(2, 12), Member(3, 13),
                Member(4, 14)]
    assert plan_fleet(3, retiring, Limits(max_tasks=5)).spawn == 0  # not retired twice
    assert plan_fleet(3, retiring, Limits(max_tasks=5)).retire == []


def test_plan_grows_and_shrinks_idle_first():
    assert plan_fleet(4, [Member(1, 11)], Limits()).spawn == 3
    members = [Member(1, 11, busy=True), Member(2, 12), Member(3, 13, busy=True), Member(4, 14)]
    plan = plan_fleet(2, members, Limits())
    assert plan.spawn == 0 and sorted(plan.retire) == [2, 4]


def test_waiting_counts_what_workers_prefetched_behind_their_turns():
    """The autoscaler's backlog: pending in sqm plus what each worker holds beyond
    what it runs at once (a worker alone keeps what it prefetched)."""
    status = {"pending": 2, "workers": [
        {"in_flight": 16, "concurrency": 1},  # one runs, 15 wait there
        {"in_flight": 3, "concurrency": 4},  # a free turn: nothing waits
        {"in_flight": 5, "concurrency": 2},
    ]}
    assert waiting(status) == 2 + 15 + 0 + 3
    assert waiting({"pending": 0, "workers": []}) == 0
