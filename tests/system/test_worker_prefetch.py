"""Throughput mode: a worker with --prefetch N holds up to N messages, never more."""

from __future__ import annotations

import pytest

from sender import Sender
from sqm.protocol import DEFAULT_PREFETCH
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(60)


def test_prefetch_holds_up_to_n_and_counts_them_in_flight(cluster):
    """Never more than 3 held; each callback runs long (0.4 s), and the ones behind
    it wait in the worker (alone, it is not asked to give them back)."""
    cluster.serve("q")
    cluster.worker("q", "--prefetch", "3")
    seen: list[tuple[int, int, int]] = []

    def snapshot():
        x = cluster.status("q")
        w = x["workers"][0] if x["workers"] else {"in_flight": 0, "parked": 0}
        seen.append((w["in_flight"], w["parked"], x["pending"]))
        return x["completed_total"] == 7

    with Sender("q", timeout=30) as s:
        ids = [s.submit("sleep", {"s": 0.4, "i": i}) for i in range(7)]
        st = wait_for(
            lambda: (x := cluster.status("q"))["in_flight"] == 3 and x["pending"] == 4 and x,
            10, "3 held (1 running), 4 pending",
        )
        assert st["workers"][0]["slots"] == 3 and st["workers"][0]["parked"] == 0
        wait_for(snapshot, 20, "7 completed")
        results = [s.receive(id=mid) for mid in ids]
    assert all(held + parked <= 3 for held, parked, _p in seen), seen
    assert [r["slept"] for r in results] == [0.4] * 7
    # the worker ran them one after another, in submission order
    starts = [e["payload"]["i"] for e in read_log(cluster.log) if e["kind"] == "start"]
    assert starts == list(range(7))


def test_default_prefetch_and_prefetch_1(cluster):
    """A worker takes DEFAULT_PREFETCH messages at once unless told otherwise;
    --prefetch 1 gives sqm's first behaviour, one message at a time."""
    cluster.serve("q")
    cluster.worker("q")
    wait_for(lambda: cluster.status("q")["workers"], 10, "registered")
    assert cluster.status("q")["workers"][0]["slots"] == DEFAULT_PREFETCH == 16
    cluster.serve("p")
    cluster.worker("p", "--prefetch", "1")
    with Sender("p", timeout=30) as s:
        ids = [s.submit("sleep", {"s": 0.3, "i": i}) for i in range(3)]
        st = wait_for(
            lambda: (x := cluster.status("p"))["in_flight"] == 1 and x["pending"] == 2 and x,
            10, "1 in flight, 2 pending",
        )
        assert st["workers"][0]["slots"] == 1 and st["reclaims_total"] == 0
        assert [s.receive(id=m)["slept"] for m in ids] == [0.3] * 3
