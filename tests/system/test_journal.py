"""``sqm serve --journal``: accepted messages survive a SIGKILL of sqm.

Real sqm, worker and sender processes; the message log (``FILE-messages``)
is read directly to know when a message is on disk, and the workers' own log
proves what ran.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from sender import Sender, SQMError, Timeout
from sqm.journal_log import read_live
from tests.conftest import REPO, read_log, wait_for

pytestmark = pytest.mark.timeout(90)


def rows(db) -> int:
    """Messages on disk and not ended (a record being written is not counted)."""
    return len(read_live(f"{db}-messages"))


def handled(cluster, kind="record"):
    return [e["payload"] for e in read_log(cluster.log) if e["kind"] == kind]


def test_sigkill_and_restart_redispatches_accepted_messages_to_a_waiting_sender(cluster, tmp_path):
    db = tmp_path / "q.journal"
    sqm = cluster.serve("q", "--journal", str(db))
    worker = cluster.worker("q")
    with Sender("q", timeout=30) as s:
        assert [s.rpc("record", i) for i in range(5)] == [
            {"payload": i, "pid": worker.pid} for i in range(5)
        ]
        worker.stop()
        cluster.wait_workers("q", 0)
        ids = [s.submit("record", 100 + i) for i in range(20)]
        wait_for(lambda: rows(db) == 20, 10, "20 journaled messages (the 5 done are gone)")
        sqm.signal(signal.SIGKILL)
        sqm.wait()
        cluster.serve("q", "--journal", str(db))
        assert cluster.status("q")["pending"] == 20
        cluster.worker("q")
        # the same Sender, still waiting, gets every reply after the restart
        assert [s.receive(id=mid)["payload"] for mid in ids] == [100 + i for i in range(20)]
        wait_for(lambda: rows(db) == 0, 10, "the journal to empty")
    assert handled(cluster) == list(range(5)) + [100 + i for i in range(20)]


def test_graceful_stop_with_journal_keeps_pending_for_the_next_start(cluster, tmp_path):
    db = tmp_path / "q.journal"
    sqm = cluster.serve("q", "--journal", str(db))
    with Sender("q", timeout=30) as s:
        ids = [s.submit("record", i) for i in range(3)]
        wait_for(lambda: rows(db) == 3, 10, "3 journaled")
        sqm.signal(signal.SIGTERM)
        assert sqm.wait() == 0
        cluster.serve("q", "--journal", str(db))
        cluster.worker("q")
        assert [s.receive(id=mid)["payload"] for mid in ids] == [0, 1, 2]


def test_in_flight_at_the_crash_reaches_the_sender_exactly_once(cluster, tmp_path):
    db = tmp_path / "q.journal"
    sqm = cluster.serve("q", "--journal", str(db))
    cluster.worker("q")
    results = []
    with Sender("q", timeout=30) as s:
        mid = s.submit("sleep", {"s": 1.0})
        wait_for(lambda: handled(cluster, "start"), 10, "the worker to start it")
        sqm.signal(signal.SIGKILL)
        sqm.wait()
        cluster.serve("q", "--journal", str(db))
        results.append(s.receive(id=mid))
        # the journal re-dispatched it (at-least-once): the worker may run it
        # again, but the caller never sees a second reply
        wait_for(lambda: rows(db) == 0, 15, "the redelivery to finish")
        assert s.outstanding == 0
        with pytest.raises(SQMError, match="nothing to receive"):
            s.receive(timeout=0.5)
    assert len(results) == 1 and results[0]["slept"] == 1.0
    assert 1 <= len(handled(cluster, "end")) <= 2


def test_journal_in_use_by_another_sqm_is_a_clear_error(cluster, tmp_path):
    db = tmp_path / "q.journal"
    cluster.serve("q", "--journal", str(db))
    other = subprocess.run(
        [sys.executable, "-m", "sqm", "serve", "other", "--journal", str(db)],
        env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert other.returncode != 0
    err = other.stderr.strip().splitlines()
    assert len(err) == 1 and "in use by another sqm" in err[0], other.stderr


def test_without_journal_a_killed_sqm_costs_its_pending_messages_a_timeout(cluster):
    sqm = cluster.serve("q")
    with Sender("q") as s:
        mid = s.submit("record", "lost", timeout=2.0)
        # accepted: sqm has it (a message it had not acknowledged would be re-sent)
        wait_for(lambda: (s.poll(0), s.accepted(mid))[1], 10, "sqm's ACCEPTED")
        assert cluster.status("q")["pending"] == 1
        sqm.signal(signal.SIGKILL)
        sqm.wait()
        cluster.serve("q")
        cluster.worker("q")
        with pytest.raises(Timeout):
            s.receive(id=mid)  # at its deadline, never a hang
    assert handled(cluster) == []


def test_many_concurrent_rpcs_with_journal(cluster, tmp_path):
    db = tmp_path / "q.journal"
    cluster.serve("q", "--journal", str(db))
    cluster.worker("q", processes=2)
    errors = []

    def client(k):
        try:
            with Sender("q", timeout=20) as s:
                for i in range(100):
                    assert s.rpc("echo", [k, i]) == [k, i]
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    # Replies go straight to the senders; a worker's DONE may reach sqm a moment later.
    wait_for(lambda: cluster.status("q")["completed_total"] == 400, 10, "400 DONEs at sqm")
    assert cluster.status("q")["journal"]["written_total"] == 400
    wait_for(lambda: rows(db) == 0, 10, "an empty journal")


def test_sigkill_mid_load_then_restart_answers_every_message(cluster, tmp_path):
    """Killed while a pipelined load is half done: after a restart every caller gets its reply.

    What sqm had ACCEPTED comes back from the log (records appended per batch,
    a torn last one ignored); what it had not, the Sender re-sends.
    """
    db = tmp_path / "q.journal"
    sqm = cluster.serve("q", "--journal", str(db))
    cluster.worker("q", processes=2)
    with Sender("q", timeout=60) as s:
        ids = [s.submit("sleep", {"s": 0.01, "i": i}) for i in range(300)]
        wait_for(lambda: len(handled(cluster, "end")) >= 60, 20, "part of the load to run")
        sqm.signal(signal.SIGKILL)
        sqm.wait()
        assert len(handled(cluster, "end")) < 300  # killed mid-load
        cluster.serve("q", "--journal", str(db))
        assert [s.receive(id=mid)["slept"] for mid in ids] == [0.01] * 300
        wait_for(lambda: rows(db) == 0, 20, "the journal to empty")
        assert s.outstanding == 0
    assert {e["i"] for e in handled(cluster, "end")} == set(range(300))  # at least once each
