"""WorkerFleet: N ``sqm worker`` processes kept alive as tasks of a pool.

The pool-side half of ``sqm worker --processes N``: each worker is a task
with meta ``{"queue": Q, "target": "MODULE:ATTR", "fleet": <fleet pid>}``, so
``sqm pool list --meta queue=Q`` shows them and their output is kept. Its
supervisor restarts a crashed worker (``on-failure``, with backoff); the
fleet replaces a worker that left because it reached its limits (it checks
them itself after each message, finishes it, tells sqm it is gone and
exits :data:`RECYCLED`: nothing is lost), can retire workers past
``max_tasks``/``max_memory_mb`` from the queue's status itself (SIGTERM: the
same graceful exit), does not replace a worker asked to stop (exit 0:
``sqm stop-worker``), and follows the :class:`Autoscaler`. Supervisors are ``foreground`` tasks: if the fleet
process dies, even by SIGKILL, the kernel ends them and their workers.

The decisions are the pure :func:`plan_fleet`; :class:`WorkerFleet` only
reads the pool and the queue's status and carries the plan out.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SQMError
from ..pool import sqm_command
from .autoscale import Autoscaler
from .pool import LIVE_STATES, Task, TaskPool

log = logging.getLogger("sqm.taskpool.fleet")

StatusSource = Callable[[], dict[str, Any]]
MAX_GIVE_UPS = 3
#: Exit status of a worker that left because it reached its limits (EX_TEMPFAIL): replace it.
RECYCLED = 75
#: Set (to the fleet's pid) in its workers' environment: serve, don't start a fleet of your own.
FLEET_ENV = "SQM_WORKER_FLEET"


@dataclass(frozen=True)
class Member:
    """What the fleet knows of one of its workers."""

    pid: int                       # the task (supervisor) pid
    child_pid: int | None
    rss_bytes: int | None = None
    tasks_done: int | None = None  # from the queue's status, None when unknown
    busy: bool = False
    retiring: bool = False


@dataclass(frozen=True)
class Limits:
    max_tasks: int | None = None      # per child, then it is replaced
    max_memory_mb: float | None = None


@dataclass
class Plan:
    spawn: int = 0
    retire: list[int] = field(default_factory=list)


def recycle_due(tasks_done: int, rss_bytes: int | None, limits: Limits) -> bool:
    """A worker that has finished ``max_tasks`` messages, or is past ``max_memory_mb`` after one.

    The same rule serves a Worker checking itself after each message.
    """
    if limits.max_tasks and tasks_done >= limits.max_tasks:
        return True
    return bool(limits.max_memory_mb and tasks_done >= 1 and rss_bytes is not None
                and rss_bytes > limits.max_memory_mb * 1024 * 1024)


def plan_fleet(desired: int, members: Sequence[Member], limits: Limits) -> Plan:
    """Retire what must go, start what is missing: capacity stays at ``desired``."""
    plan = Plan()
    active = [m for m in members if not m.retiring]
    for m in active:
        if m.tasks_done is not None and recycle_due(m.tasks_done, m.rss_bytes, limits):
            plan.retire.append(m.pid)
    active = [m for m in active if m.pid not in plan.retire]
    if len(active) < desired:
        plan.spawn = desired - len(active)
    elif len(active) > desired:
        # shrink: idle before busy, newest (highest pid is a poor clock, so by order given) first
        extra = sorted(active, key=lambda m: m.busy)[: len(active) - desired]
        plan.retire += [m.pid for m in extra]
    return plan


def waiting(status: dict[str, Any]) -> int:
    """Messages waiting for a turn, as a queue's status shows them: pending in sqm,
    and held by a worker beyond what it runs at once (its prefetch). A worker
    alone keeps what it prefetched, so pending alone would hide that backlog."""
    held = sum(max(0, int(w.get("in_flight", 0)) - int(w.get("concurrency", 1)))
               for w in status.get("workers", []))
    return int(status.get("pending", 0)) + held


def worker_argv(target: str, queue: str, worker_args: Sequence[str] = ()) -> list[str]:
    """The command of one fleet worker: a single-process ``sqm worker`` (see sqm_command)."""
    return sqm_command("worker", target, "--queue", queue, "--processes", "1", *worker_args)


class WorkerFleet:
    """Keeps ``processes`` workers of ``target`` on ``queue`` running as pool tasks."""

    def __init__(self, pool: TaskPool, queue: str, target: str, processes: int = 1, *,
                 worker_args: Sequence[str] = (), limits: Limits | None = None,
                 autoscaler: Autoscaler | None = None, status: StatusSource | None = None,
                 interval: float = 0.5, env: dict[str, str] | None = None,
                 backoff: float = 1.0, stop_timeout: float = 30.0, echo: bool = False) -> None:
        self.pool = pool
        self.queue = queue
        self.target = target
        self.desired = autoscaler.minimum if autoscaler else processes
        if autoscaler:
            self.desired = max(autoscaler.minimum, min(processes, autoscaler.maximum))
        self.argv = worker_argv(target, queue, worker_args)
        self.limits = limits or Limits()
        self.autoscaler = autoscaler
        self.status = status
        self.interval = interval
        self.env = env
        self.backoff = backoff
        self.stop_timeout = stop_timeout
        self.meta = {"queue": queue, "target": target, "fleet": str(os.getpid())}
        self.retiring: set[int] = set()
        self.give_ups = 0
        self.failed = False
        self.stopping = threading.Event()
        self.seen_exits: set[int] = set()
        self.live = 0
        self.echo = echo

    def tasks(self, snapshot: list[tuple[int, dict[str, Any]]] | None = None,
              ) -> list[tuple[Task, dict[str, Any]]]:
        """This fleet's live tasks with their info (from ``snapshot`` when given)."""
        ours = self._ours() if snapshot is None else snapshot
        return [(Task(self.pool, pid), info) for pid, info in ours
                if info.get("state") in LIVE_STATES]

    def _ours(self) -> list[tuple[int, dict[str, Any]]]:
        return [(pid, info) for pid, info in self.pool.infos()
                if _is_sub(self.meta, info.get("meta"))]

    def members(self, tasks: list[tuple[Task, dict[str, Any]]],
                status: dict[str, Any] | None) -> list[Member]:
        by_pid = {w.get("pid"): w for w in (status or {}).get("workers", [])}
        result = []
        for task, info in tasks:
            row = by_pid.get(info.get("child_pid"))
            result.append(Member(
                pid=task.pid, child_pid=info.get("child_pid"), rss_bytes=info.get("rss_bytes"),
                tasks_done=row.get("tasks_done") if row else None,
                busy=bool(row and row.get("state") == "busy"),
                retiring=task.pid in self.retiring))
        return result

    def step(self, now: float | None = None) -> Plan:
        """One look at the pool and the queue, and the plan carried out."""
        now = time.monotonic() if now is None else now
        ours = self._ours()  # one snapshot: an exit is noted before its slot is refilled
        self._note_exits(ours)
        tasks = self.tasks(ours)
        self.live = len(tasks)
        live = {t.pid for t, _ in tasks}
        self.retiring &= live
        status = self._status()
        members = self.members(tasks, status)
        if self.autoscaler is not None and status is not None:
            serving = {m.child_pid for m in members if not m.retiring}
            idle = sum(1 for w in status.get("workers", [])
                       if w.get("pid") in serving and w.get("state") == "idle")
            self.desired = self.autoscaler.decide(
                now, len(serving), waiting(status), idle)
        plan = plan_fleet(self.desired, members, self.limits)
        for pid in plan.retire:
            self.retiring.add(pid)
            Task(self.pool, pid).kill("TERM")
        for _ in range(plan.spawn):
            self.spawn()
        self.live += plan.spawn
        return plan

    def spawn(self) -> Task:
        env = dict(self.env or {}, **{FLEET_ENV: self.meta["fleet"]})
        return self.pool.spawn(exec=self.argv, meta=self.meta, behavior="foreground",
                               restart="on-failure", env=env, backoff=self.backoff,
                               stop_timeout=self.stop_timeout, ok_codes=(0, RECYCLED),
                               echo=self.echo)

    def _status(self) -> dict[str, Any] | None:
        if self.status is None:
            return None
        try:
            return self.status()
        except SQMError:
            return None

    def _note_exits(self, ours: list[tuple[int, dict[str, Any]]]) -> None:
        """Count give-ups; forget workers that left cleanly; don't replace those asked to stop.

        A worker that exits 0 unasked by the fleet was stopped on purpose (sqm's
        STOP, ``sqm stop-worker``, a SIGTERM of its own): the fleet shrinks by
        one, as ``--processes`` always did. One that exits :data:`RECYCLED`
        reached its limits and is replaced.
        """
        for pid, info in ours:
            if pid in self.seen_exits or info.get("state") in LIVE_STATES:
                continue
            code = info.get("exit_code")
            if info.get("gave_up"):
                self.seen_exits.add(pid)
                self.give_ups += 1
                log.error("worker task %s keeps crashing at start-up (exit code %s); see %s",
                          pid, code, info.get("output_path"))
                if self.give_ups >= MAX_GIVE_UPS:
                    self.failed = True
                    self.stopping.set()
                continue
            if code == 0 and pid not in self.retiring and not self.stopping.is_set():
                self.desired = max(0, self.desired - 1)
                log.info("worker task %s exited on request; %d left", pid, self.desired)
            elif code == RECYCLED:
                log.info("worker task %s reached its limits; starting another", pid)
            if code in (0, RECYCLED):
                self.give_ups = 0
                self.pool.store.remove(pid)  # a clean exit leaves nothing worth reading
            else:
                self.seen_exits.add(pid)

    def run(self) -> int:
        """Until SIGTERM/SIGINT (forwarded to every worker, which finishes its message)."""
        def on_signal(_signum: int, _frame: object) -> None:
            self.stopping.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping.is_set():
                self.step()
                if self.live == 0 and self.desired == 0 and self.autoscaler is None:
                    break  # every worker was asked to stop: so is the fleet
                self.stopping.wait(self.interval)
            return self.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM every worker, wait for all of them; 0 when all stopped cleanly and none gave up."""
        timeout = self.stop_timeout + 5 if timeout is None else timeout
        tasks = [t for t, _ in self.tasks()]
        for task in tasks:
            task.terminate_supervisor(wait=False)  # SIGTERM once: the worker finishes its message
        codes = []
        for task in tasks:
            try:
                codes.append(task.terminate_supervisor(timeout))
            except SQMError:
                codes.append(None)
        self._note_exits(self._ours())
        # -SIGTERM: a worker still starting up, before its handler, so with no message in hand;
        # RECYCLED: one that was leaving by itself as the fleet stopped
        clean = (0, None, -signal.SIGTERM, RECYCLED)
        return 1 if self.failed or any(c not in clean for c in codes) else 0


def _is_sub(pattern: dict[str, Any], meta: Any) -> bool:
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in pattern.items())
