"""One worker, several brokers: work from any, never more than its slots at once.

Two brokers serve queue ``q``: A at a.sock, B at b.sock. Worker W1 (1 slot)
registers with both; W2 serves B only. Each broker believes W1 has a free
slot, so when both hand it work, one dispatch must bounce (NACK) and be
done by W2 instead, exactly once.
"""

from __future__ import annotations

import signal
import threading

import pytest

from sender import Sender
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(90)

APPS = "tests.apps.aio:callbacks"


@pytest.fixture
def two_brokers(cluster, rundir):
    a, b = f"ipc://{rundir}/a.sock", f"ipc://{rundir}/b.sock"
    cluster.serve("q", endpoint=a)
    cluster.serve("q", endpoint=b)
    # 1 slot each (--prefetch 1): a second message finds W1 full (NACK), not waiting
    w1 = cluster.worker("q", "--prefetch", "1", target=APPS, endpoint=f"{a},{b}", wait=False)
    for ep in (a, b):  # W1 first, so it holds B's longest-idle slot
        cluster.wait_workers("q", 1, endpoint=ep, proc=w1)
    w2 = cluster.worker("q", "--prefetch", "1", target=APPS, endpoint=b)
    return a, b, w1, w2


def starts(cluster) -> list[dict]:
    return [e for e in read_log(cluster.log) if e["kind"] == "start"]


def test_full_worker_nacks_and_the_other_worker_does_it(cluster, two_brokers):
    a, b, w1, w2 = two_brokers
    with Sender("q", endpoint=a, timeout=30) as sa, Sender("q", endpoint=b, timeout=30) as sb:
        first = sa.submit("block", {"s": 1.5, "i": "a0"})
        wait_for(lambda: [e["pid"] for e in starts(cluster)] == [w1.pid], 10, "W1 busy with a0")
        # B's longest-idle slot is W1's: it dispatches there, W1 is full and says NACK
        second = sb.submit("block", {"s": 0.2, "i": "b0"})
        assert sb.receive(id=second)["pid"] == w2.pid
        assert sa.receive(id=first)["pid"] == w1.pid
    st_b = cluster.status("q", endpoint=b)
    assert st_b["nacked_total"] == 1
    assert st_b["completed_total"] == 1 and st_b["redelivered_total"] == 0
    # W1 gets its slot at B back (CREDIT) once it has room again
    wait_for(lambda: [w["parked"] for w in cluster.status("q", endpoint=b)["workers"]
                      if w["pid"] == w1.pid] == [0], 5, "B un-parks W1's slot")
    log = starts(cluster)
    assert [e["payload"]["i"] for e in log] == ["a0", "b0"]  # b0 ran once, on W2
    assert all(e["running"] == 1 for e in log)


def test_submitting_to_both_brokers_at_once_runs_each_message_once(cluster, two_brokers):
    a, b, w1, w2 = two_brokers
    n = 8
    results: dict[str, list] = {}

    def submit_all(endpoint: str, tag: str) -> None:
        with Sender("q", endpoint=endpoint, timeout=60) as s:
            ids = [s.submit("block", {"s": 0.25, "i": f"{tag}{i}"}) for i in range(n)]
            results[tag] = [s.receive(id=m) for m in ids]

    threads = [threading.Thread(target=submit_all, args=(ep, tag))
               for ep, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["a", "b"], "a sender did not get all its replies"
    assert all(r["slept"] == 0.25 for rs in results.values() for r in rs)
    assert {r["pid"] for r in results["a"]} == {w1.pid}  # A's only worker
    log = starts(cluster)
    # exactly once: every message started once, whichever broker and worker
    assert sorted(e["payload"]["i"] for e in log) == sorted(
        f"{tag}{i}" for tag in "ab" for i in range(n))
    w1_runs = [e for e in log if e["pid"] == w1.pid]
    assert len(w1_runs) >= n and all(e["running"] == 1 for e in w1_runs)  # one at a time
    assert any(e["pid"] == w2.pid for e in log)
    st_a, st_b = cluster.status("q", endpoint=a), cluster.status("q", endpoint=b)
    assert st_a["completed_total"] == n and st_b["completed_total"] == n
    assert st_a["redelivered_total"] == st_b["redelivered_total"] == 0
    assert st_a["failed_total"] == st_b["failed_total"] == 0


def test_each_broker_is_watched_on_its_own(cluster, rundir):
    """One broker crashing and coming back does not disturb work from the other."""
    a, b = f"ipc://{rundir}/a.sock", f"ipc://{rundir}/b.sock"
    broker_a = cluster.serve("q", endpoint=a)
    cluster.serve("q", endpoint=b)
    w = cluster.worker("q", "--concurrency", "2", target=APPS, endpoint=f"{a},{b}", wait=False)
    for ep in (a, b):
        cluster.wait_workers("q", 1, endpoint=ep, proc=w)
    broker_a.signal(signal.SIGKILL)
    broker_a.wait(5)
    with Sender("q", endpoint=b, timeout=10) as s:
        assert s.rpc("pid") == w.pid  # B is served while A is down
    cluster.serve("q", endpoint=a)
    cluster.wait_workers("q", 1, endpoint=a, proc=w)  # registered again with the new A
    with Sender("q", endpoint=a, timeout=10) as s:
        assert s.rpc("nap", {"s": 0.01})["pid"] == w.pid
    assert cluster.status("q", endpoint=b)["workers"][0]["pid"] == w.pid
