"""``sqm worker --processes N``: a parent that keeps N worker processes running.

The parent forwards SIGTERM/SIGINT to its children, restarts a child that
dies unexpectedly (not one that exited 0 on request: ``sqm stop-worker``,
i.e. sqm's STOP, or its own ``terminate()``), and waits for every child
before it exits: with status 0 once all of them stopped that way. Children ask the kernel to SIGTERM them if the parent
dies (PR_SET_PDEATHSIG), so even a SIGKILLed parent leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("sqm.pool")

PARENT_ENV = "SQM_POOL_PARENT"
CRASH_WINDOW_S = 2.0
MAX_QUICK_CRASHES = 5


def sqm_command(*args: str) -> list[str]:
    """The argv that runs this very sqm's CLI with ``args`` in a child process.

    Not ``python -m sqm``: that puts the current directory first on
    sys.path, so a user's own ``sqm.py``, ``worker.py`` or ``sender.py``
    there would be imported instead of ours. The child puts the directory
    holding this sqm first instead (``sqm worker`` still imports the user's
    MODULE from the current directory).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    boot = (f"import sys; sys.path[0] = {root!r}; sys.argv[0] = 'sqm'; "
            "from sqm.cli import main; main()")
    return [sys.executable, "-c", boot, *args]


def die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies; exit now if it already did."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != int(parent):
        sys.exit(0)


class Pool:
    def __init__(self, argv: list[str], processes: int) -> None:
        self.argv = argv
        self.processes = processes
        self.children: dict[int, tuple[subprocess.Popen, float]] = {}
        self.stopping = False
        self.quick_crashes = 0

    def _spawn(self) -> None:
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        proc = subprocess.Popen(self.argv, env=env)
        self.children[proc.pid] = (proc, time.monotonic())

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for proc, _ in list(self.children.values()):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        """Run until signalled; return the exit code for the parent."""
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._forward)
        for _ in range(self.processes):
            self._spawn()
        log.info("worker pool of %d process(es) started", self.processes)
        code = 0
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            entry = self.children.pop(pid, None)
            if entry is None:
                continue
            proc, started = entry
            proc.returncode = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            if proc.returncode == 0:
                log.info("worker process %d exited on request", pid)
                continue
            quick = time.monotonic() - started < CRASH_WINDOW_S
            self.quick_crashes = self.quick_crashes + 1 if quick else 0
            if self.quick_crashes >= MAX_QUICK_CRASHES:
                log.error("worker processes keep dying at start-up; giving up")
                code = 1
                self._forward(signal.SIGTERM, None)
                continue
            log.warning("worker process %d died (exit %s); starting another", pid, proc.returncode)
            self._spawn()
        return code
