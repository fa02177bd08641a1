"""Async workers: ``async def`` callbacks on an event loop, ``--concurrency N`` at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from sender import RemoteError, Sender
from sqm.protocol import DEFAULT_PREFETCH
from tests.conftest import Proc, read_log, wait_for
from tests.system.test_readme import readme_file

pytestmark = pytest.mark.timeout(90)

APPS = "tests.apps.aio:callbacks"


def starts(cluster, pid: int | None = None) -> list[dict]:
    return [e for e in read_log(cluster.log)
            if e["kind"] == "start" and (pid is None or e["pid"] == pid)]


def test_concurrency_8_finishes_8_sleeps_in_about_the_time_of_one(cluster):
    cluster.serve("q")
    cluster.worker("q", "--concurrency", "8", target=APPS)
    st = cluster.status("q")
    # HELLO announced 8 at once, and room for DEFAULT_PREFETCH (16) messages
    assert [(w["concurrency"], w["slots"]) for w in st["workers"]] == [(8, DEFAULT_PREFETCH)]
    with Sender("q", timeout=30) as s:
        t0 = time.monotonic()
        ids = [s.submit("nap", {"s": 1.0, "i": i}) for i in range(8)]
        results = [s.receive(id=mid) for mid in ids]
        elapsed = time.monotonic() - t0
    assert [r["slept"] for r in results] == [1.0] * 8
    assert 0.9 < elapsed < 2.5, f"8 concurrent 1 s naps took {elapsed:.2f} s"
    assert max(e["running"] for e in starts(cluster)) == 8


def test_never_more_than_concurrency_at_once_and_extra_slots_wait(cluster):
    """3 run at once; sqm hands it 5, and the 2 behind 3 long naps wait in the worker
    (alone, it is not asked to give them back), and start in their turn."""
    cluster.serve("q")
    w = cluster.worker("q", "--concurrency", "3", "--prefetch", "5", target=APPS)
    held: list[int] = []

    def running_3_rest_wait() -> bool:
        x = cluster.status("q")
        held.append(x["in_flight"])
        return (x["in_flight"] == 5 and x["workers"][0]["parked"] == 0
                and x["pending"] == 7 and x["nacked_total"] == 0)

    with Sender("q", timeout=30) as s:
        ids = [s.submit("nap", {"s": 0.3, "i": i}) for i in range(12)]
        wait_for(running_3_rest_wait, 10, "5 held (3 running), 7 pending")
        wait_for(lambda: len(starts(cluster)) == 3, 10, "3 started, the other 2 wait a turn")
        assert cluster.status("q")["workers"][0]["slots"] == 5
        results = [s.receive(id=mid) for mid in ids]
    assert max(held) <= 5
    assert {r["pid"] for r in results} == {w.pid}
    log = starts(cluster)
    assert sorted(e["payload"]["i"] for e in log) == list(range(12))  # each ran once
    assert max(e["running"] for e in log) == 3  # reached, never exceeded
    # they start in submission order: the extra slots are a FIFO, not a free-for-all
    assert [e["payload"]["i"] for e in log] == list(range(12))


def test_async_callbacks_respond_fail_and_mix_with_plain_ones(cluster):
    cluster.serve("q")
    w = cluster.worker("q", "--concurrency", "2", target=APPS)
    with Sender("q", timeout=20) as s:
        assert s.rpc("steps", {"n": 3}) == {"steps": 3, "pid": w.pid}  # respond() in a coroutine
        assert s.rpc("sync_steps", {"n": 2}) == {"steps": 2, "pid": w.pid}
        assert s.rpc("pid") == w.pid
        with pytest.raises(RemoteError) as info:
            s.rpc("async_boom", "x")
        assert info.value.type == "KeyError"
        assert "async_boom" in info.value.traceback
        with pytest.raises(RemoteError) as info:
            s.rpc("nope")
        assert info.value.type == "UnknownMethod"
        assert s.rpc("nap", {"s": 0.01}) == {"pid": w.pid, "slept": 0.01}  # still serving
    st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 4 and x, 5,
                  "4 completed")
    # "nope" fails at sqm (UnknownMethod, counted in failed_total): it never reaches the worker
    assert st["failed_total"] == 2 and st["workers"][0]["tasks_done"] == 5


def test_plain_callbacks_run_concurrently_in_threads(cluster):
    cluster.serve("q")
    cluster.worker("q", "--concurrency", "4", target=APPS)
    with Sender("q", timeout=30) as s:
        t0 = time.monotonic()
        ids = [s.submit("block", {"s": 0.6, "i": i}) for i in range(4)]
        assert [s.receive(id=m)["slept"] for m in ids] == [0.6] * 4
        elapsed = time.monotonic() - t0
    assert 0.55 < elapsed < 1.8, f"4 threaded 0.6 s calls took {elapsed:.2f} s"
    assert max(e["running"] for e in starts(cluster)) == 4


def test_sigterm_finishes_every_running_task_then_exits_0(cluster):
    cluster.serve("q")
    w = cluster.worker("q", "--concurrency", "4", target=APPS)
    with Sender("q", timeout=30) as s:
        ids = [s.submit("nap", {"s": 1.0, "i": i}) for i in range(3)]
        wait_for(lambda: len(starts(cluster)) == 3, 10, "3 naps running")
        w.signal(signal.SIGTERM)
        assert [s.receive(id=m)["slept"] for m in ids] == [1.0] * 3
    assert w.wait(10) == 0
    st = wait_for(lambda: (x := cluster.status("q"))["workers_current"] == 0 and x, 5,
                  "the worker gone from sqm")
    assert st["completed_total"] == 3 and st["failed_total"] == 0


def test_readme_async_example_runs_as_printed(cluster, rundir):
    (rundir / "async_worker.py").write_text(readme_file("async_worker.py"))
    (rundir / "progress_sender.py").write_text(readme_file("progress_sender.py"))
    cluster.serve("myqueue")
    worker = Proc([sys.executable, str(rundir / "async_worker.py")], cluster.env, rundir, "w")
    cluster.procs.append(worker)
    st = cluster.wait_workers("myqueue", 1, proc=worker)
    assert (st["workers"][0]["concurrency"], st["workers"][0]["slots"]) == (8, DEFAULT_PREFETCH)
    out = subprocess.run([sys.executable, str(rundir / "progress_sender.py")], env=cluster.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["1/3", "2/3", "3/3", "{'resized': 'cat.png'}"]


def test_processes_pass_concurrency_to_every_child(cluster):
    cluster.serve("q")
    cluster.worker("q", "--concurrency", "3", target=APPS, processes=2)
    st = cluster.status("q")
    assert [(w["concurrency"], w["slots"]) for w in st["workers"]] == [(3, DEFAULT_PREFETCH)] * 2
    with Sender("q", timeout=30) as s:
        ids = [s.submit("nap", {"s": 0.5, "i": i}) for i in range(6)]
        t0 = time.monotonic()
        assert len({s.receive(id=m)["pid"] for m in ids}) == 2
        assert time.monotonic() - t0 < 1.4  # 6 at once: 2 processes x 3
