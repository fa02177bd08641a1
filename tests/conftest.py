"""Fixtures that run real sqm, worker and sender processes on real sockets.

Every wait here is for a condition with a deadline (a process exit, a
status figure, a socket file); nothing sleeps a fixed time and hopes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sqm.admin import fetch_status
from sqm.config import resolve
from sqm.errors import SQMError

REPO = Path(__file__).resolve().parent.parent
APPS = "tests.apps:callbacks"
_pause = threading.Event().wait  # the polling interval of wait_for, never a fixed wait


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` every 20 ms until it returns something truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        _pause(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines the test apps' workers have appended to ``path`` so far.

    A line still being written (no newline yet: the file is read while
    worker processes append to it) waits for the next look.
    """
    if not path.exists():
        return []
    text = path.read_text()
    done = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in done.splitlines() if line.strip()]


class Proc:
    """A child process whose stderr is kept in a file for failure reports."""

    def __init__(self, argv: list[str], env: dict[str, str], logdir: Path, name: str) -> None:
        self.name = name
        self.errfile = logdir / f"{name}-{time.monotonic_ns()}.stderr"
        self._err = open(self.errfile, "wb")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._err,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    @property
    def stderr(self) -> str:
        self._err.flush()
        return self.errfile.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the whole session if it does not go in 10 s."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._err.close()


class Cluster:
    """Starts brokers and workers for one test and cleans all of them up."""

    def __init__(self, rundir: Path, env: dict[str, str]) -> None:
        self.rundir = rundir
        self.env = env
        self.procs: list[Proc] = []
        self.log = Path(env["SQM_TEST_LOG"])

    def sqm(self, *args: str, name: str = "sqm") -> Proc:
        proc = Proc([sys.executable, "-m", "sqm", *args], self.env, self.rundir, name)
        self.procs.append(proc)
        return proc

    def serve(self, queue: str = "q", *args: str, endpoint: str | None = None,
              heartbeat: float = 0.2) -> Proc:
        argv = ["serve", queue, "--heartbeat", str(heartbeat), *args]
        if endpoint:
            argv += ["--endpoint", endpoint]
        proc = self.sqm(*argv, name=f"serve-{queue}")
        self.wait_status(queue, endpoint=endpoint, proc=proc)
        return proc

    def worker(self, queue: str = "q", *args: str, target: str = APPS, processes: int = 1,
               endpoint: str | None = None, heartbeat: float = 0.2, wait: bool = True) -> Proc:
        # Counted by workers_ever (distinct workers seen): a worker that died before
        # this one registers may be removed meanwhile, so the current count can dip.
        before = self.status(queue, endpoint=endpoint)["workers_ever"] if wait else 0
        argv = ["worker", target, "--queue", queue, "--processes", str(processes),
                "--heartbeat", str(heartbeat), *args]
        if endpoint:
            argv += ["--endpoint", endpoint]
        proc = self.sqm(*argv, name=f"worker-{queue}")
        if wait:
            self.wait_registered(queue, before + processes, endpoint=endpoint, proc=proc)
        return proc

    def status(self, queue: str = "q", endpoint: str | None = None) -> dict[str, Any]:
        return fetch_status(resolve(queue, endpoint=endpoint), timeout=5.0)

    def wait_status(self, queue: str = "q", endpoint: str | None = None, proc: Proc | None = None,
                    timeout: float = 15.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if proc is not None and proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited early:\n{proc.stderr}")
            try:
                return fetch_status(resolve(queue, endpoint=endpoint), timeout=0.5)
            except SQMError:
                return None

        return wait_for(ready, timeout, f"sqm serving {queue}")

    def wait_workers(self, queue: str, n: int, endpoint: str | None = None,
                     proc: Proc | None = None, timeout: float = 20.0) -> dict[str, Any]:
        return self._wait_status(queue, endpoint, proc, timeout,
                                 lambda st: st["workers_current"] == n,
                                 f"{n} worker(s) on {queue}")

    def wait_registered(self, queue: str, ever: int, endpoint: str | None = None,
                        proc: Proc | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """Until ``ever`` distinct workers have registered with ``queue`` since it started."""
        return self._wait_status(queue, endpoint, proc, timeout,
                                 lambda st: st["workers_ever"] >= ever,
                                 f"{ever} worker(s) ever registered on {queue}")

    def _wait_status(self, queue: str, endpoint: str | None, proc: Proc | None,
                     timeout: float, ok: Callable[[dict[str, Any]], bool],
                     what: str) -> dict[str, Any]:
        """Until ``queue``'s status passes ``ok`` (failing at once if ``proc`` exits)."""
        def enough() -> dict[str, Any] | None:
            if proc is not None and proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited early:\n{proc.stderr}")
            st = self.status(queue, endpoint=endpoint)
            return st if ok(st) else None

        return wait_for(enough, timeout, what)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def rundir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private run directory (ipc paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sqmt-", dir="/tmp"))
    for var in ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SQM_RUNDIR", str(path))
    monkeypatch.setenv("SQM_TEST_LOG", str(path / "handled.jsonl"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def cluster(rundir: Path) -> Iterator[Cluster]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    c = Cluster(rundir, env)
    try:
        yield c
    finally:
        c.close()
