"""TaskPool and Task: the Python API of a task pool (see README "Task pools").

A pool is only its directory (:mod:`.store`); each task is a supervisor
process (:mod:`.supervisor`) found by its pid. Nothing here keeps state a
second process could not see: any process may open the same directory and
search, kill, stop or wait for tasks it did not spawn.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..config import default_rundir
from ..errors import LockHeld, SQMError, Timeout
from .signals import signal_number
from .store import LIVE_STATES, PoolDir, connect, pid_alive, read_line, request

BEHAVIORS = ("foreground", "background", "daemon")
RESTART_POLICIES = ("never", "on-failure", "always")
READY_TIMEOUT_S = 15.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Query = Mapping[str, Any] | Callable[[dict[str, Any]], Any] | None


def default_pool_path() -> str:
    """``<rundir>/pool``: where ``sqm pool`` and ``sqm worker`` look unless told otherwise."""
    return os.path.join(default_rundir(), "pool")


def matches(pattern: Mapping[str, Any], info: Mapping[str, Any]) -> bool:
    """Every key of ``pattern`` is in ``info`` with an equal value; dicts match recursively."""
    for key, want in pattern.items():
        if key not in info:
            return False
        have = info[key]
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            if not matches(want, have):
                return False
        elif have != want:
            return False
    return True


def selects(query: Query, info: dict[str, Any]) -> bool:
    """Whether ``info`` is selected by a pattern dict, a function (raising = no) or None (all)."""
    if query is None:
        return True
    if callable(query):
        try:
            return bool(query(info))
        except Exception:
            return False
    return matches(query, info)


class Task:
    """A handle on one task: its supervisor's pid in a pool."""

    def __init__(self, pool: TaskPool, pid: int,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pool = pool
        self.pid = pid
        self._popen = popen  # foreground: the supervisor is our child, we reap it

    def __repr__(self) -> str:
        return f"<Task pid={self.pid} pool={self.pool.path!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and (other.pid, other.pool.path) == (self.pid, self.pool.path)

    def __hash__(self) -> int:
        return hash((self.pid, self.pool.path))

    @property
    def socket_path(self) -> str:
        return self.pool.store.socket_path(self.pid)

    def _ask(self, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any] | None:
        """The supervisor's answer, or None when no supervisor answers."""
        try:
            return request(self.socket_path, message, timeout)
        except (OSError, ValueError):
            return None

    @property
    def info(self) -> dict[str, Any]:
        """Live info from the supervisor, else its last saved state.

        A task whose entry is gone (cleaned, or its supervisor was killed) reads
        as ``state: "exited"`` with ``lost: True``.
        """
        answer = self._ask({"op": "info"})
        if answer and answer.get("ok"):
            info: dict[str, Any] = answer["info"]
            return info
        saved = self.pool.store.entry(self.pid)
        if saved is not None:
            return saved
        return {"pid": self.pid, "child_pid": None, "state": "exited", "exit_code": None,
                "rss_bytes": None, "lost": True}

    @property
    def running(self) -> bool:
        """The supervisor is alive (its child may be between restarts)."""
        return self.info.get("state") in LIVE_STATES

    def kill(self, sig: str | int = "TERM") -> bool:
        """Send ``sig`` (``"INT"``, ``"SIGINT"`` or a number) to the child's process group.

        False when no child is running (the task exited or is between restarts).
        """
        answer = self._ask({"op": "kill", "signal": signal_number(sig)})
        return bool(answer and answer.get("ok"))

    def terminate_supervisor(self, timeout: float = 10.0, wait: bool = True) -> int | None:
        """End the child (TERM, then KILL after the stop timeout) and the supervisor; no restart.

        Returns the child's last exit code once the supervisor is gone (None
        at once with ``wait=False``, to stop many tasks in parallel).
        """
        self._ask({"op": "stop"})
        return self.wait(timeout) if wait else None

    stop = terminate_supervisor

    def output(self) -> str:
        """The child's recent stdout and stderr together (the last ``max_output`` bytes)."""
        return self.output_bytes().decode("utf-8", errors="replace")

    def output_bytes(self) -> bytes:
        answer = self._ask({"op": "output"})
        if answer and answer.get("ok"):
            return base64.b64decode(answer["output"])
        info = self.pool.store.read_state(self.pid) or {}
        limit = int(info.get("max_output", 65536))
        return tail_file(self.pool.store.output_path(self.pid), limit)

    def follow(self, timeout: float | None = None) -> Iterator[bytes]:
        """The recent output, then new output as it comes, until the task exits."""
        try:
            sock = connect(self.socket_path, timeout)
        except OSError:
            yield self.output_bytes()
            return
        with sock:
            sock.sendall(b'{"op": "follow"}\n')
            buf = bytearray()
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            rest = bytes(buf[buf.index(b"\n") + 1:])
            if rest:
                yield rest
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                yield chunk

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the supervisor to exit; the child's last exit code.

        None when the task's entry is lost (its supervisor was killed). Raises
        :class:`sqm.errors.Timeout` when it does not exit within ``timeout`` s.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        code: int | None = None
        while True:
            try:
                with connect(self.socket_path, left()) as sock:
                    sock.sendall(b'{"op": "wait"}\n')
                    sock.settimeout(left())
                    code = read_line(sock).get("exit_code")
                break
            except TimeoutError:
                raise Timeout(f"task {self.pid} did not exit within {timeout} s") from None
            except (OSError, ValueError):
                entry = self.pool.store.entry(self.pid)
                if entry is None or entry.get("state") not in LIVE_STATES:
                    code = None if entry is None else entry.get("exit_code")
                    break
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"task {self.pid} did not exit within {timeout} s")
            time.sleep(0.01)  # its socket is being set up or torn down: a brief window
        self._wait_gone(deadline)
        return code

    def _wait_gone(self, deadline: float | None) -> None:
        """The supervisor answered its last waiter; wait until its process is gone too."""
        if self._popen is not None:
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                self._popen.wait(left)
            except subprocess.TimeoutExpired:
                raise Timeout(f"task {self.pid} did not exit in time") from None
            return
        if not wait_exit(self.pid, None if deadline is None else deadline + 1.0):
            raise Timeout(f"task {self.pid} did not exit in time")

    def remove(self) -> None:
        """Delete a finished task's files (state, output); refused while it runs."""
        if self.running:
            raise SQMError(f"task {self.pid} is running; stop it first")
        self.pool.store.remove(self.pid)


