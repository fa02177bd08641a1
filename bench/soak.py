"""Fault-injection soak: many messages through sqm while workers and sqm get SIGKILLed.

    python -m bench.soak [--mode memory|journal|both] [--messages 20000]
                         [--senders 4] [--workers 4] [--kill-every 2.0]
                         [--seed N] [--json FILE]

Topology, all on one host over ``ipc://`` in a private temp run directory
(``SQM_RUNDIR`` in every child's environment):

- ``python -m sqm serve soak --heartbeat 0.25 [--journal FILE]``;
- ``--workers`` processes ``python -m sqm worker bench.soak_apps:callbacks
  --queue soak --heartbeat 0.25``, one worker each;
- ``--senders`` threads in this process, one :class:`sender.Sender` each,
  keeping a window of 20 messages outstanding: ``submit("work", v,
  retries=3, timeout=T)``, then ``receive(id=...)`` in submission order
  (T = 20 s with the journal, 10 s without). ``v = sender * 1_000_000 + i``
  is unique, and the worker returns it, so every reply is checked.

A killer (the harness's main thread, which also spawns every child so that
the children's parent-death signal stays armed) SIGKILLs, every
``--kill-every`` seconds on average (uniformly 0.5x-1.5x, seeded), either a
random worker (a replacement is started at once) or sqm itself (restarted at
once with the same arguments and the same journal file). After each kill it
waits, with a deadline, until sqm answers ``status`` again and lists exactly
the live worker processes, then schedules the next. ``run_soak(...,
kills={"worker": 1, "sqm": 1})`` instead kills at fixed fractions of the
messages settled (deterministic, for CI).

At the end every message id is tallied from the callers' side: replied with
the right value, failed to its sender with a reason (by exception type), or
lost (no outcome at all); replies delivered to a caller more than once are
counted (``receive(id=...)`` per id, then one final ``receive()`` drain).
The workers' own execution logs (``bench/soak_apps.py``) give how often each
message actually ran. Nothing synchronizes by sleeping: every wait is for a
condition with a deadline, and a global deadline bounds the whole run.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
QUEUE = "soak"
METHOD = "work"
APPS = "bench.soak_apps:callbacks"
EXEC_DIR_ENV = "SQM_SOAK_EXEC_DIR"
PARENT_ENV = "SQM_SOAK_PARENT"
HEARTBEAT = 0.25
WINDOW = 20
RETRIES = 3
#: Per-message timeout T (submit(timeout=T), receive waits until then).
TIMEOUTS = {"memory": 10.0, "journal": 20.0}
#: After the last message settles: how long a quiet receive() drain waits.
DRAIN_QUIET_S = 1.0
#: How long to wait for sqm/workers to come back after a kill.
RECOVER_S = 30.0
VALUE_BASE = 1_000_000
MODES = ("memory", "journal")
#: Error types a message may legitimately end with when sqm is not durable.
EXPECTED_FAILURES = ("Timeout", "WorkerLost", "BrokerShutdown", "Expired")

_pause = threading.Event().wait  # the polling interval of a condition wait, never a fixed wait

# Children exec themselves through this tiny launcher: it arms
# PR_SET_PDEATHSIG (SIGKILL) so they die with the harness even if it is
# SIGKILLed itself (no finally, no atexit), then execs the real command line.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "except Exception:\n"
    "    pass\n"
    f"parent = os.environ.get({PARENT_ENV!r})\n"
    "if parent and os.getppid() != int(parent):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
)


class SoakError(Exception):
    """The harness itself could not go on (sqm would not start, a deadline passed...)."""


T = TypeVar("T")


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, every: float = 0.02) -> T:
    """Poll ``cond`` until it returns something truthy; SoakError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SoakError(f"timed out after {timeout:.0f} s waiting for {what}")
        _pause(every)


def _nearest(values: Iterable[float], t: float) -> float | None:
    """The value closest to ``t`` (None if there are none): the sqm kill nearest a timeout."""
    return min(values, key=lambda at: abs(at - t), default=None)


# ---------------------------------------------------------------- children

