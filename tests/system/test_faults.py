"""Faults with real processes: killed and stopped workers, broker restarts and deaths.

Broker and workers heartbeat every 0.2 s here, so sqm declares a silent
worker dead after about 0.6 s. Processes are killed at chosen moments (a
callback has logged that it started, a status figure says a message is
pending), never after a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sender
from sender import Sender
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------- helpers


def entries(log: Path, kind: str) -> list[dict[str, Any]]:
    """The callbacks' log lines of one kind (tolerates a line being written right now)."""
    try:
        return [e for e in read_log(log) if e["kind"] == kind]
    except ValueError:
        return []


def started(log: Path, n: int = 1) -> list[dict[str, Any]]:
    """Wait until the ``sleep`` callback has logged ``n`` starts; return them."""
    return wait_for(
        lambda: (lambda got: got if len(got) >= n else None)(entries(log, "start")),
        15,
        f"{n} sleep callback(s) to start",
    )


class Background:
    """Run ``fn`` in a thread; ``result()`` re-raises whatever it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._box["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            self._box["error"] = exc

    def result(self, timeout: float = 15) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background helper did not finish"
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer names a running process (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except OSError:
        return True


def status_when(cluster, queue: str, pred: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 5) -> dict[str, Any]:
    """Poll ``sqm status`` until ``pred`` holds; return that status."""
    return wait_for(lambda: (lambda st: st if pred(st) else None)(cluster.status(queue)),
                    timeout, what)


def worker_pids(st: dict[str, Any]) -> list[int]:
    return sorted(w["pid"] for w in st["workers"])


# ---------------------------------------------------------------- worker deaths


def test_sigkill_busy_worker_without_retries_gives_worker_lost(cluster):
    cluster.serve("kq", heartbeat=0.2)
    w = cluster.worker("kq", heartbeat=0.2)

    def kill_when_started() -> tuple[int, float]:
        pid = started(cluster.log)[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid, time.monotonic()

    killer = Background(kill_when_started)
    with Sender("kq") as s:
        t0 = time.monotonic()
        with pytest.raises(sender.WorkerLost) as info:
            s.rpc("sleep", {"s": 30}, timeout=10)
        raised_at = time.monotonic()
    killed_pid, killed_at = killer.result()

    assert killed_pid == w.pid  # --processes 1: the sqm worker process runs the callbacks
    assert info.value.deliveries == 1
    assert raised_at - killed_at < 3.0, f"WorkerLost {raised_at - killed_at:.2f} s after the kill"
    assert raised_at - t0 < 8.0  # well before the 10 s timeout
    assert w.wait(5) == -signal.SIGKILL

    st = cluster.status("kq")
    assert st["failed_total"] == 1
    assert st["completed_total"] == 0
    assert st["assigned_total"] == 1
    assert st["redelivered_total"] == 0
    assert st["workers_current"] == 0
    assert st["workers"] == []
    assert st["in_flight"] == 0 and st["pending"] == 0
    assert len(entries(cluster.log, "start")) == 1
    assert entries(cluster.log, "end") == []


def test_sigkill_busy_worker_with_retries_redelivers(cluster):
    cluster.serve("rq", heartbeat=0.2)
    w1 = cluster.worker("rq", heartbeat=0.2)
    w2 = cluster.worker("rq", heartbeat=0.2)
    procs = {w1.pid: w1, w2.pid: w2}
    with Sender("rq") as s:
        mid = s.submit("sleep", {"s": 1.0}, retries=1)
        first = started(cluster.log)[0]["pid"]
        assert first in procs
        procs[first].signal(signal.SIGKILL)
        reply = s.receive(id=mid, timeout=10)
    other = (set(procs) - {first}).pop()
    assert reply == {"pid": other, "slept": 1.0}
    assert procs[first].wait(5) == -signal.SIGKILL

    # The reply goes straight to us; the worker's DONE reaches sqm just after it.
    st = status_when(cluster, "rq", lambda st: st["completed_total"] == 1,
                     "sqm to count the message completed")
    assert st["redelivered_total"] == 1
    assert st["assigned_total"] == 2
    assert st["completed_total"] == 1
    assert st["failed_total"] == 0
    assert worker_pids(st) == [other]
    assert [e["pid"] for e in entries(cluster.log, "start")] == [first, other]
    assert [e["pid"] for e in entries(cluster.log, "end")] == [other]


def test_worker_lost_when_every_retry_is_used_up(cluster):
    cluster.serve("eq", heartbeat=0.2)
    procs = {p.pid: p for p in (cluster.worker("eq", heartbeat=0.2),
                                cluster.worker("eq", heartbeat=0.2))}
    with Sender("eq") as s:
        mid = s.submit("sleep", {"s": 30}, retries=1, timeout=20)
        for n in (1, 2):
            pid = started(cluster.log, n)[-1]["pid"]
            procs.pop(pid).signal(signal.SIGKILL)
        with pytest.raises(sender.WorkerLost) as info:
            s.receive(id=mid, timeout=10)
    assert info.value.deliveries == 2
    assert procs == {}  # each worker got it once
    st = cluster.status("eq")
    assert st["redelivered_total"] == 1 and st["failed_total"] == 1
    assert st["workers_current"] == 0 and st["pending"] == 0 and st["in_flight"] == 0


def test_graceful_worker_sigterm_mid_task_loses_nothing(cluster):
    cluster.serve("gq", heartbeat=0.2)
    w = cluster.worker("gq", "--prefetch", "1", heartbeat=0.2)  # the second waits in sqm
    with Sender("gq") as s:
        busy = s.submit("sleep", {"s": 1.5}, timeout=20)
        assert started(cluster.log)[0]["pid"] == w.pid
        queued = s.submit("record", {"n": 2}, timeout=20)  # waits: the only worker is busy
        status_when(cluster, "gq", lambda st: st["pending"] == 1, "the second message pending")
        w.signal(signal.SIGTERM)
        assert s.receive(id=busy, timeout=10) == {"pid": w.pid, "slept": 1.5}
        assert w.wait(10) == 0, w.stderr
        st = status_when(cluster, "gq", lambda st: st["workers_current"] == 0,
                         "the stopped worker to be gone")
        assert st["workers"] == []
        assert st["failed_total"] == 0
        if st["pending"] == 1:  # not taken by the leaving worker: a new one gets it
            w2 = cluster.worker("gq", heartbeat=0.2)
            handler = w2.pid
        else:
            handler = w.pid
        assert s.receive(id=queued, timeout=10) == {"payload": {"n": 2}, "pid": handler}
    assert [e["pid"] for e in entries(cluster.log, "record")] == [handler]  # exactly once
    st = status_when(cluster, "gq", lambda st: st["completed_total"] == 2,
                     "both messages counted completed")
    assert st["failed_total"] == 0 and st["pending"] == 0 and st["in_flight"] == 0
    assert "Traceback" not in w.stderr


def test_sigterm_worker_takes_no_new_message(cluster):
    """SPEC: terminate (SIGTERM) "finishes the message in hand" and leaves.

    A message that was already waiting when the busy worker got SIGTERM must
    not be handed to it: it stays pending for another worker.
    """
    cluster.serve("tq", heartbeat=0.2)
    w = cluster.worker("tq", "--prefetch", "1", heartbeat=0.2)  # the second waits in sqm
    with Sender("tq") as s:
        busy = s.submit("sleep", {"s": 1.0}, timeout=20)
        started(cluster.log)
        queued = s.submit("record", {"n": 1}, timeout=20)
        status_when(cluster, "tq", lambda st: st["pending"] == 1, "the second message pending")
        w.signal(signal.SIGTERM)
        assert s.receive(id=busy, timeout=10)["slept"] == 1.0
        assert w.wait(10) == 0, w.stderr
        st = status_when(cluster, "tq", lambda st: st["workers_current"] == 0,
                         "the stopped worker to be gone")
        assert entries(cluster.log, "record") == [], "the SIGTERMed worker took a new message"
        assert st["pending"] == 1 and st["assigned_total"] == 1
        w2 = cluster.worker("tq", heartbeat=0.2)
        assert s.receive(id=queued, timeout=10) == {"payload": {"n": 1}, "pid": w2.pid}


# ---------------------------------------------------------------- process pool


def test_worker_pool_replaces_killed_child_and_stops_all_on_sigterm(cluster):
    cluster.serve("pq", heartbeat=0.2)
    parent = cluster.worker("pq", processes=3, heartbeat=0.2)
    pids = worker_pids(cluster.status("pq"))
    assert len(set(pids)) == 3 and parent.pid not in pids

    victim = pids[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> list[int] | None:
        now = worker_pids(cluster.status("pq"))
        if len(now) == 3 and victim not in now and set(pids[1:]) <= set(now):
            return now
        return None

    after = wait_for(replaced, 15, "a replacement worker process")
    new = set(after) - set(pids)
    assert len(new) == 1 and parent.pid not in new
    assert parent.popen.poll() is None
    with Sender("pq") as s:
        assert s.rpc("add", {"a": 2, "b": 3}, timeout=5) == 5

    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0, parent.stderr
    wait_for(lambda: all(pid_gone(p) for p in after), 5, "every child process to exit")
    st = status_when(cluster, "pq", lambda st: st["workers_current"] == 0,
                     "all pool workers to leave sqm")
    assert st["workers"] == []
    assert "Traceback" not in parent.stderr


# ---------------------------------------------------------------- broker restarts and deaths


def test_broker_restart_workers_reregister(cluster):
    first = cluster.serve("sq", heartbeat=0.2)
    pool = cluster.worker("sq", processes=2, heartbeat=0.2)
    pids = worker_pids(cluster.status("sq"))
    old = Sender("sq")
    try:
        assert old.rpc("add", {"a": 1, "b": 2}, timeout=5) == 3
        # A message in flight while sqm restarts: its reply goes straight to us.
        in_flight = old.submit("sleep", {"s": 1.0}, timeout=20)
        started(cluster.log)

        first.signal(signal.SIGTERM)
        assert first.wait(10) == 0, first.stderr
        assert "Traceback" not in first.stderr
        second = cluster.serve("sq", heartbeat=0.2)
        assert second.pid != first.pid

        st = cluster.wait_workers("sq", 2, timeout=5)
        assert worker_pids(st) == pids  # the same processes, registered again
        assert st["workers_ever"] == 2
        assert old.receive(id=in_flight, timeout=10)["slept"] == 1.0

        with Sender("sq") as fresh:
            assert fresh.rpc("add", {"a": 20, "b": 22}, timeout=5) == 42
        assert old.rpc("add", {"a": 5, "b": 6}, timeout=5) == 11
    finally:
        old.close()
    assert pool.popen.poll() is None
    # the new sqm counts the two rpcs it dispatched (DONE follows each reply)
    st = status_when(cluster, "sq", lambda st: st["completed_total"] == 2, "2 completions")
    assert st["assigned_total"] == 2 and st["failed_total"] == 0


def test_sender_times_out_when_broker_is_killed_with_pending_messages(cluster):
    broker = cluster.serve("dq", heartbeat=0.2)

    def kill_when_pending() -> None:
        status_when(cluster, "dq", lambda st: st["pending"] == 1, "the message to be pending", 10)
        broker.signal(signal.SIGKILL)

    killer = Background(kill_when_pending)
    with Sender("dq") as s:
        t0 = time.monotonic()
        with pytest.raises(sender.Timeout) as info:
            s.rpc("add", {"a": 1, "b": 2}, timeout=2.0)
        elapsed = time.monotonic() - t0
    killer.result()
    assert isinstance(info.value, TimeoutError)
    assert 1.9 <= elapsed < 4.0, f"Timeout after {elapsed:.2f} s for a 2 s deadline"
    assert broker.wait(5) == -signal.SIGKILL


def test_broker_sigkill_then_new_broker_workers_reregister(cluster, rundir):
    """No goodbye from sqm this time: workers notice the silence and the new sqm."""
    broker = cluster.serve("xq", heartbeat=0.2)
    w = cluster.worker("xq", heartbeat=0.2)
    with Sender("xq") as s:
        assert s.rpc("add", {"a": 1, "b": 1}, timeout=5) == 2
        broker.signal(signal.SIGKILL)
        assert broker.wait(5) == -signal.SIGKILL
        assert (rundir / "xq.sock").exists()  # stale socket file left behind
        cluster.serve("xq", heartbeat=0.2)
        st = cluster.wait_workers("xq", 1, timeout=5)
        assert worker_pids(st) == [w.pid]
        assert s.rpc("add", {"a": 2, "b": 2}, timeout=5) == 4
    assert w.popen.poll() is None
