"""The pool-side building blocks of `sqm worker --processes/--autoscale/--autostart`.

WorkerFleet keeps real `sqm worker` processes as pool tasks; autostart_broker
starts exactly one `sqm serve` for any number of concurrent callers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sender import Sender
from sqm.taskpool import TaskPool
from sqm.taskpool.autoscale import Autoscaler
from sqm.taskpool.fleet import Limits, WorkerFleet
from sqm.taskpool.store import pid_alive
from tests.conftest import APPS, REPO, Cluster, wait_for
from tests.system.test_taskpool import HELPER

META = {"queue": "q", "target": APPS}


@pytest.fixture
def pool(rundir: Path) -> Iterator[TaskPool]:
    task_pool = TaskPool(rundir / "pool", create=True)
    yield task_pool
    for task in task_pool.search({"state": "running"}):
        task.terminate_supervisor(10)


class Stepper:
    """Runs fleet.step() every 0.1 s in a thread (run() wants the main thread's signals)."""

    def __init__(self, fleet: WorkerFleet) -> None:
        self.fleet = fleet
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            self.fleet.step()
            self.done.wait(0.1)

    def stop(self) -> int:
        self.done.set()
        self.thread.join(10)
        return self.fleet.stop(15)


def make_fleet(cluster: Cluster, pool: TaskPool, n: int, **kwargs: object) -> WorkerFleet:
    return WorkerFleet(pool, "q", APPS, n, worker_args=["--heartbeat", "0.2"], env=cluster.env,
                       status=lambda: cluster.status("q"), backoff=0.05, **kwargs)  # type: ignore[arg-type]


def fleet_pids(pool: TaskPool) -> set[int]:
    """The worker pids of the fleet's running tasks (one info read per task)."""
    return {info["child_pid"] for _, info in pool.infos()
            if info["state"] == "running" and info["meta"].items() >= META.items()}


def test_fleet_children_are_pool_tasks_and_are_kept_alive(cluster: Cluster, pool: TaskPool) -> None:
    cluster.serve("q")
    stepper = Stepper(make_fleet(cluster, pool, 2))
    cluster.wait_workers("q", 2)
    tasks = pool.search({"meta": META, "state": "running"})
    assert len(tasks) == 2
    workers = {w["pid"] for w in cluster.status("q")["workers"]}
    assert workers == fleet_pids(pool)  # the registered workers are the tasks' children
    victim = tasks[0].info["child_pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: tasks[0].info["restarts"] == 1, 20, "crashed worker restarted")
    # its supervisor restarted it: the same task, a new worker
    wait_for(lambda: len(fleet_pids(pool) - {victim}) == 2 and cluster.status("q")
             ["workers_current"] == 2, 20, "two workers again")
    assert len(pool.search({"meta": META})) == 2  # the fleet did not add one
    children = fleet_pids(pool)
    assert stepper.stop() == 0
    assert not any(pid_alive(p) for p in children) and not any(t.running for t in tasks)


def test_recycling_by_tasks_and_memory_loses_nothing(cluster: Cluster, pool: TaskPool) -> None:
    cluster.serve("q")
    stepper = Stepper(make_fleet(cluster, pool, 1, limits=Limits(max_tasks=2)))
    cluster.wait_workers("q", 1)
    with Sender("q", timeout=30) as sender:
        served = [sender.rpc("sleep", {"s": 0.1}, timeout=30)["pid"] for _ in range(8)]
    assert len(set(served)) >= 2  # replaced along the way, and every reply came back
    assert stepper.stop() == 0

    stepper = Stepper(make_fleet(cluster, pool, 1, limits=Limits(max_memory_mb=1)))
    wait_for(lambda: fleet_pids(pool), 20, "a worker task")
    with Sender("q", timeout=30) as sender:
        wait_for(lambda: cluster.status("q")["workers_current"] >= 1, 20, "registered")
        served = [sender.rpc("sleep", {"s": 0.1}, timeout=30)["pid"] for _ in range(4)]
    assert len(set(served)) >= 2  # every worker is past 1 MB after a message
    assert stepper.stop() == 0


def test_autoscale_up_and_down(cluster: Cluster, pool: TaskPool) -> None:
    cluster.serve("q")
    scaler = Autoscaler(maximum=3, minimum=1, up_after=0.2, down_after=0.8, cooldown=0.3)
    stepper = Stepper(make_fleet(cluster, pool, 1, autoscaler=scaler))
    cluster.wait_workers("q", 1)
    with Sender("q", timeout=30) as sender:
        ids = [sender.submit("sleep", {"s": 0.4}) for _ in range(15)]
        wait_for(lambda: len(fleet_pids(pool)) == 3, 20, "grown to the maximum")
        for mid in ids:
            sender.receive(id=mid, timeout=30)
    wait_for(lambda: len(fleet_pids(pool)) == 1, 30, "shrunk to the minimum")
    assert stepper.stop() == 0


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_fleet_process_leaves_nothing_behind(cluster: Cluster, pool: TaskPool, how: int) -> None:
    cluster.serve("q")
    proc = subprocess.Popen([*HELPER, "fleet", pool.path, "q", "2"], cwd=REPO, env=cluster.env,
                            stdout=subprocess.PIPE, text=True)
    cluster.wait_workers("q", 2)
    supervisors = {t.pid for t in pool.search({"meta": META})}
    children = fleet_pids(pool)
    assert len(supervisors) == 2 and len(children) == 2
    proc.send_signal(how)
    code = proc.wait(20)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in supervisors | children), 20, "all gone")
    wait_for(lambda: cluster.status("q")["workers_current"] == 0, 20, "workers deregistered")


def test_autostart_starts_exactly_one_broker(rundir: Path, cluster: Cluster) -> None:
    callers = [subprocess.Popen([*HELPER, "autostart", "auto"], cwd=REPO, env=cluster.env,
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [c.communicate(timeout=40)[0].strip() for c in callers]
    assert all(c.returncode == 0 for c in callers), outputs
    pool = TaskPool(rundir / "pool")
    brokers = pool.search({"meta": {"role": "sqm", "queue": "auto"}})
    assert len(brokers) == 1 and brokers[0].running  # exactly one sqm, whoever asked
    assert set(outputs) <= {str(brokers[0].pid), "none"}
    assert cluster.status("auto")["queue"] == "auto"
    again = subprocess.run([*HELPER, "autostart", "auto"], cwd=REPO, env=cluster.env,
                           capture_output=True, text=True, timeout=30)
    assert again.stdout.strip() == "none"  # a broker answers: nothing started
    assert len(pool.search({"meta": {"role": "sqm"}})) == 1
    assert os.getsid(brokers[0].pid) != os.getsid(0)  # a daemon: its own session
    assert brokers[0].terminate_supervisor(15) == 0  # sqm serve stops cleanly on SIGTERM