_LIVE: set[Child] = set()
_LIVE_LOCK = threading.Lock()


def _kill_all_children() -> None:
    """atexit: no child of ours outlives the harness."""
    with _LIVE_LOCK:
        children = list(_LIVE)
    for child in children:
        child.kill()


atexit.register(_kill_all_children)


class Child:
    """A child process in its own session (process group), stderr kept in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.errfile = logdir / f"{name}.stderr"
        with open(self.errfile, "ab") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, *argv],
                env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True,
            )
        self.pid = self.popen.pid
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.errfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def terminate(self) -> None:
        if self.alive:
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL the group whatever happened."""
        self.terminate()
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


# ---------------------------------------------------------------- senders


class SenderRecord:
    """What one sender thread saw, message by message (index i = its i-th message)."""

    def __init__(self, index: int, count: int) -> None:
        self.index = index
        self.count = count
        self.submitted = 0
        self.settled = 0  # messages with a first outcome (progress, read by the killer)
        # i -> outcomes in the order the caller saw them: ("ok", value) or (error type, text)
        self.outcomes: list[list[tuple[str, Any]]] = [[] for _ in range(count)]
        self.submit_failed: set[int] = set()  # submit itself raised: no id, nothing outstanding
        self.drained_errors: list[tuple[str, str]] = []  # errors from the final receive()
        self.drained_foreign: list[Any] = []  # values from the drain that are not ours
        self.submitted_at: list[float] = [0.0] * count  # monotonic, for Timeout diagnostics
        # i -> what the Sender knew when the message timed out (diagnostics only)
        self.timeout_info: dict[int, dict[str, Any]] = {}
        self.dropped: int | None = None  # replies the Sender dropped (late/duplicate)
        self.crash: str | None = None
        self.main_done = False
        self.finished = False

    def value(self, i: int) -> int:
        return self.index * VALUE_BASE + i


def _error_name(exc: BaseException) -> str:
    from sqm.errors import RemoteError

    if isinstance(exc, RemoteError):
        return f"RemoteError:{exc.type}"
    return type(exc).__name__


def _sender_knowledge(s: Any, mid: str) -> dict[str, Any]:
    """What a Sender knew of ``mid`` (private state, read defensively: diagnostics only)."""
    core = getattr(s, "_core", None)
    info: dict[str, Any] = {"id": mid}
    for name in ("accepted", "started"):
        known = getattr(core, name, None)
        if known is not None:
            info[name] = mid in known
    links = getattr(s, "_links", None)
    if links is not None:
        info["resent_total"] = getattr(links, "resent", None)
        sent = getattr(core, "sent", {}).get(mid)
        if sent is not None:
            info["epoch_sent"] = sent[2]
            info["link_epoch"] = getattr(sent[1], "epoch", None)
    return info


