"""Prefetch that gives work back: messages waiting behind a long callback go to sqm again.

Real sqm and worker processes: sqm sees a worker that holds more than it
runs at once end nothing for a while and asks it (on its heartbeat
connection) to give back what waits; the worker hands back (GIVE_BACK)
what it has not started; sqm puts it back at the head of the queue and
parks the worker's slots until they come back (CREDIT), so another worker
runs it meanwhile, and each message runs exactly once.
"""

from __future__ import annotations

import pytest

from sender import Sender
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(60)


def _starts(cluster) -> list[tuple[int, int]]:
    """(pid, i) of every callback start, in the order the workers logged them."""
    return [(e["pid"], e["payload"]["i"]) for e in read_log(cluster.log) if e["kind"] == "start"]


def test_messages_behind_a_long_callback_go_to_another_worker(cluster):
    cluster.serve("q")
    cluster.worker("q", "--prefetch", "4")
    with Sender("q", timeout=30) as s:
        long_id = s.submit("sleep", {"s": 4.0, "i": 0})
        short = [s.submit("sleep", {"s": 0.01, "i": i}) for i in (1, 2, 3)]
        wait_for(lambda: any(i == 0 for _p, i in _starts(cluster)), 10, "the long one started")
        st = cluster.status("q")
        assert st["workers"][0]["in_flight"] == 4 and st["nacked_total"] == 0, (
            "alone, it keeps them: nowhere better for them to go")
        busy_pid = _starts(cluster)[0][0]
        # A second worker joins: sqm asks the first to give back what waits behind
        # its long callback, and the second runs those while the first still runs.
        cluster.worker("q", "--prefetch", "4")
        replies = [s.receive(id=mid) for mid in short]
        assert {r["pid"] for r in replies} != {busy_pid}
        st = cluster.status("q")
        assert [e for e in read_log(cluster.log) if e["kind"] == "end" and e["payload"]["i"] == 0] == []
        assert st["nacked_total"] == 3 and st["reclaims_total"] >= 1
        first = next(w for w in st["workers"] if w["pid"] == busy_pid)
        assert first["in_flight"] == 1 and first["parked"] == 3, (
            "its slots park while the long callback runs")
        assert s.receive(id=long_id)["pid"] == busy_pid
    starts = _starts(cluster)
    assert sorted(i for _p, i in starts) == [0, 1, 2, 3], "each message ran exactly once"
    assert [p for p, i in starts if i != 0] and busy_pid not in [p for p, i in starts if i != 0]
    # The long callback ended: CREDIT gave the worker its slots back.
    wait_for(lambda: all(w["parked"] == 0 for w in cluster.status("q")["workers"]), 10,
             "no slot parked")


def test_a_worker_alone_keeps_what_waits_behind_a_long_callback(cluster):
    """One worker alone: sqm checks every 3 ms for a second while the long callback
    runs, and asks nothing (a give-back would only move the wait into sqm): the
    rest run after the long one, in order, each once."""
    cluster.serve("q")
    cluster.worker("q", "--prefetch", "3")
    with Sender("q", timeout=30) as s:
        ids = [s.submit("sleep", {"s": 1.0 if i == 0 else 0.01, "i": i}) for i in range(5)]
        results = [s.receive(id=mid) for mid in ids]
    assert [r["slept"] for r in results] == [1.0] + [0.01] * 4
    assert [i for _p, i in _starts(cluster)] == list(range(5)), "in order, each once"
    st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 5 and x, 10,
                  "5 completed")
    assert st["reclaims_total"] == 0 and st["nacked_total"] == 0
    assert st["workers"][0]["parked"] == 0 and st["pending"] == 0


def test_the_asyncio_runner_gives_back_what_waits_for_a_turn(cluster):
    """concurrency 2, prefetch 4: two long callbacks run, the two behind them go back."""
    cluster.serve("q")
    cluster.worker("q", "--concurrency", "2", "--prefetch", "4")
    with Sender("q", timeout=30) as s:
        long_ids = [s.submit("sleep", {"s": 3.0, "i": i}) for i in (0, 1)]
        short = [s.submit("sleep", {"s": 0.01, "i": i}) for i in (2, 3)]
        wait_for(lambda: len(_starts(cluster)) == 2, 10, "the two long ones started")
        busy_pid = _starts(cluster)[0][0]
        cluster.worker("q")
        assert {s.receive(id=mid)["pid"] for mid in short} != {busy_pid}
        assert [e for e in read_log(cluster.log) if e["kind"] == "end" and e["payload"]["i"] < 2] == []
        st = cluster.status("q")
        assert st["nacked_total"] == 2, "the two behind the long ones were given back"
        first = next(w for w in st["workers"] if w["pid"] == busy_pid)
        assert first["in_flight"] == 2 and first["parked"] == 2
        assert {s.receive(id=mid)["pid"] for mid in long_ids} == {busy_pid}
    assert sorted(i for _p, i in _starts(cluster)) == [0, 1, 2, 3], "each message ran exactly once"
    wait_for(lambda: all(w["parked"] == 0 for w in cluster.status("q")["workers"]), 10,
             "no slot parked")


def test_a_worker_of_two_brokers_serves_both_and_none_starves(cluster, rundir):
    """One worker (the asyncio runner) serves brokers A and B, callbacks of 20 ms, a
    Sender spreads over both: each broker's messages wait behind the other's callbacks
    in the worker (each broker sees it alone, so neither asks a give-back; one the
    worker was full for comes back as NACK, its slot by CREDIT): nothing expires."""
    a, b = f"ipc://{rundir}/a.sock", f"ipc://{rundir}/b.sock"
    cluster.serve("q", endpoint=a)
    cluster.serve("q", endpoint=b)
    w = cluster.worker("q", endpoint=f"{a},{b}", wait=False)
    for ep in (a, b):
        cluster.wait_workers("q", 1, endpoint=ep, proc=w)
    with Sender("q", endpoint=[a, b], timeout=8) as s:
        out = list(s.map("sleep", [{"s": 0.02, "i": i} for i in range(60)], max_concurrent=10))
    assert [r["slept"] if isinstance(r, dict) else r for r in out] == [0.02] * 60
    # A reply goes to the Sender directly, its DONE to sqm (maybe held a moment).
    sts = wait_for(lambda: (x := [cluster.status("q", endpoint=ep) for ep in (a, b)])
                   and sum(st["completed_total"] for st in x) == 60 and x, 10, "60 completed")
    assert all(st["completed_total"] > 0 and st["reclaims_total"] == 0 for st in sts), sts
    assert sorted(i for _p, i in _starts(cluster)) == list(range(60)), "each ran once"
    wait_for(lambda: all(x["parked"] == 0 for ep in (a, b)
                         for x in cluster.status("q", endpoint=ep)["workers"]), 10,
             "idle: every parked slot given back to both brokers")
