"""The per-task supervisor process: owns one child, its output and its lock.

Started by :meth:`TaskPool.spawn` as ``python -m sqm.taskpool.supervisor``
with its settings as one JSON document on stdin; it answers with one JSON
line on stdout (``{"pid": P}`` or ``{"error": ...}``) once its socket, state
file and first child exist, then detaches stdin/stdout. ``background`` and
``daemon`` double-fork here (``daemon`` also calls setsid) so the spawner
only ever waits for a short-lived launcher.

One single-threaded selector loop serves the child's output pipe, the query
socket and signals (through a wakeup fd); restarts are timers in that loop.
Queries are one JSON line each (see :func:`Supervisor.handle`).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

from .signals import signal_number
from .store import PoolDir, process_start, rss_of, short_path

FOLLOW_BACKLOG_MAX = 8 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent thread ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


class Conn:
    """One client connection: its buffers and what it waits for."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.mode = "request"  # request | wait | follow
        self.close_when_flushed = False


class Supervisor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.pid = os.getpid()
        self.store = PoolDir(config["pool"])
        self.store.remove(self.pid)  # an older entry of a reused pid
        self.restart_policy: str = config["restart"]
        self.max_output: int = config["max_output"]
        self.lock_fd: int | None = config.get("lock_fd")
        self.started_at = time.time()
        self.child: subprocess.Popen[bytes] | None = None
        self.child_started = 0.0
        self.child_started_at: float | None = None
        self.exit_code: int | None = None
        self.restarts = 0
        self.quick_crashes = 0
        self.gave_up = False
        self.state = "running"
        self.restart_at: float | None = None
        self.stopping = False
        self.stop_deadline: float | None = None
        self.done = False
        self.ring = bytearray()
        self.conns: dict[int, Conn] = {}
        self.signals: list[int] = []
        self.sel = selectors.DefaultSelector()
        self.mode = self.store.file_mode()
        self.output_path = self.store.output_path(self.pid)
        self.out_fd = os.open(self.output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, self.mode)
        self.out_size = 0
        self.echo_fd: int | None = None  # set by launch(): the spawner's stderr, when echo
        if self.lock_fd is not None:
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{self.pid}\n".encode(), 0)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path = self.store.socket_path(self.pid)
        with short_path(sock_path) as address:
            self.listener.bind(address)
        os.chmod(sock_path, self.mode)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    # -- state -------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def info(self, live: bool = True) -> dict[str, Any]:
        cfg = self.config
        child_pid = self.child.pid if self.child is not None else None
        return {
            "pid": self.pid,
            "pid_start": process_start(self.pid),
            "child_pid": child_pid,
            "cmd": cfg["exec"] if cfg.get("exec") is not None else cfg["cmd"],
            "shell": cfg.get("exec") is None,
            "meta": cfg["meta"],
            "state": self.state,
            "exit_code": self.exit_code,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "child_started_at": self.child_started_at,
            "output_path": self.output_path,
            "lockfile": cfg.get("lockfile"),
            "rss_bytes": rss_of(child_pid) if live else None,
            "behavior": cfg["behavior"],
            "restart": self.restart_policy,
            "max_output": self.max_output,
            "gave_up": self.gave_up,
            "cwd": cfg.get("cwd"),
        }

    def save(self) -> None:
        self.store.write_state(self.pid, self.info(live=False))

    # -- child -------------------------------------------------------------------------

    def start_child(self) -> None:
        cfg = self.config
        self.restart_at = None
        self.child_started = time.monotonic()
        self.child_started_at = time.time()

        def in_child() -> None:
            os.setpgid(0, 0)  # its own group: kill reaches the shell's children too
            die_with_parent(signal.SIGTERM)

        argv: str | list[str] = cfg["exec"] if cfg.get("exec") is not None else cfg["cmd"]
        try:
            self.child = subprocess.Popen(
                argv, shell=cfg.get("exec") is None, env=cfg["env"], cwd=cfg.get("cwd"),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=in_child,
            )
        except OSError as exc:
            self.note(f"cannot start: {exc}")
            self.child = None
            self.state = "running"
            self.child_exited(127)
            return
        assert self.child.stdout is not None
        os.set_blocking(self.child.stdout.fileno(), False)
        self.sel.register(self.child.stdout, selectors.EVENT_READ, "output")
        self.state = "running"
        self.save()

    def child_exited(self, code: int) -> None:
        """Decide between restarting (with backoff), giving up and finishing."""
        self.exit_code = code
        self.child = None
        if self.stopping:
            self.finish()
            return
        policy = self.restart_policy
        failed = code not in self.config.get("ok_codes", (0,))
        due = policy == "always" or (policy == "on-failure" and failed)
        if not due:
            self.finish()
            return
        ran = time.monotonic() - self.child_started
        self.quick_crashes = self.quick_crashes + 1 if ran < self.config["start_secs"] else 0
        if self.quick_crashes > self.config["start_retries"]:
            self.gave_up = True
            self.note(f"gave up after {self.quick_crashes} start-up crashes (exit code {code})")
            self.finish()
            return
        delay = 0.0
        if self.quick_crashes:
            delay = min(self.config["backoff"] * 2 ** (self.quick_crashes - 1),
                        self.config["max_backoff"])
        self.state = "restarting"
        self.restart_at = time.monotonic() + delay
        self.save()

    def reap(self) -> None:
        child = self.child
        if child is None or child.poll() is None:
            return
        if child.stdout is not None:
            self.read_output(child.stdout.fileno(), drain=True)
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(child.stdout)
            child.stdout.close()
        if self.stopping:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)  # stragglers of a stopped task
        self.child_exited(child.returncode)

    def kill_child(self, signum: int) -> bool:
        if self.child is None:
            return False
        try:
            os.killpg(self.child.pid, signum)
        except ProcessLookupError:
            try:
                self.child.send_signal(signum)
            except ProcessLookupError:
                return False
        return True

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.restart_at = None
        if self.child is None:
            self.finish()
            return
        self.kill_child(signal.SIGTERM)
        self.kill_child(signal.SIGCONT)
        self.stop_deadline = time.monotonic() + self.config["stop_timeout"]

    # -- output ------------------------------------------------------------------------

    def read_output(self, fd: int, drain: bool = False) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not chunk:
                return
            self.keep(chunk)
            if self.echo_fd is not None:
                try:
                    os.write(self.echo_fd, chunk)
                except OSError:
                    self.echo_fd = None  # nobody reads the spawner's stderr any more
            if not drain:
                return

    def note(self, text: str) -> None:
        """A line of the supervisor's own into the output (start failures, giving up)."""
        self.keep(f"[sqm.taskpool] {text}\n".encode())

    def keep(self, chunk: bytes) -> None:
        self.ring += chunk
        if len(self.ring) > self.max_output:
            del self.ring[: len(self.ring) - self.max_output]
        limit = max(1, self.config["output_file_bytes"])
        view = memoryview(chunk)
        while view:
            if self.out_size >= limit:
                self.rotate()
            part = view[: limit - self.out_size]
            os.write(self.out_fd, part)
            self.out_size += len(part)
            view = view[len(part):]
        for conn in list(self.conns.values()):
            if conn.mode == "follow":
                if len(conn.outbuf) > FOLLOW_BACKLOG_MAX:
                    self.close(conn)  # a reader that does not keep up is let go
                else:
                    self.send(conn, chunk)

    def rotate(self) -> None:
        os.close(self.out_fd)
        backups = self.config["output_backups"]
        path = self.output_path
        if backups > 0:
            for i in range(backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if backups <= 0 else 0)
        self.out_fd = os.open(path, flags, self.mode)
        self.out_size = 0

    # -- queries -----------------------------------------------------------------------

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = Conn(sock)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        if conn.mode != "request":
            return
        conn.inbuf += data
        if b"\n" in conn.inbuf:
            line = bytes(conn.inbuf[: conn.inbuf.index(b"\n")])
            conn.inbuf.clear()
            try:
                request = json.loads(line)
                self.handle(conn, request)
            except Exception as exc:  # a bad request gets an answer, never kills the task
                self.reply(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def handle(self, conn: Conn, request: dict[str, Any]) -> None:
        """ops: info, output, kill {signal}, stop, wait (answered at exit), follow (a stream)."""
        op = request.get("op")
        if op == "info":
            self.reply(conn, {"ok": True, "info": self.info()})
        elif op == "output":
            self.reply(conn, {"ok": True, "output": base64.b64encode(self.ring).decode()})
        elif op == "kill":
            sent = self.kill_child(signal_number(request.get("signal", "TERM")))
            self.reply(conn, {"ok": sent, "error": None if sent else "no child running"})
        elif op == "stop":
            self.reply(conn, {"ok": True})
            self.stop()
        elif op == "wait":
            conn.mode = "wait"
        elif op == "follow":
            conn.mode = "follow"
            self.send(conn, json.dumps({"ok": True}).encode() + b"\n" + bytes(self.ring))
        else:
            self.reply(conn, {"ok": False, "error": f"unknown op {op!r}"})

    def reply(self, conn: Conn, message: dict[str, Any]) -> None:
        conn.close_when_flushed = True
        self.send(conn, json.dumps(message).encode() + b"\n")

    def send(self, conn: Conn, data: bytes) -> None:
        conn.outbuf += data
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        try:
            while conn.outbuf:
                n = conn.sock.send(conn.outbuf)
                del conn.outbuf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close(conn)
            return
        if conn.outbuf:
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        elif conn.close_when_flushed:
            self.close(conn)
        else:
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def close(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if fd in self.conns:
            del self.conns[fd]
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn.sock)
        conn.sock.close()

    # -- loop --------------------------------------------------------------------------

    def run(self) -> None:
        while not self.done:
            timeout: float | None = None
            now = time.monotonic()
            for at in (self.restart_at, self.stop_deadline if self.child else None):
                if at is not None:
                    timeout = max(0.0, at - now) if timeout is None else min(timeout, at - now)
            for key, mask in self.sel.select(timeout):
                what = key.data
                if what == "accept":
                    self.accept()
                elif what == "wake":
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        self.wake_r.recv(4096)
                elif what == "output":
                    self.read_output(key.fd)
                elif isinstance(what, Conn) and what.sock.fileno() in self.conns:
                    if mask & selectors.EVENT_WRITE:
                        self.flush(what)
                    if mask & selectors.EVENT_READ and what.sock.fileno() in self.conns:
                        self.readable(what)
            while self.signals:
                if self.signals.pop(0) != signal.SIGCHLD:
                    self.stop()
            self.reap()
            if self.done:
                break
            now = time.monotonic()
            if self.restart_at is not None and now >= self.restart_at:
                self.restarts += 1
                self.start_child()
            if self.stop_deadline is not None and self.child is not None and now >= self.stop_deadline:
                self.kill_child(signal.SIGKILL)
                self.stop_deadline = None

    def finish(self) -> None:
        """Final state, then the lock and socket go, then waiters hear the exit code."""
        if self.done:
            return
        self.done = True
        self.state = "exited"
        self.restart_at = None
        self.save()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.store.socket_path(self.pid))
        self.listener.close()
        final = json.dumps({"ok": True, "exit_code": self.exit_code}).encode() + b"\n"
        for conn in list(self.conns.values()):
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                if conn.mode == "wait":
                    conn.outbuf += final
                if conn.outbuf:
                    conn.sock.sendall(conn.outbuf)
            except OSError:
                pass
            conn.sock.close()
        self.conns.clear()
        os.close(self.out_fd)