def _sender_thread(rec: SenderRecord, endpoint: str, timeout: float, window: int,
                   go: threading.Event, drain_go: threading.Event, abort: threading.Event,
                   deadline: float) -> None:
    from sender import Sender
    from sqm.errors import SQMError, Timeout

    def settle(s: Any, mid: str, i: int) -> None:
        try:
            rec.outcomes[i].append(("ok", s.receive(id=mid)))
        except Timeout as exc:
            rec.outcomes[i].append(("Timeout", str(exc)))
            rec.timeout_info[i] = _sender_knowledge(s, mid)
        except SQMError as exc:
            rec.outcomes[i].append((_error_name(exc), str(exc)))
        rec.settled += 1

    try:
        with Sender(QUEUE, endpoint=endpoint, timeout=timeout) as s:
            go.wait(max(0.0, deadline - time.monotonic()))
            pending: collections.deque[tuple[str, int]] = collections.deque()
            for i in range(rec.count):
                if abort.is_set():
                    break
                try:
                    mid = s.submit(METHOD, rec.value(i), retries=RETRIES, timeout=timeout)
                except SQMError as exc:  # e.g. Timeout: sqm did not take it in time
                    rec.outcomes[i].append((_error_name(exc), f"at submit: {exc}"))
                    rec.submit_failed.add(i)
                    rec.submitted += 1
                    rec.settled += 1
                    continue
                rec.submitted += 1
                rec.submitted_at[i] = time.monotonic()
                pending.append((mid, i))
                if len(pending) >= window:
                    settle(s, *pending.popleft())
            while pending and not abort.is_set():
                settle(s, *pending.popleft())
            rec.main_done = True
            drain_go.wait(max(0.0, deadline - time.monotonic()))
            # The final drain: anything the caller could still be handed (a late
            # reply to a message that timed out, or a duplicate) shows up here.
            while not abort.is_set():
                try:
                    value = s.receive(timeout=DRAIN_QUIET_S)
                except Timeout:
                    break
                except SQMError as exc:
                    if type(exc) is SQMError and "nothing to receive" in str(exc):
                        break
                    rec.drained_errors.append((_error_name(exc), str(exc)))
                    continue
                i = value - rec.value(0) if isinstance(value, int) else -1
                if 0 <= i < rec.count:
                    rec.outcomes[i].append(("ok", value))
                else:
                    rec.drained_foreign.append(value)
            rec.dropped = getattr(getattr(s, "_core", None), "dropped", None)
    except BaseException:  # reported in the figures: a harness bug, not sqm's
        rec.crash = traceback.format_exc()
    finally:
        rec.main_done = True
        rec.finished = True


# ---------------------------------------------------------------- the run


