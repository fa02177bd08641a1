"""The pool directory: one state file, one socket and one output file per task.

The directory is the whole pool (no daemon, no database), so several
processes can use it at once. A supervisor with pid P owns ``P.json`` (its
state, replaced atomically by write + rename), ``P.sock`` (its query socket)
and ``P.out`` (its child's output, rotated to ``P.out.1``...). Readers judge
an entry by the supervisor it names: a dead pid, a pid now used by another
process (its start time differs) or a missing socket makes a running entry
stale, and stale entries are removed, never reported as running.
Files take the directory's permission bits (minus execute), so a group-writable,
set-gid directory is a pool shared by a group.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import Iterator
from typing import Any

STATE_SUFFIX = ".json"
SOCKET_SUFFIX = ".sock"
OUTPUT_SUFFIX = ".out"
LIVE_STATES = ("running", "restarting")
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; leave room for the NUL


def process_start(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell reused pids apart.

    None when the process does not exist, is a zombie, or /proc is not there.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    if not fields or fields[0] == b"Z":
        return None
    return int(fields[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if ``start`` is known, is still that process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not os.path.isdir("/proc"):
        return True
    now = process_start(pid)
    if now is None:
        return False
    return start is None or now == start


def rss_of(pid: int | None) -> int | None:
    """Resident memory of ``pid`` in bytes (Linux), else None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def short_path(path: str) -> Iterator[str]:
    """A path to ``path`` short enough for a unix socket address.

    Long pool paths (pytest tmp dirs, deep homes) overflow sockaddr_un; on
    Linux the directory is then reached through ``/proc/self/fd/N``.
    """
    if len(path.encode()) < _SUN_PATH_MAX or not os.path.isdir("/proc/self/fd"):
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_RDONLY | getattr(os, "O_PATH", 0))
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def request(path: str, message: dict[str, Any], timeout: float | None = 2.0) -> dict[str, Any]:
    """Send one JSON line to the supervisor socket at ``path`` and read one JSON line back.

    Raises OSError (ConnectionRefusedError, FileNotFoundError, timeout) when no
    supervisor answers.
    """
    with connect(path, timeout) as sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        return read_line(sock)


def connect(path: str, timeout: float | None) -> socket.socket:
    """A connected stream socket to the supervisor at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_path(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def read_line(sock: socket.socket) -> dict[str, Any]:
    """Read one JSON line; ConnectionError if the peer closes first."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("supervisor closed the connection")
        buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


class PoolDir:
    """File naming, atomic state writes and stale-entry detection for one pool directory."""

    def __init__(self, path: str, create: bool = False, mode: int = 0o755) -> None:
        self.path = os.path.abspath(path)
        if create:
            os.makedirs(self.path, mode=mode, exist_ok=True)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"task pool directory {self.path} does not exist")

    def state_path(self, pid: int) -> str:
        return os.path.join(self.path, f"{pid}{STATE_SUFFIX}")

    def socket_path(self, pid: int) -> str:
        return os.path.join(self.path, f"{pid}{SOCKET_SUFFIX}")

    def output_path(self, pid: int) -> str:
        return os.path.join(self.path, f"{pid}{OUTPUT_SUFFIX}")

    def file_mode(self) -> int:
        """The directory's read/write bits, so files share its group access."""
        return stat.S_IMODE(os.stat(self.path).st_mode) & 0o666

    def write_state(self, pid: int, state: dict[str, Any]) -> None:
        """Replace ``P.json`` atomically: readers see the old or the new state, never half."""
        final = self.state_path(pid)
        tmp = os.path.join(self.path, f".{pid}{STATE_SUFFIX}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.file_mode())
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, final)

    def read_state(self, pid: int) -> dict[str, Any] | None:
        try:
            with open(self.state_path(pid)) as fh:
                state: dict[str, Any] = json.load(fh)
        except (OSError, ValueError):
            return None
        return state

    def pids(self) -> list[int]:
        """Supervisor pids that have a state file, oldest first."""
        found = []
        for name in os.listdir(self.path):
            stem, suffix = os.path.splitext(name)
            if suffix == STATE_SUFFIX and stem.isdigit():
                found.append(int(stem))
        return sorted(found)

    def is_stale(self, state: dict[str, Any]) -> bool:
        """A live-looking entry whose supervisor is gone or is another process now."""
        if state.get("state") not in LIVE_STATES:
            return False
        pid = int(state["pid"])
        if not pid_alive(pid, state.get("pid_start")):
            return True
        return not os.path.exists(self.socket_path(pid))

    def entry(self, pid: int) -> dict[str, Any] | None:
        """The state of ``pid``'s entry, or None (no entry, or a stale one, which is removed)."""
        state = self.read_state(pid)
        if state is None:
            return None
        if self.is_stale(state):
            # the supervisor may have written its final state meanwhile: look again
            again = self.read_state(pid)
            if again is None:
                return None
            if self.is_stale(again):
                self.remove(pid)
                return None
            state = again
        return state

    def remove(self, pid: int) -> None:
        """Delete every file of ``pid``'s entry (others may be deleting too)."""
        names = [self.state_path(pid), self.socket_path(pid)]
        out = self.output_path(pid)
        names.append(out)
        prefix = os.path.basename(out) + "."
        names += [os.path.join(self.path, n) for n in os.listdir(self.path) if n.startswith(prefix)]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