def launch(config: dict[str, Any]) -> None:
    """Become the supervisor per ``behavior``, then run it; report readiness on fd 1."""
    behavior = config["behavior"]
    if behavior in ("background", "daemon"):
        if behavior == "daemon":
            os.setsid()
        if os.fork():
            os._exit(0)  # the launcher ends; the spawner reaps it, init adopts us
        if behavior == "background":
            os.setpgid(0, 0)  # out of the caller's job: a Ctrl-C meant for it misses us
    else:
        die_with_parent(signal.SIGTERM)
        if os.getppid() != config["parent"]:
            os._exit(1)
    ready = os.fdopen(os.dup(1), "w")
    try:
        supervisor = Supervisor(config)
        if config.get("echo"):
            supervisor.echo_fd = os.dup(2)
        supervisor.start_child()
    except Exception as exc:
        ready.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        ready.close()
        os._exit(1)
    ready.write(json.dumps({"pid": supervisor.pid}) + "\n")
    ready.close()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        supervisor.run()
    except Exception:
        with contextlib.suppress(Exception):
            supervisor.note("supervisor crashed:\n" + traceback.format_exc())
            if supervisor.child is not None:
                supervisor.kill_child(signal.SIGKILL)
            supervisor.exit_code = supervisor.exit_code if supervisor.exit_code is not None else -1
            supervisor.finish()
        os._exit(70)
    os._exit(0)


def main() -> None:
    config = json.loads(sys.stdin.buffer.read())
    launch(config)


if __name__ == "__main__":
    main()