class Soak:
    """One soak run in one mode (see the module docstring)."""

    def __init__(self, mode: str, messages: int, senders: int, workers: int, kill_every: float,
                 seed: int, kills: dict[str, int] | None = None, *, msg_timeout: float | None = None,
                 window: int = WINDOW, deadline_s: float | None = None,
                 sqm_kill_share: float = 0.5, keep_tmp: bool = False,
                 progress: Callable[[str], None] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if messages < senders or senders < 1 or workers < 1:
            raise ValueError("need senders >= 1, workers >= 1 and messages >= senders")
        if messages // senders >= VALUE_BASE:
            raise ValueError(f"at most {VALUE_BASE - 1} messages per sender")
        self.mode = mode
        self.messages = messages
        self.n_senders = senders
        self.n_workers = workers
        self.kill_every = kill_every
        self.seed = seed
        self.kills_plan = dict(kills) if kills is not None else None
        self.timeout = msg_timeout if msg_timeout is not None else TIMEOUTS[mode]
        self.window = window
        self.deadline_s = deadline_s if deadline_s is not None else max(600.0, messages / 20)
        self.sqm_kill_share = sqm_kill_share
        self.keep_tmp = keep_tmp
        self.say = progress or (lambda _msg: None)
        self.rng = random.Random(seed)
        self.kill_log: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.workers: list[Child] = []
        self.retired: list[Child] = []  # killed or exited workers (their logs)
        self.sqm: Child | None = None
        self.sqm_runs: list[Child] = []
        self.worker_seq = 0
        self.unexpected_exits: list[str] = []

    # ------------------------------------------------------------ children

    def _start_sqm(self) -> Child:
        run = len(self.sqm_runs)
        child = Child(f"sqm-{run}", self.sqm_argv, self.env, self.rundir)
        self.sqm_runs.append(child)
        self.sqm = child
        return child

    def _start_worker(self) -> Child:
        self.worker_seq += 1
        argv = ["-m", "sqm", "worker", APPS, "--queue", QUEUE, "--heartbeat", str(HEARTBEAT)]
        child = Child(f"worker-{self.worker_seq}", argv, self.env, self.rundir)
        self.workers.append(child)
        return child

    def _status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        from sqm.admin import fetch_status
        from sqm.errors import SQMError

        try:
            return fetch_status(self.settings, timeout)
        except SQMError:
            return None

    def _check_sqm_alive(self) -> None:
        if self.sqm is not None and not self.sqm.alive:
            raise SoakError(f"sqm exited on its own (code {self.sqm.popen.returncode}):\n"
                            f"{self.sqm.stderr_tail()}")

    def _check_workers(self) -> None:
        """A worker that died without being killed is a finding: log it, replace it."""
        for child in list(self.workers):
            if not child.alive:
                self.unexpected_exits.append(
                    f"{child.name} (pid {child.pid}) exited with {child.popen.returncode}: "
                    f"{child.stderr_tail(5)}")
                self.workers.remove(child)
                self.retired.append(child)
                if len(self.unexpected_exits) > 2 * self.n_workers:
                    raise SoakError(f"{len(self.unexpected_exits)} workers exited on their own "
                                    f"(crash loop?); last: {self.unexpected_exits[-1]}")
                self._start_worker()

    def _wait_sqm_answers(self) -> dict[str, Any]:
        def answers() -> dict[str, Any] | None:
            self._check_sqm_alive()
            return self._status(0.5)

        return wait_for(answers, RECOVER_S, "sqm to answer status")

    def _wait_workers_registered(self) -> dict[str, Any]:
        """Until sqm lists exactly our live worker processes (dead ones dropped)."""
        def matches() -> dict[str, Any] | None:
            self._check_sqm_alive()
            self._check_workers()
            st = self._status(0.5)
            if st is None:
                return None
            listed = sorted(int(w["pid"]) for w in st["workers"])
            ours = sorted(c.pid for c in self.workers)
            return st if listed == ours and st["workers_current"] == len(ours) else None

        return wait_for(matches, RECOVER_S, f"{self.n_workers} workers registered with sqm")

    # ------------------------------------------------------------ kills

    def _kill(self, kind: str, progress: int) -> None:
        t0 = time.monotonic()
        event: dict[str, Any] = {"kind": kind, "at_s": round(t0 - self.t_start, 3),
                                 "settled_before": progress}
        if kind == "worker":
            victim = self.workers.pop(self.rng.randrange(len(self.workers)))
            event["pid"] = victim.pid
            victim.kill()
            self.retired.append(victim)
            self._start_worker()
        else:
            sqm = self.sqm
            assert sqm is not None
            event["pid"] = sqm.pid
            sqm.kill()
            self._start_sqm()
            self._wait_sqm_answers()
            event["sqm_back_s"] = round(time.monotonic() - t0, 3)
        self._wait_workers_registered()
        event["recovered_s"] = round(time.monotonic() - t0, 3)
        self.kill_log.append(event)
        self.say(f"[{self.mode}] t={event['at_s']:.1f}s killed {kind} pid {event['pid']} "
                 f"after {progress} settled; recovered in {event['recovered_s']:.2f}s")

    def _kill_schedule(self) -> list[tuple[int, str]]:
        """Fixed kills (CI): spread evenly over the run, kinds alternating."""
        assert self.kills_plan is not None
        left = {k: int(v) for k, v in self.kills_plan.items() if int(v) > 0}
        unknown = set(left) - {"worker", "sqm"}
        if unknown:
            raise ValueError(f"unknown kill kinds {sorted(unknown)}; use 'worker' and 'sqm'")
        kinds: list[str] = []
        while left:
            for kind in ("worker", "sqm"):
                if left.get(kind):
                    kinds.append(kind)
                    left[kind] -= 1
                    if not left[kind]:
                        del left[kind]
        total = len(kinds)
        return [(self.messages * (j + 1) // (total + 1), kind) for j, kind in enumerate(kinds)]

    def _settled(self) -> int:
        return sum(r.settled for r in self.records)

    def _senders_done(self) -> bool:
        return all(r.main_done for r in self.records)

    def _killer(self) -> None:
        """Runs in the main thread until every sender has settled its messages."""
        schedule = self._kill_schedule() if self.kills_plan is not None else None
        next_at = None
        last_report = time.monotonic()
        while not self._senders_done():
            now = time.monotonic()
            if now > self.deadline:
                raise SoakError(f"global deadline ({self.deadline_s:.0f} s) passed with "
                                f"{self._settled()}/{self.messages} settled")
            self._check_sqm_alive()
            self._check_workers()
            if now - last_report > 5:
                last_report = now
                self.say(f"[{self.mode}] t={now - self.t_start:.0f}s "
                         f"{self._settled()}/{self.messages} settled")
            if schedule is not None:
                if schedule and self._settled() >= schedule[0][0]:
                    _threshold, kind = schedule.pop(0)
                    self._kill(kind, self._settled())
                    continue
            elif self.kill_every > 0:
                if next_at is None:
                    next_at = now + self.kill_every * self.rng.uniform(0.5, 1.5)
                if now >= next_at:
                    kind = "sqm" if self.rng.random() < self.sqm_kill_share else "worker"
                    self._kill(kind, self._settled())
                    next_at = None
                    continue
            _pause(0.02)
        if schedule:
            self.notes.append(f"{len(schedule)} scheduled kill(s) not done: the run ended first")

    # ------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        from sqm.config import resolve

        self.rundir = Path(tempfile.mkdtemp(prefix="sqms-", dir="/tmp"))  # short: ipc paths
        self.execdir = self.rundir / "exec"
        self.execdir.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE")}
        env["SQM_RUNDIR"] = str(self.rundir)
        env[EXEC_DIR_ENV] = str(self.execdir)
        env[PARENT_ENV] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.env = env
        self.endpoint = f"ipc://{self.rundir / (QUEUE + '.sock')}"
        self.settings = resolve(QUEUE, endpoint=self.endpoint, config={})
        self.sqm_argv = ["-m", "sqm", "serve", QUEUE, "--heartbeat", str(HEARTBEAT)]
        self.journal = self.rundir / "soak.journal" if self.mode == "journal" else None
        if self.journal is not None:
            self.sqm_argv += ["--journal", str(self.journal)]
        self.deadline = time.monotonic() + self.deadline_s
        self.t_start = time.monotonic()
        go, drain_go, abort = threading.Event(), threading.Event(), threading.Event()
        per = [self.messages // self.n_senders] * self.n_senders
        for k in range(self.messages % self.n_senders):
            per[k] += 1
        self.records = [SenderRecord(k, n) for k, n in enumerate(per)]
        threads: list[threading.Thread] = []
        error: str | None = None
        final_status: dict[str, Any] | None = None
        t_first = t_last = time.monotonic()
        try:
            self._start_sqm()
            self._wait_sqm_answers()
            for _ in range(self.n_workers):
                self._start_worker()
            self._wait_workers_registered()
            for rec in self.records:
                t = threading.Thread(
                    target=_sender_thread, name=f"soak-sender-{rec.index}", daemon=True,
                    args=(rec, self.endpoint, self.timeout, self.window, go, drain_go, abort,
                          self.deadline))
                t.start()
                threads.append(t)
            self.t_start = t_first = time.monotonic()
            go.set()
            self.say(f"[{self.mode}] {self.messages} messages, {self.n_senders} senders, "
                     f"{self.n_workers} workers, T={self.timeout:g}s, rundir {self.rundir}")
            self._killer()
            t_last = time.monotonic()
            # Let sqm finish what it still holds (journal redeliveries run now), then drain.
            try:
                final_status = wait_for(
                    lambda: (st := self._status(1.0)) is not None
                    and st["pending"] == 0 and st["in_flight"] == 0 and st,
                    max(30.0, 2 * self.timeout), "sqm to hold nothing")
            except SoakError as exc:
                self.notes.append(str(exc))
                final_status = self._status(1.0)
            drain_go.set()
            for t in threads:
                t.join(max(0.1, self.deadline - time.monotonic()))
            if any(t.is_alive() for t in threads):
                raise SoakError("sender threads still running at the global deadline")
        except Exception as exc:  # figures are still reported, marked aborted
            error = f"{type(exc).__name__}: {exc}"
            t_last = time.monotonic()
        except BaseException:  # Ctrl-C, SIGTERM (SystemExit): clean up and go
            self._teardown()
            if not self.keep_tmp:
                shutil.rmtree(self.rundir, ignore_errors=True)
            raise
        finally:  # also on KeyboardInterrupt/SystemExit, which propagate
            abort.set()
            drain_go.set()
            go.set()
            self._teardown()
        return self._figures(t_last - t_first, error, final_status)

    def _teardown(self) -> None:
        """Workers leave first (so they finish writing), then sqm; SIGKILL whatever stays."""
        for child in self.workers:
            child.terminate()
        for child in self.workers:
            child.stop(5.0)
        if self.sqm is not None:
            self.sqm.stop(5.0)

    # ------------------------------------------------------------ figures

    def _executions(self) -> collections.Counter[int]:
        counts: collections.Counter[int] = collections.Counter()
        for path in self.execdir.glob("*.log"):
            for line in path.read_bytes().splitlines():
                if line.strip():
                    counts[int(line)] += 1
        return counts

    def _log_findings(self) -> list[str]:
        """Tracebacks and errors in the children's logs (first lines of each)."""
        found: list[str] = []
        for path in sorted(self.rundir.glob("*.stderr")):
            lines = path.read_text(errors="replace").splitlines()
            for n, line in enumerate(lines):
                if "Traceback" in line or " ERROR " in line or "CRITICAL" in line:
                    found.append(f"{path.name}:{n + 1}: {line.strip()}")
        return found[:50]

    def _figures(self, duration: float, error: str | None,
                 final_status: dict[str, Any] | None) -> dict[str, Any]:
        executions = self._executions()
        ok = wrong = lost = late_after_timeout = dup_ids = dup_replies = 0
        failed: collections.Counter[str] = collections.Counter()
        ok_never_executed: list[int] = []
        lost_values: list[int] = []
        dup_values: list[int] = []
        wrong_values: list[tuple[int, Any]] = []
        for rec in self.records:
            timed_out_without_late = 0
            for i, outs in enumerate(rec.outcomes):
                value = rec.value(i)
                if i >= rec.submitted and not outs:
                    continue  # never submitted (aborted run): counted apart
                if not outs:
                    lost += 1
                    lost_values.append(value)
                    continue
                kind, got = outs[0]
                if kind == "ok":
                    if got == value:
                        ok += 1
                        if executions[value] == 0:
                            ok_never_executed.append(value)
                    else:
                        wrong += 1
                        wrong_values.append((value, got))
                else:
                    failed[kind] += 1
                # delivered replies: results and errors that came from sqm or a
                # worker; a Timeout is the caller's own deadline, not a reply
                replies = [o for o in outs if o[0] != "Timeout"]
                if kind == "Timeout" and i not in rec.submit_failed:
                    if replies:
                        late_after_timeout += 1
                    else:
                        timed_out_without_late += 1
                if len(replies) > 1:
                    dup_ids += 1
                    dup_replies += len(replies) - 1
                    dup_values.append(value)
            # errors drained by receive() carry no id: they can only belong to
            # messages that had timed out (still outstanding); any excess is a duplicate
            extra = len(rec.drained_errors) + len(rec.drained_foreign)
            excess = max(0, extra - timed_out_without_late) if extra else 0
            dup_replies += excess
            late_after_timeout += extra - excess
        not_sent = sum(r.count - r.submitted for r in self.records)
        executed_ids = set(executions)
        all_values = {r.value(i) for r in self.records for i in range(r.count)}
        kills = collections.Counter(e["kind"] for e in self.kill_log)
        crashes = [r.crash for r in self.records if r.crash]
        findings = self._log_findings()
        failed_total = sum(failed.values())
        figures: dict[str, Any] = {
            "mode": self.mode,
            "messages": self.messages,
            "senders": self.n_senders,
            "workers": self.n_workers,
            "window": self.window,
            "retries": RETRIES,
            "timeout_s": self.timeout,
            "kill_every_s": self.kill_every,
            "kills_plan": self.kills_plan,
            "seed": self.seed,
            "ok": ok,
            "failed": failed_total,
            "failed_by_type": dict(sorted(failed.items())),
            "lost": lost,
            "duplicated_replies": dup_replies,
            "duplicated_ids": dup_ids,
            "wrong_value": wrong,
            "not_sent": not_sent,
            "late_reply_after_timeout": late_after_timeout,
            "replies_dropped_by_sender": sum(r.dropped or 0 for r in self.records),
            "executions_total": sum(executions.values()),
            "executed_more_than_once": sum(1 for c in executions.values() if c > 1),
            "max_executions_of_one_message": max(executions.values(), default=0),
            "failed_but_executed": sum(
                1 for r in self.records for i, outs in enumerate(r.outcomes)
                if outs and outs[0][0] != "ok" and executions[r.value(i)] > 0),
            "ok_never_executed": len(ok_never_executed),
            "executed_unknown_values": len(executed_ids - all_values),
            "worker_kills": kills.get("worker", 0),
            "sqm_kills": kills.get("sqm", 0),
            "unexpected_worker_exits": len(self.unexpected_exits),
            "duration_s": round(duration, 3),
            "messages_per_s": round(self.messages / duration, 1) if duration > 0 else 0.0,
            "kill_log": self.kill_log,
            "aborted": error is not None,
            "error": error,
            "notes": self.notes + self.unexpected_exits,
            "sender_crashes": crashes,
            "log_findings": findings,
            "samples": {
                "lost": lost_values[:20],
                "duplicated": dup_values[:20],
                "wrong": wrong_values[:20],
                "ok_never_executed": ok_never_executed[:20],
                "timeouts": [r.value(i) for r in self.records for i, o in enumerate(r.outcomes)
                             if o and o[0][0] == "Timeout"][:20],
                # per timed-out message: when it was submitted (s into the run), the
                # nearest sqm kill, and what the Sender knew of it
                "timeout_details": [
                    {"value": r.value(i), "submitted_s": round(r.submitted_at[i] - self.t_start, 3),
                     "executions": executions[r.value(i)],
                     "nearest_sqm_kill_s": _nearest(
                         (e["at_s"] for e in self.kill_log if e["kind"] == "sqm"),
                         r.submitted_at[i] - self.t_start),
                     **info}
                    for r in self.records for i, info in sorted(r.timeout_info.items())][:200],
            },
            "final_sqm_status": None if final_status is None else {
                k: final_status.get(k) for k in (
                    "pending", "in_flight", "workers_current", "workers_ever", "assigned_total",
                    "completed_total", "failed_total", "expired_total", "redelivered_total",
                    "malformed_total", "send_dropped_total", "journal")},
        }
        suspicious = (lost or dup_replies or wrong or ok_never_executed or crashes or error
                      or (self.mode == "journal" and ok != self.messages))
        if self.keep_tmp or suspicious:
            figures["rundir"] = str(self.rundir)
        else:
            shutil.rmtree(self.rundir, ignore_errors=True)
        return figures


def run_soak(mode: str, messages: int, senders: int, workers: int, kill_every: float, seed: int,
             kills: dict[str, int] | None = None, **options: Any) -> dict[str, Any]:
    """Run one soak in ``mode`` ('memory' or 'journal') and return its figures.

    ``kills``, e.g. ``{"worker": 1, "sqm": 1}``, replaces the timed killer by
    that many kills at evenly spread counts of settled messages
    (deterministic). Keyword options: ``msg_timeout``, ``window``,
    ``deadline_s``, ``sqm_kill_share``, ``keep_tmp``, ``progress`` (a
    callable taking a line of text). The run directory is kept (its path in
    ``figures["rundir"]``) when something looks wrong, for the logs.
    """
    return Soak(mode, messages, senders, workers, kill_every, seed, kills, **options).run()


# ---------------------------------------------------------------- report

ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("messages sent", lambda f: f["messages"] - f["not_sent"]),
    ("replied once, right value", lambda f: f["ok"]),
    ("failed to sender (total)", lambda f: f["failed"]),
]
TAIL_ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("**lost** (no outcome; must be 0)", lambda f: f["lost"]),
    ("**duplicated replies to caller** (must be 0)", lambda f: f["duplicated_replies"]),
    ("wrong value (must be 0)", lambda f: f["wrong_value"]),
    ("late reply after Timeout (info)", lambda f: f["late_reply_after_timeout"]),
    ("replies dropped by Sender (late/dup, info)", lambda f: f["replies_dropped_by_sender"]),
    ("worker executions (total)", lambda f: f["executions_total"]),
    ("messages executed > once (info)", lambda f: f["executed_more_than_once"]),
    ("failed but executed (info)", lambda f: f["failed_but_executed"]),
    ("replied but never executed (must be 0)", lambda f: f["ok_never_executed"]),
    ("worker SIGKILLs", lambda f: f["worker_kills"]),
    ("sqm SIGKILLs", lambda f: f["sqm_kills"]),
    ("unexpected worker exits", lambda f: f["unexpected_worker_exits"]),
    ("duration (s)", lambda f: f"{f['duration_s']:.1f}"),
    ("messages/s", lambda f: f"{f['messages_per_s']:.0f}"),
]


def _failed_of_type(kind: str) -> Callable[[dict[str, Any]], Any]:
    """Row getter for one failure type (a function, so each row binds its own ``kind``)."""
    return lambda f: f["failed_by_type"].get(kind, 0)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    modes = list(results)
    types = sorted({t for f in results.values() for t in f["failed_by_type"]})
    rows = list(ROWS)
    rows += [(f"  failed: {t}", _failed_of_type(t)) for t in types]
    rows += TAIL_ROWS
    out = ["| | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    for label, get in rows:
        out.append(f"| {label} | " + " | ".join(str(get(results[m])) for m in modes) + " |")
    return "\n".join(out)


def verdict(figures: dict[str, Any]) -> list[str]:
    """What is wrong with a run's figures (empty: the invariants held)."""
    bad = []
    for key in ("lost", "duplicated_replies", "wrong_value", "ok_never_executed"):
        if figures[key]:
            bad.append(f"{figures['mode']}: {key} = {figures[key]}")
    if figures["aborted"]:
        bad.append(f"{figures['mode']}: aborted: {figures['error']}")
    if figures["sender_crashes"]:
        bad.append(f"{figures['mode']}: {len(figures['sender_crashes'])} sender thread(s) crashed")
    if figures["mode"] == "memory":
        unexpected = set(figures["failed_by_type"]) - set(EXPECTED_FAILURES)
        if unexpected:
            bad.append(f"memory: unexpected failure types {sorted(unexpected)}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Fault-injection soak: SIGKILL workers and sqm under load, tally every message.")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=2.0,
                        help="mean seconds between kills (0: no kills)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sqm-kill-share", type=float, default=0.5,
                        help="probability that a kill hits sqm rather than a worker")
    parser.add_argument("--deadline", type=float, default=None,
                        help="global deadline per mode, seconds [max(600, messages/20)]")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep each run's directory (logs)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    command = "python -m bench.soak " + shlex.join(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally/atexit clean up

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    modes = list(MODES) if args.mode == "both" else [args.mode]
    results: dict[str, dict[str, Any]] = {}
    try:
        for mode in modes:
            results[mode] = run_soak(
                mode, args.messages, args.senders, args.workers, args.kill_every, args.seed,
                deadline_s=args.deadline, sqm_kill_share=args.sqm_kill_share,
                keep_tmp=args.keep_tmp, progress=say)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    timeouts = ", ".join(f"{m} {results[m]['timeout_s']:g} s" for m in modes)
    print(f"`{command}`\n")
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"seed {args.seed}, window {WINDOW}, retries {RETRIES}, "
          f"T = {timeouts}\n")
    print(markdown_table(results))
    problems = [p for f in results.values() for p in verdict(f)]
    for f in results.values():
        for note in f["notes"]:
            print(f"\nnote ({f['mode']}): {note}")
        if f.get("rundir"):
            print(f"\nlogs ({f['mode']}): {f['rundir']}")
    if problems:
        print("\nINVARIANTS VIOLATED:\n- " + "\n- ".join(problems))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"command": command, "machine": {
                "host": platform.node(), "cores": os.cpu_count(),
                "python": platform.python_version()}, "results": results}, fh, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
