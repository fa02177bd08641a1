"""Failure handling with real processes: scheduled messages, Retry, time limits, cancel.

Real ``sqm serve`` and ``sqm worker`` processes; the callbacks
(tests/system/failure_apps.py) log each run with its wall time, so timing
is measured on the worker's side and every bound is checked from both ends.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sender import Cancelled, Sender, TimeLimitExceeded
from sqm.admin import AdminClient
from sqm.config import resolve
from sqm.errors import RemoteError
from sqm.protocol import COMPACT_RESULT, RESULT, classic_result
from tests.conftest import REPO, Cluster, read_log, wait_for

pytestmark = pytest.mark.timeout(90)

APPS = "tests.system.failure_apps"
# How late sqm may dispatch a due message here (2 shared cores, 0.2 s heartbeat).
LATE_S = 0.5


def runs(cluster: Cluster, method: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_log(Path(cluster.log)) if method is None or e["method"] == method]


def dead(queue: str = "q") -> list[dict[str, Any]]:
    return AdminClient(resolve(queue), 5.0).dead_list(payloads=False)


def spy_results(s: Sender) -> list[str]:
    """Ids of every RESULT frame that reaches ``s`` from here on (late ones included)."""
    seen: list[str] = []
    feed = s._core.feed

    def spy(frames: list[bytes], from_broker: bool) -> str | None:
        classic = frames
        if len(frames) == 1 and frames[0].startswith(COMPACT_RESULT):  # the usual form
            classic = classic_result(frames[0])
        if len(classic) > 2 and classic[1] == RESULT:
            seen.append(classic[2].decode())
        return feed(frames, from_broker)

    s._core.feed = spy  # type: ignore[method-assign]
    return seen


def sqm_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqm", *args], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------- scheduled messages


def test_delay_holds_the_message_until_due(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks")
    with Sender("q", timeout=20) as s:
        t0 = time.time()
        mid = s.submit("echo", 1, delay=3.0)  # room for `sqm status` to start up
        st = wait_for(lambda: (x := cluster.status("q"))["scheduled"] == 1 and x, 5,
                      "one scheduled")
        assert st["pending"] == 0 and st["in_flight"] == 0
        shown = sqm_cli(cluster, "status", "q")
        assert "scheduled 1 " in shown.stdout, shown.stdout + shown.stderr
        reply = s.receive(id=mid)
    assert 3.0 <= reply["at"] - t0 < 3.0 + LATE_S, reply["at"] - t0
    assert cluster.status("q")["scheduled"] == 0


def test_not_before_and_priority_order_once_due(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks")
    with Sender("q", timeout=20) as s:
        due = time.time() + 1.0
        low = s.submit("echo", "low", not_before=due, priority="low")
        high = s.submit("echo", "high", not_before=due, priority="high")
        now_id = s.submit("echo", "now")
        first = s.receive(id=now_id)
        assert first["at"] < due  # not held behind the scheduled ones
        r_high, r_low = s.receive(id=high), s.receive(id=low)
    assert due <= r_high["at"] < due + LATE_S, r_high["at"] - due
    assert due <= r_low["at"] < due + LATE_S
    # due together: the high one first
    assert [e["payload"] for e in runs(cluster, "echo")] == ["now", "high", "low"]


def test_expiry_wins_over_a_later_due_time(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks")
    with Sender("q", timeout=20) as s:
        mid = s.submit("echo", 1, delay=5, ttl=1)
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:
            s.receive(id=mid)
        assert type(info.value).__name__ == "Expired"
        assert time.monotonic() - t0 < 1 + LATE_S + 0.5
    assert runs(cluster, "echo") == []


def test_scheduled_message_survives_a_journaled_restart(cluster, rundir):
    journal = str(rundir / "journal.db")
    broker = cluster.serve("q", "--journal", journal)
    with Sender("q", timeout=30) as s:
        t0 = time.time()
        mid = s.submit("echo", "kept", delay=3)
        wait_for(lambda: s.accepted(mid), 5, "sqm accepted (journaled) it")
        assert cluster.status("q")["scheduled"] == 1
        broker.signal(signal.SIGTERM)
        assert broker.wait(10) == 0
        cluster.serve("q", "--journal", journal)
        assert cluster.status("q")["scheduled"] == 1  # back on the heap, not dispatched
        cluster.worker("q", target=f"{APPS}:callbacks")
        reply = s.receive(id=mid)
    assert reply["payload"] == "kept"
    assert 3 <= reply["at"] - t0 < 3 + LATE_S + 0.5


# ---------------------------------------------------------------- Retry


def test_retry_then_success_on_any_worker(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks")
    cluster.worker("q", target=f"{APPS}:callbacks")
    with Sender("q", timeout=20) as s:
        assert s.rpc("flaky", {"fail": 2, "delay": 0.3}) == {"attempts": 2}
    log = runs(cluster, "flaky")
    assert [e["attempts"] for e in log] == [0, 1, 2]
    gaps = [b["at"] - a["at"] for a, b in zip(log, log[1:], strict=False)]
    assert all(0.3 <= g < 0.3 + LATE_S for g in gaps), gaps  # the delay, counted by sqm
    st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 1 and x, 5,
                  "one completed")
    assert st["retried_total"] == 2 and st["failed_total"] == 0


def test_retries_exhausted_carries_the_last_error_and_is_dead_lettered(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:two_retries")
    with Sender("q", timeout=20) as s, pytest.raises(RemoteError) as info:
        s.rpc("hopeless", None)
    assert info.value.type == "RetriesExhausted"
    assert "ValueError: boom" in info.value.message
    assert [e["attempts"] for e in runs(cluster, "hopeless")] == [0, 1, 2]  # max_retries=2
    letters = wait_for(dead, 5, "a dead letter")
    assert [(d["method"], d["reason"]) for d in letters] == [("hopeless", "RetriesExhausted")]


def test_retry_on_backs_off_exponentially(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:auto_retry")
    with Sender("q", timeout=20) as s, pytest.raises(RemoteError) as info:
        s.rpc("conn", None)
    assert info.value.type == "RetriesExhausted"
    assert "ConnectionError: no route to the database" in info.value.message
    log = runs(cluster, "conn")
    assert len(log) == 4  # the first run and max_retries=3
    gaps = [b["at"] - a["at"] for a, b in zip(log, log[1:], strict=False)]
    # n-th retry waits min(5, 0.2 * 2**(n-1)) less up to half of it
    for n, gap in enumerate(gaps, 1):
        base = min(5.0, 0.2 * 2 ** (n - 1))
        assert base / 2 <= gap < base + LATE_S, (n, gaps)
    assert gaps[2] > gaps[0]


# ---------------------------------------------------------------- time limits


def test_time_limit_under_sqm_worker_replaces_the_child(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks", processes=2)
    with Sender("q", timeout=30) as s:
        results = spy_results(s)
        t0 = time.monotonic()
        with pytest.raises(TimeLimitExceeded):
            s.rpc("stuck", 3.0, time_limit=1.0)
        took = time.monotonic() - t0
        assert 1.0 <= took < 1.0 + LATE_S + 0.5, took  # promptly, not at the 3 s reply
        [started] = runs(cluster, "stuck")
        # the stuck child exits and the fleet starts another in its place
        def replaced() -> bool:
            st = cluster.status("q")
            pids = {w["pid"] for w in st["workers"]}
            return st["workers_current"] == 2 and started["pid"] not in pids
        wait_for(replaced, 20, "the stuck child replaced")
        wait_for(lambda: time.monotonic() - t0 > 3.5 or None, 5, "past the callback's 3 s")
        s.poll(0)
        assert results == []  # no late reply
        assert s.rpc("echo", "after")["payload"] == "after"
        assert len(results) == 1  # the probe sees replies
    assert [e["event"] for e in runs(cluster, "stuck")] == ["started"]  # never finished
    wait_for(dead, 5, "a dead letter")
    listed = sqm_cli(cluster, "dead", "list", "q", "--json")  # as an operator sees it
    assert listed.returncode == 0, listed.stderr
    assert [(d["method"], d["reason"]) for d in json.loads(listed.stdout)] == \
        [("stuck", "TimeLimitExceeded")]


def test_worker_side_limit_in_a_plain_worker(cluster):
    cluster.serve("q")
    proc = cluster.worker("q", target=f"{APPS}:limited")  # Worker(time_limit=0.5), not a fleet
    with Sender("q", timeout=30) as s:
        results = spy_results(s)
        t0 = time.monotonic()
        with pytest.raises(TimeLimitExceeded):
            s.rpc("stuck", 1.5)
        assert time.monotonic() - t0 < 0.5 + LATE_S + 0.5
        # the callback cannot be killed here: it finishes, its answer is dropped...
        wait_for(lambda: [e["event"] for e in runs(cluster, "stuck")] == ["started", "finished"],
                 10, "the stuck callback to finish")
        wait_for(lambda: "dropped the late answer" in proc.stderr, 5, "the worker's log line")
        # ... and the worker serves again, the same process
        reply = s.rpc("echo", "next")
        assert {e["pid"] for e in runs(cluster)} == {reply["pid"]} == {proc.pid}
        assert len(results) == 1  # the echo's: the late answer never reached the caller
    letters = wait_for(dead, 5, "a dead letter")
    assert [d["reason"] for d in letters] == ["TimeLimitExceeded"]


# ---------------------------------------------------------------- cancel


def test_cancel_pending_and_scheduled(cluster):
    cluster.serve("q")
    with Sender("q", timeout=20) as s:
        pending = s.submit("echo", 1)
        scheduled = s.submit("echo", 2, delay=60)
        wait_for(lambda: (x := cluster.status("q"))["pending"] == 1 and x["scheduled"] == 1,
                 5, "one pending, one scheduled")
        assert s.cancel(pending) is True
        assert s.cancel(scheduled) is True
        for mid in (pending, scheduled):
            with pytest.raises(Cancelled):
                s.receive(id=mid)
        st = wait_for(lambda: (x := cluster.status("q"))["cancelled_total"] == 2 and x, 5,
                      "two cancelled in sqm")
        assert st["pending"] == 0 and st["scheduled"] == 0
        assert s.cancel(pending) is False  # ended (cancelled) already
        assert s.cancel("no-such-id") is False
        cluster.worker("q", target=f"{APPS}:callbacks")
        assert s.rpc("echo", 3)["payload"] == 3
    assert [e["payload"] for e in runs(cluster, "echo")] == [3]  # no cancelled one ran
    assert dead() == []  # a cancel is not a dead letter


def test_cancel_running_flags_the_callback_and_fails_at_once(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks")
    with Sender("q", timeout=20) as s:
        results = spy_results(s)
        mid = s.submit("slow", 10, ack=True)
        wait_for(lambda: s.started(mid), 5, "the callback running")
        t0 = time.monotonic()
        assert s.cancel(mid) is True
        with pytest.raises(Cancelled):
            s.receive(id=mid)
        assert time.monotonic() - t0 < 0.5
        wait_for(lambda: [e["event"] for e in runs(cluster, "slow")] == ["started", "saw-cancel"],
                 5, "originator.cancelled seen by the callback")
        assert s.rpc("echo", "next")["payload"] == "next"  # the slot is free again
        assert mid not in results and len(results) == 1  # the callback's answer was dropped
    # each reply goes out before its DONE: wait for sqm to count the echo's
    st = wait_for(lambda: (x := cluster.status("q"))["in_flight"] == 0 and x, 5, "nothing in flight")
    assert st["cancelled_total"] == 1 and st["completed_total"] == 1


def test_cancel_finished_is_false(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks")
    with Sender("q", timeout=20) as s:
        mid = s.submit("echo", 1)
        assert s.receive(id=mid)["payload"] == 1
        assert s.cancel(mid) is False
        done = s.submit("echo", 2)
        wait_for(lambda: s.poll(0.05) >= 0 and done in s._core.ready, 5,
                 "the reply arrived, not yet received")
        assert s.cancel(done) is False  # its reply is here: it has ended
        assert s.receive(id=done)["payload"] == 2
    assert cluster.status("q")["cancelled_total"] == 0


def test_sqm_cancel_for_operators(cluster):
    cluster.serve("q")
    with Sender("q", timeout=20) as s:
        mid = s.submit("echo", 1, delay=60)
        wait_for(lambda: cluster.status("q")["scheduled"] == 1, 5, "one scheduled")
        out = sqm_cli(cluster, "cancel", "q", mid)
        assert out.returncode == 0, out.stderr
        assert f"cancelled message {mid}" in out.stdout
        with pytest.raises(Cancelled):
            s.receive(id=mid)
        again = sqm_cli(cluster, "cancel", "q", mid)
        assert again.returncode == 1 and "ended or unknown" in again.stderr


def test_retry_attempts_survive_a_journaled_restart(cluster, rundir):
    journal = str(rundir / "journal.db")
    broker = cluster.serve("q", "--journal", journal)
    worker = cluster.worker("q", target=f"{APPS}:callbacks")
    with Sender("q", timeout=30) as s:
        mid = s.submit("flaky", {"fail": 1, "delay": 3.0})
        wait_for(lambda: cluster.status("q")["scheduled"] == 1, 5, "retried, held 3 s")
        worker.stop()
        broker.signal(signal.SIGTERM)
        assert broker.wait(10) == 0
        cluster.serve("q", "--journal", journal)
        assert cluster.status("q")["scheduled"] == 1  # held again, attempts and all
        cluster.worker("q", target=f"{APPS}:callbacks")
        assert s.receive(id=mid) == {"attempts": 1}  # the journal kept attempts=1
    assert [e["attempts"] for e in runs(cluster, "flaky")] == [0, 1]


def test_async_sender_delay_and_cancel(cluster):
    import asyncio

    from sender import AsyncSender

    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:callbacks")

    async def main() -> None:
        async with AsyncSender("q", timeout=20) as s:
            held = await s.submit("echo", "held", delay=30)
            t0 = time.time()
            soon = await s.submit("echo", "soon", delay=0.5)
            waiting = asyncio.ensure_future(s.receive(id=held))
            await asyncio.sleep(0)  # the receive is waiting when the cancel comes
            assert await s.cancel(held) is True
            with pytest.raises(Cancelled):
                await waiting
            reply = await s.receive(id=soon)
            assert 0.5 <= reply["at"] - t0 < 0.5 + LATE_S
            assert await s.cancel(soon) is False

    asyncio.run(main())
    assert [e["payload"] for e in runs(cluster, "echo")] == ["soon"]


def test_retry_and_cancel_in_the_asyncio_runner(cluster):
    """--concurrency 2: callbacks run in threads beside the worker's event loop."""
    cluster.serve("q")
    cluster.worker("q", "--concurrency", "2", target=f"{APPS}:callbacks")
    with Sender("q", timeout=20) as s:
        assert s.rpc("flaky", {"fail": 1, "delay": 0.2}) == {"attempts": 1}
        mid = s.submit("slow", 10, ack=True)
        wait_for(lambda: s.started(mid), 5, "the callback running")
        assert s.cancel(mid) is True
        with pytest.raises(Cancelled):
            s.receive(id=mid)
        wait_for(lambda: [e["event"] for e in runs(cluster, "slow")] == ["started", "saw-cancel"],
                 5, "originator.cancelled seen in a callback thread")
    assert [e["attempts"] for e in runs(cluster, "flaky")] == [0, 1]