def wait_exit(pid: int, deadline: float | None) -> bool:
    """Wait for a process that is not our child to end (a pidfd where Linux has one)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    try:
        while pid_alive(pid):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if fd >= 0:
                select.select([fd], [], [], left)  # readable once it has exited
            else:
                time.sleep(0.005 if left is None else min(0.005, left))
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def tail_file(path: str, limit: int) -> bytes:
    """The last ``limit`` bytes of ``path`` (and its rotated ``path.1``... before it)."""
    parts: list[bytes] = []
    need = limit
    index = 0
    while need > 0:
        name = path if index == 0 else f"{path}.{index}"
        try:
            with open(name, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - need))
                data = fh.read()
        except FileNotFoundError:
            break
        parts.insert(0, data)
        need -= len(data)
        index += 1
    return b"".join(parts)


class TaskPool:
    """A directory of supervised background tasks (RapidApp::BgTask::TaskPool)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, create: bool = False,
                 mode: int = 0o755) -> None:
        if path is None:
            path, create = default_pool_path(), True
        self.store = PoolDir(os.fspath(path), create=create, mode=mode)
        self.path = self.store.path

    def __repr__(self) -> str:
        return f"<TaskPool {self.path!r}>"

    def spawn(self, cmd: str | None = None, *, exec: Sequence[str] | None = None,  # noqa: A002
              meta: Mapping[str, Any] | None = None, lockfile: str | None = None,
              env: Mapping[str, str] | None = None, behavior: str = "background",
              restart: str = "never", max_output: int = 65536, cwd: str | None = None,
              inherit_env: bool = True, backoff: float = 1.0, max_backoff: float = 60.0,
              start_secs: float = 1.0, start_retries: int = 3,
              output_file_bytes: int = 10 * 1024 * 1024, output_backups: int = 3,
              stop_timeout: float = 10.0, ok_codes: Sequence[int] = (0,),
              echo: bool = False) -> Task:
        """Start a supervised task; its child is ``cmd`` (through /bin/sh) or ``exec`` (argv).

        ``restart`` ``on-failure``/``always`` restarts the child after
        ``backoff * 2**(n-1)`` s (capped at ``max_backoff``) for the n-th
        consecutive start-up crash (an exit within ``start_secs``), and gives
        up after ``start_retries`` of them. Output beyond ``output_file_bytes``
        rotates to ``output_backups`` numbered files. Exit codes in ``ok_codes``
        are not failures (supervisord's ``exitcodes``). ``echo`` also copies
        the child's output to this process's stderr (``foreground`` tasks of
        a parent that relays its children's logs). Raises :class:`LockHeld`
        (starting nothing) when ``lockfile`` is held by another task.
        """
        if (cmd is None) == (exec is None):
            raise ValueError("give exactly one of cmd= (a shell command) or exec= (an argv list)")
        if exec is not None and (isinstance(exec, str) or not exec):
            raise ValueError("exec= is a non-empty list of program and arguments")
        if behavior not in BEHAVIORS:
            raise ValueError(f"behavior must be one of {', '.join(BEHAVIORS)}")
        if restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be one of {', '.join(RESTART_POLICIES)}")
        if max_output < 0:
            raise ValueError("max_output must be >= 0")
        child_env = dict(os.environ) if inherit_env else {}
        child_env.update({str(k): str(v) for k, v in (env or {}).items()})
        config: dict[str, Any] = {
            "pool": self.path, "cmd": cmd, "exec": list(exec) if exec is not None else None,
            "meta": dict(meta or {}), "lockfile": os.path.abspath(lockfile) if lockfile else None,
            "env": child_env, "cwd": os.path.abspath(cwd) if cwd else os.getcwd(),
            "behavior": behavior, "restart": restart, "max_output": max_output,
            "backoff": backoff, "max_backoff": max_backoff, "start_secs": start_secs,
            "start_retries": start_retries, "output_file_bytes": output_file_bytes,
            "output_backups": output_backups, "stop_timeout": stop_timeout,
            "ok_codes": [int(c) for c in ok_codes], "echo": echo, "parent": os.getpid(),
        }
        json.dumps(config)  # meta must be JSON: fail here, not in the supervisor
        lock_fd = take_lock(config["lockfile"]) if config["lockfile"] else None
        try:
            config["lock_fd"] = lock_fd
            return self._launch(config, lock_fd)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # the supervisor holds its own reference to the lock now

    def _launch(self, config: dict[str, Any], lock_fd: int | None) -> Task:
        sup_env = dict(os.environ)
        sup_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sqm.taskpool.supervisor"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=sup_env, cwd=self.path, pass_fds=(lock_fd,) if lock_fd is not None else (),
            stderr=None if config["echo"] else subprocess.DEVNULL,
        )
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        line = b""
        deadline = time.monotonic() + READY_TIMEOUT_S
        fd = proc.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                proc.kill()
                proc.wait()
                raise SQMError("task supervisor did not start in time")
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            line += chunk
        proc.stdout.close()
        try:
            ready = json.loads(line)
        except ValueError:
            ready = {"error": f"exited with {proc.wait()} before it was ready"}
        if "pid" not in ready:
            proc.wait()
            raise SQMError(f"task supervisor failed to start: {ready.get('error')}")
        if config["behavior"] == "foreground":
            return Task(self, int(ready["pid"]), popen=proc)
        proc.wait()  # the launcher exits right after its fork
        return Task(self, int(ready["pid"]))

    def tasks(self) -> list[Task]:
        """Every entry (running, restarting or exited), stale ones cleaned."""
        return self.search(None)

    def search(self, query: Query = None) -> list[Task]:
        """Tasks whose info matches a pattern dict (recursively) or a function of info."""
        found = []
        for pid, info in self.infos():
            if selects(query, info):
                found.append(Task(self, pid))
        return found

    def infos(self) -> list[tuple[int, dict[str, Any]]]:
        """(pid, info) of every entry: live supervisors are asked, stale entries removed."""
        result = []
        for pid in self.store.pids():
            entry = self.store.entry(pid)
            if entry is None:
                continue
            if entry.get("state") in LIVE_STATES:
                info = Task(self, pid).info
                if info.get("lost"):
                    continue
                entry = info
            result.append((pid, entry))
        return result

    def task_by_pid(self, pid: int) -> Task | None:
        """The task whose supervisor has ``pid``, or None (no entry, or a stale one)."""
        if self.store.entry(int(pid)) is None:
            return None
        return Task(self, int(pid))

    def clean(self) -> int:
        """Remove the entries of exited tasks (stale ones too); how many went."""
        removed = 0
        for pid in self.store.pids():
            entry = self.store.entry(pid)
            if entry is None:
                removed += 1
            elif entry.get("state") not in LIVE_STATES:
                self.store.remove(pid)
                removed += 1
        return removed


def take_lock(path: str) -> int:
    """Open and flock ``path``; LockHeld (naming the holder's pid if known) if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" by task {holder}" if holder else ""
        raise LockHeld(f"lockfile {path} is held{who}; nothing started") from None
    except BaseException:
        os.close(fd)
        raise
    return fd
