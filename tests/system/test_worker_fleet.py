"""`sqm worker --processes/--max-*-per-child/--autoscale/--autostart` with real processes.

The children are tasks of the pool (`sqm pool list` shows them), recycled
children finish their message first (every reply arrives), the fleet
follows the queue, and auto-launched brokers are exactly one however many
workers start at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sender import Sender
from sqm.taskpool import TaskPool
from sqm.taskpool.store import pid_alive
from tests.conftest import APPS, REPO, Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def pool_json(cluster: Cluster, *args: str, path: Path | None = None) -> list[dict[str, Any]]:
    """``sqm pool [--path P] list --json ARGS``."""
    where = ["--path", str(path)] if path else []
    out = subprocess.run([sys.executable, "-m", "sqm", "pool", *where, "list", "--json", *args],
                         cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    listed: list[dict[str, Any]] = json.loads(out.stdout)
    return listed


def running_children(cluster: Cluster, queue: str = "q", path: Path | None = None) -> set[int]:
    return {t["child_pid"] for t in pool_json(cluster, "--meta", f"queue={queue}", path=path)
            if t["state"] == "running" and t["child_pid"]}


@pytest.fixture
def brokers_stopped(rundir: Path) -> Iterator[None]:
    """Auto-launched brokers are daemons: stop any a failing test leaves behind."""
    yield
    pool_dir = rundir / "pool"
    if pool_dir.is_dir():
        for task in TaskPool(pool_dir).search({"meta": {"role": "sqm"}, "state": "running"}):
            task.terminate_supervisor(15)


def test_processes_are_pool_tasks_in_the_default_or_given_pool(cluster: Cluster,
                                                               rundir: Path) -> None:
    cluster.serve("q")
    parent = cluster.worker("q", processes=2)
    tasks = pool_json(cluster, "--meta", "queue=q")  # <rundir>/pool
    assert len(tasks) == 2
    assert all(t["meta"]["target"] == APPS and t["state"] == "running" for t in tasks)
    assert {t["child_pid"] for t in tasks} == {w["pid"] for w in cluster.status("q")["workers"]}
    elsewhere = rundir / "mine"
    other = cluster.worker("q", "--pool", str(elsewhere), processes=1)
    assert len(running_children(cluster, path=elsewhere)) == 1
    assert len(pool_json(cluster, "--meta", "queue=q")) == 2  # not in the default pool
    for proc in (parent, other):
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr
    wait_for(lambda: not running_children(cluster) and not running_children(
        cluster, path=elsewhere), 20, "no worker task left")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_sigterm_lets_every_child_finish_its_message_then_exits_0(cluster: Cluster,
                                                                   how: int) -> None:
    cluster.serve("q")
    parent = cluster.worker("q", processes=2)
    children = running_children(cluster)
    with Sender("q", timeout=30) as sender:
        ids = [sender.submit("sleep", {"s": 1.0}) for _ in range(2)]
        # (both may go to one child first: it gives the one waiting behind back)
        wait_for(lambda: sorted(w["in_flight"] for w in cluster.status("q")["workers"]) == [1, 1],
                 10, "both children busy")
        parent.signal(how)
        replies = [sender.receive(id=mid, timeout=30) for mid in ids]
    assert {r["pid"] for r in replies} == children  # each finished the message in hand
    assert parent.wait(20) == 0, parent.stderr
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "children gone")
    wait_for(lambda: cluster.status("q")["workers_current"] == 0, 10, "workers left sqm")


def test_sigkilled_parent_leaves_nothing_behind(cluster: Cluster, rundir: Path) -> None:
    cluster.serve("q")
    parent = cluster.worker("q", processes=2)
    supervisors = {t["pid"] for t in pool_json(cluster, "--meta", "queue=q")}
    children = running_children(cluster)
    assert len(supervisors) == 2 and len(children) == 2
    assert all(pid_alive(p) for p in supervisors | children)  # the probe sees them alive
    parent.signal(signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in supervisors | children), 20, "all gone")
    wait_for(lambda: cluster.status("q")["workers_current"] == 0, 20, "workers deregistered")


def test_max_tasks_per_child_recycles_and_loses_nothing(cluster: Cluster) -> None:
    cluster.serve("q")
    parent = cluster.worker("q", "--max-tasks-per-child", "5", processes=2)
    first = running_children(cluster)
    with Sender("q", timeout=30) as sender:
        ids = [sender.submit("record", i) for i in range(40)]
        replies = [sender.receive(id=mid, timeout=30) for mid in ids]
    assert sorted(r["payload"] for r in replies) == list(range(40))  # every reply
    per_child = Counter(r["pid"] for r in replies)
    assert max(per_child.values()) <= 5, per_child  # exact: nobody did a sixth
    assert len(per_child) >= 8 and not first >= set(per_child)  # the pids changed
    st = wait_for(lambda: (s := cluster.status("q"))["workers_current"] == 2 and s, 20,
                  "two workers again")
    assert st["completed_total"] == 40 and st["redelivered_total"] == 0
    assert parent.popen.poll() is None and "reached its limits" in parent.stderr
    assert len(pool_json(cluster, "--meta", "queue=q")) == 2  # recycled entries are cleaned
    parent.signal(signal.SIGTERM)
    assert parent.wait(20) == 0, parent.stderr


def test_max_memory_per_child_recycles_after_each_message(cluster: Cluster) -> None:
    cluster.serve("q")
    parent = cluster.worker("q", "--max-memory-per-child", "1", processes=1)
    with Sender("q", timeout=30) as sender:
        pids = [sender.rpc("record", i, timeout=30)["pid"] for i in range(4)]
    assert len(set(pids)) == 4  # every Python process is past 1 MB after its message
    assert "recycled after 1 task(s)" in parent.stderr
    parent.signal(signal.SIGTERM)
    assert parent.wait(20) == 0, parent.stderr


def test_autoscale_grows_while_messages_wait_and_shrinks_when_idle(cluster: Cluster) -> None:
    cluster.serve("q")
    parent = cluster.worker("q", "--autoscale", "3,1", processes=1)
    sizes: list[int] = []

    def size(n: int) -> bool:
        sizes.append(cluster.status("q")["workers_current"])
        return sizes[-1] == n

    with Sender("q", timeout=60) as sender:
        ids = [sender.submit("sleep", {"s": 0.3}) for _ in range(40)]
        wait_for(lambda: size(3), 30, "grown to the maximum")
        replies = [sender.receive(id=mid, timeout=60) for mid in ids]
    assert len({r["pid"] for r in replies}) >= 3  # the new workers took work
    wait_for(lambda: size(1), 60, "shrunk to the minimum")  # one by one, 10 s apart
    assert max(sizes) == 3 and min(sizes) == 1  # bounded by MAX,MIN
    parent.signal(signal.SIGTERM)
    assert parent.wait(30) == 0, parent.stderr


def test_four_workers_autostart_exactly_one_sqm(cluster: Cluster, rundir: Path,
                                                brokers_stopped: None) -> None:
    workers = [cluster.sqm("worker", APPS, "--queue", "auto", "--heartbeat", "0.2",
                           "--autostart", name=f"auto-{i}") for i in range(4)]
    cluster.wait_status("auto", timeout=40)  # one of them started it
    cluster.wait_workers("auto", 4, timeout=40)
    brokers = pool_json(cluster, "--meta", "role=sqm")
    assert len(brokers) == 1 and brokers[0]["meta"] == {"role": "sqm", "queue": "auto"}
    assert brokers[0]["state"] == "running"
    with Sender("auto", timeout=20) as sender:
        assert sender.rpc("add", {"a": 2, "b": 3}) == 5
    assert all(w.popen.poll() is None for w in workers)
    out = subprocess.run([sys.executable, "-m", "sqm", "pool", "stop", "--meta", "role=sqm",
                          "--meta", "queue=auto"], cwd=REPO, env=cluster.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert not pid_alive(brokers[0]["pid"]) and not pid_alive(brokers[0]["child_pid"])
    assert [t["state"] for t in pool_json(cluster, "--meta", "role=sqm")] == ["exited"]


def test_worker_api_autostart(cluster: Cluster, rundir: Path, brokers_stopped: None) -> None:
    from worker import Worker

    w = Worker("api", callbacks={"add": lambda _w, _o, p: p["a"] + p["b"]}, heartbeat=0.2,
               autostart=True)
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    try:
        cluster.wait_status("api", timeout=30)
        cluster.wait_workers("api", 1, timeout=30)
        with Sender("api", timeout=20) as sender:
            assert sender.rpc("add", {"a": 20, "b": 22}) == 42
        (broker,) = TaskPool(rundir / "pool").search({"meta": {"role": "sqm", "queue": "api"}})
        assert broker.running
    finally:
        w.terminate()
        thread.join(15)
    assert not thread.is_alive()


def test_children_that_keep_crashing_at_start_up_make_the_parent_give_up(
        cluster: Cluster, rundir: Path) -> None:
    app = rundir / "app"
    app.mkdir()
    (app / "crashy.py").write_text(  # the parent imports it first; every child then crashes
        "import os, pathlib\n"
        "mark = pathlib.Path(__file__).with_suffix('.imported')\n"
        "if mark.exists():\n"
        "    os._exit(3)\n"
        "mark.touch()\n"
        "callbacks = {'pid': lambda w, o, p: os.getpid()}\n")
    cluster.serve("q")
    env = dict(cluster.env, PYTHONPATH=f"{app}:{cluster.env['PYTHONPATH']}")
    proc = subprocess.run([sys.executable, "-m", "sqm", "worker", "crashy:callbacks", "--queue",
                           "q", "--processes", "2"], cwd=app, env=env, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 1, proc.stderr
    assert "keeps crashing at start-up" in proc.stderr
    assert not [t for t in pool_json(cluster, "--meta", "queue=q") if t["state"] != "exited"]
