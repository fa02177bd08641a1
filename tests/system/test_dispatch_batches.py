"""Batching on the sqm <-> worker hop with real processes (docs/PROTOCOL.md: DISPATCH, DONE).

Under load sqm sends a prefetching worker several messages in one DISPATCH
and the worker reports several ends in one DONE; every message still runs
and is answered exactly once, and a worker killed with a batch in hand has
its messages retried or failed back (WorkerLost) as before.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from sender import Sender, WorkerLost
from tests.conftest import Cluster, read_log, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("runner", [["--prefetch", "8"], ["--prefetch", "8", "--concurrency", "2"]],
                         ids=["plain", "asyncio"])
def test_a_prefetching_worker_gets_batches_and_every_reply_once(
        cluster: Cluster, runner: list[str]) -> None:
    cluster.serve("q")
    first, n = 64, 600
    with Sender("q", timeout=60) as s:
        ids = [s.submit("record", i) for i in range(first)]  # pending: one flush at HELLO
        wait_for(lambda: cluster.status("q")["pending"] == first, 10, "pending")
        cluster.worker("q", *runner)
        ids += [s.submit("record", i) for i in range(first, n)]
        results = [s.receive(id=mid, timeout=30) for mid in ids]
    assert [r["payload"] for r in results] == list(range(n))
    ran = sorted(e["payload"] for e in read_log(cluster.log) if e["kind"] == "record")
    assert ran == list(range(n)), "each message ran exactly once"
    st: dict[str, Any] = wait_for(
        lambda: (x := cluster.status("q"))["in_flight"] == 0 and x["completed_total"] == n and x,
        10, "every DONE counted")
    # the HELLO's flush alone is one DISPATCH of 8; load makes more
    assert st["dispatch_batches_total"] >= 1, st
    assert st["dispatch_batched_total"] >= 8, st
    assert st["workers"][0]["in_flight"] == 0


def test_a_worker_killed_mid_batch_has_its_messages_retried_or_lost(cluster: Cluster) -> None:
    """8 messages in one DISPATCH, all running (concurrency 8: none waits, so none is
    given back); the worker is SIGKILLed: those with a retry left run on another
    worker, the others fail with WorkerLost."""
    cluster.serve("q")
    with Sender("q", timeout=60) as s:
        lost = [s.submit("nap", {"s": 60, "i": f"lost-{i}"}) for i in range(4)]
        retried = [s.submit("nap", {"s": 60, "i": f"retried-{i}"}, retries=1) for i in range(4)]
        wait_for(lambda: cluster.status("q")["pending"] == 8, 10, "8 pending")
        doomed = cluster.worker("q", "--concurrency", "8", "--prefetch", "8",
                                target="tests.apps.aio:callbacks")
        wait_for(lambda: sum(e["kind"] == "start" for e in read_log(cluster.log)) == 8, 10,
                 "the 8 messages running")
        st = cluster.status("q")
        assert st["in_flight"] == 8 and st["dispatch_batches_total"] == 1, st
        cluster.worker("q", target="tests.apps.quick:callbacks")  # takes what is retried
        os.killpg(doomed.pid, signal.SIGKILL)  # no goodbye, a batch in hand
        doomed.wait(10)
        for mid in lost:
            with pytest.raises(WorkerLost):
                s.receive(id=mid, timeout=30)
        got = sorted(s.receive(id=mid, timeout=30)["payload"]["i"] for mid in retried)
    assert got == [f"retried-{i}" for i in range(4)]
    records = [e["payload"]["i"] for e in read_log(cluster.log) if e["kind"] == "record"]
    assert sorted(records) == got, "each retried one ran once more, on the other worker"
    st = wait_for(lambda: (x := cluster.status("q"))["in_flight"] == 0 and x, 10, "settled")
    assert st["redelivered_total"] == 4, st
