"""Each message goes to exactly one worker: 4 worker processes, 8 sender threads."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from sender import Sender
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(120)

THREADS = 8
PER_THREAD = 150


def test_exactly_once_across_processes_and_threads(cluster):
    cluster.serve("q")
    cluster.worker("q", processes=4)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            with Sender("q", timeout=30) as s:
                ids = [s.submit("record", {"t": t, "i": i}) for i in range(PER_THREAD)]
                results[t] = [s.receive(id=mid) for mid in ids]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    assert not errors, errors
    total = THREADS * PER_THREAD
    # Every sender got the right reply for every message, in its own order.
    for t in range(THREADS):
        assert [r["payload"] for r in results[t]] == [{"t": t, "i": i} for i in range(PER_THREAD)]
    # Every message was handled by exactly one worker, exactly once.
    handled = Counter((e["payload"]["t"], e["payload"]["i"]) for e in read_log(cluster.log))
    assert len(handled) == total
    assert set(handled.values()) == {1}
    # All four worker processes took part, and the broker agrees on the counts.
    pids = Counter(r["pid"] for rs in results.values() for r in rs)
    assert len(pids) == 4
    # DONE reaches sqm just after each reply reaches its sender: wait for the counts
    st = wait_for(
        lambda: (s := cluster.status("q"))["completed_total"] == total and s, 10, "all done"
    )
    assert st["assigned_total"] == total
    assert st["completed_total"] == total
    assert sum(w["tasks_done"] for w in st["workers"]) == total
    assert st["workers_ever"] == 4
