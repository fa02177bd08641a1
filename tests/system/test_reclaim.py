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
        # Given back: they wait in sqm, not behind the callback, and the worker's
        # four slots are parked or hold the long one (nothing new goes to it).
        st = wait_for(lambda: (x := cluster.status("q"))["pending"] == 3 and x, 10,
                      "3 given back, pending in sqm")
        w = st["workers"][0]
        assert w["in_flight"] == 1 and w["parked"] == 3
        assert st["nacked_total"] == 3
        busy_pid = _starts(cluster)[0][0]
        # A second worker takes them while the first still runs its long callback.
        cluster.worker("q", "--prefetch", "4")
        replies = [s.receive(id=mid) for mid in short]
        assert {r["pid"] for r in replies} != {busy_pid}
        assert [e for e in read_log(cluster.log) if e["kind"] == "end" and e["payload"]["i"] == 0] == []
        assert s.receive(id=long_id)["pid"] == busy_pid
    starts = _starts(cluster)
    assert sorted(i for _p, i in starts) == [0, 1, 2, 3], "each message ran exactly once"
    assert [p for p, i in starts if i != 0] and busy_pid not in [p for p, i in starts if i != 0]
    # The long callback ended: CREDIT gave the worker its slots back.
    wait_for(lambda: all(w["parked"] == 0 for w in cluster.status("q")["workers"]), 10,
             "no slot parked")


def test_a_worker_takes_work_again_once_its_long_callback_ends(cluster):
    """One worker alone: what it gave back waits for it, and runs after the long one, in order."""
    cluster.serve("q")
    cluster.worker("q", "--prefetch", "3")
    with Sender("q", timeout=30) as s:
        ids = [s.submit("sleep", {"s": 1.0 if i == 0 else 0.01, "i": i}) for i in range(5)]
        wait_for(lambda: cluster.status("q")["nacked_total"] >= 2, 10, "given back")
        results = [s.receive(id=mid) for mid in ids]
    assert [r["slept"] for r in results] == [1.0] + [0.01] * 4
    assert [i for _p, i in _starts(cluster)] == list(range(5)), "in order, each once"
    # Idle again, it gives every parked slot back.
    st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 5
                  and x["workers"][0]["parked"] == 0 and x, 10, "5 completed, nothing parked")
    assert st["pending"] == 0 and st["reclaims_total"] >= 1


def test_short_callbacks_give_nothing_back(cluster):
    """Prefetched messages whose callbacks are quick run where they were sent."""
    cluster.serve("q")
    cluster.worker("q", "--prefetch", "8")
    with Sender("q", timeout=30) as s:
        ids = [s.submit("echo", i) for i in range(200)]
        assert [s.receive(id=mid) for mid in ids] == list(range(200))
    st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 200 and x, 10,
                  "200 completed")
    assert st["nacked_total"] == 0


def test_the_asyncio_runner_gives_back_what_waits_for_a_turn(cluster):
    """concurrency 2, prefetch 4: two long callbacks run, the two behind them go back."""
    cluster.serve("q")
    cluster.worker("q", "--concurrency", "2", "--prefetch", "4")
    with Sender("q", timeout=30) as s:
        long_ids = [s.submit("sleep", {"s": 3.0, "i": i}) for i in (0, 1)]
        short = [s.submit("sleep", {"s": 0.01, "i": i}) for i in (2, 3)]
        st = wait_for(lambda: (x := cluster.status("q"))["pending"] == 2 and x, 10,
                      "2 given back, pending in sqm")
        assert st["workers"][0]["in_flight"] == 2 and st["workers"][0]["parked"] == 2
        busy_pid = _starts(cluster)[0][0]
        cluster.worker("q")
        assert {s.receive(id=mid)["pid"] for mid in short} != {busy_pid}
        assert [e for e in read_log(cluster.log) if e["kind"] == "end" and e["payload"]["i"] < 2] == []
        assert {s.receive(id=mid)["pid"] for mid in long_ids} == {busy_pid}
    assert sorted(i for _p, i in _starts(cluster)) == [0, 1, 2, 3], "each message ran exactly once"
    wait_for(lambda: all(w["parked"] == 0 for w in cluster.status("q")["workers"]), 10,
             "no slot parked")


def test_a_worker_of_two_brokers_gives_back_to_each_and_none_starves(cluster, rundir):
    """One worker (the asyncio runner) serves brokers A and B, callbacks of 20 ms, a
    Sender spreads over both: what waits goes back to its broker, and a broker whose
    messages all went back gets a slot again as callbacks end (its own DONEs would
    free none while the other's messages keep the worker busy): nothing expires."""
    a, b = f"ipc://{rundir}/a.sock", f"ipc://{rundir}/b.sock"
    cluster.serve("q", endpoint=a)
    cluster.serve("q", endpoint=b)
    w = cluster.worker("q", endpoint=f"{a},{b}", wait=False)
    for ep in (a, b):
        cluster.wait_workers("q", 1, endpoint=ep, proc=w)
    with Sender("q", endpoint=[a, b], timeout=8) as s:
        out = list(s.map("sleep", [{"s": 0.02, "i": i} for i in range(60)], max_concurrent=10))
    assert [r["slept"] if isinstance(r, dict) else r for r in out] == [0.02] * 60
    sts = [cluster.status("q", endpoint=ep) for ep in (a, b)]
    assert sum(st["completed_total"] for st in sts) == 60
    assert all(st["completed_total"] > 0 and st["nacked_total"] > 0 for st in sts), sts
    assert sorted(i for _p, i in _starts(cluster)) == list(range(60)), "each ran once"
    wait_for(lambda: all(x["parked"] == 0 for ep in (a, b)
                         for x in cluster.status("q", endpoint=ep)["workers"]), 10,
             "idle: every parked slot given back to both brokers")
