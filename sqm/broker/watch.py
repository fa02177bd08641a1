"""Which worker each connection of a ROUTER carries, and when that connection closes.

libzmq reports a closed connection on the socket's monitor as
``EVENT_DISCONNECTED`` with the connection's file descriptor, and every
message it receives carries that descriptor too (``ZMQ_SRCFD``). A worker's
HELLO binds its routing id to the descriptor it came on; a later
disconnect of that descriptor is that worker's connection closing.

Descriptors are reused, so a binding must never outlive its connection.
libzmq emits ``DISCONNECTED`` before it closes the descriptor, so before a
new connection can get the same number, and emits ``ACCEPTED`` before any
message of a connection can be read. Hence :meth:`Connections.bind` is
always called right after :meth:`Connections.closed` has drained the
monitor: every disconnect that happened before the HELLO was read is then
known, and a descriptor not open any more means the HELLO's connection has
already closed. (One case stays open: the connection closed *and* its number
was taken by a new one before the HELLO was read. That worker is then bound
to another connection; a dispatch to it fails at once, since its routing id
has no connection, and its silence drops it later.)
"""

from __future__ import annotations

import itertools
import sys

import zmq

SRCFD = int(zmq.MessageOption.SRCFD)
ACCEPTED = int(zmq.EVENT_ACCEPTED)
DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
NOBLOCK = int(zmq.NOBLOCK)

_ids = itertools.count(1)


def handed_over(rid: bytes) -> bool:
    """Whether ``rid`` is one libzmq made up: 5 bytes, the first 0.

    A ROUTER with ``ROUTER_HANDOVER`` gives a connection's routing id to a
    newer connection presenting the same one (a worker that reconnected)
    and renames the old connection so; what was still queued on the old
    one is then read under the made-up id. sqm's peers always set their own
    (a worker's starts with ``W``), so a HELLO under such an id is a
    leftover of a connection the worker has already replaced.
    """
    return len(rid) == 5 and rid[0] == 0


def source_fd(frame: zmq.Frame) -> int:
    """The descriptor of the connection ``frame`` came on; -1 when there is none (inproc)."""
    try:
        return int(frame.get(SRCFD))
    except zmq.ZMQError:
        return -1


class Connections:
    """The connections of one ROUTER, from its monitor: which are open, and whose."""

    def __init__(self, sock: zmq.Socket) -> None:
        addr = f"inproc://sqm-connections-{next(_ids)}-{id(self):x}"
        sock.monitor(addr, ACCEPTED | DISCONNECTED)
        self._sock = sock
        monitor = sock.context.socket(zmq.PAIR)
        # Unbounded: libzmq's I/O thread blocks on a full monitor pipe (it
        # would stall every connection after ~1,000 unread events).
        monitor.rcvhwm = 0
        monitor.sndhwm = 0
        monitor.linger = 0
        monitor.connect(addr)
        self._monitor: zmq.Socket | None = monitor
        self._open: set[int] = set()
        self._rid_at: dict[int, bytes] = {}  # descriptor -> routing id bound there
        self._fd_of: dict[bytes, int] = {}  # routing id -> its descriptor

    def closed(self) -> list[bytes]:
        """Read the monitor; the routing ids whose bound connection closed since the last call."""
        monitor = self._monitor
        gone: list[bytes] = []
        if monitor is None:
            return gone
        while True:
            try:
                head = monitor.recv(NOBLOCK)
                while monitor.rcvmore:  # the endpoint frame
                    monitor.recv(NOBLOCK)
            except zmq.Again:
                return gone
            event = int.from_bytes(head[:2], sys.byteorder)
            fd = int.from_bytes(head[2:6], sys.byteorder)
            if event == ACCEPTED:
                self._open.add(fd)
            elif event == DISCONNECTED:
                self._open.discard(fd)
                rid = self._rid_at.pop(fd, None)
                if rid is not None and self._fd_of.get(rid) == fd:
                    del self._fd_of[rid]
                    gone.append(rid)

    def is_open(self, fd: int) -> bool:
        """Whether connection ``fd`` is open (as of the last :meth:`closed`)."""
        return fd in self._open

    def bind(self, rid: bytes, fd: int) -> None:
        """Routing id ``rid`` talks on connection ``fd`` (call right after :meth:`closed`)."""
        old = self._fd_of.get(rid)
        if old is not None and self._rid_at.get(old) == rid:
            del self._rid_at[old]
        other = self._rid_at.get(fd)
        if other is not None and self._fd_of.get(other) == fd:
            del self._fd_of[other]
        self._fd_of[rid] = fd
        self._rid_at[fd] = rid

    @property
    def open_count(self) -> int:
        """How many connections are open (as of the last :meth:`closed`)."""
        return len(self._open)

    def pending(self, timeout_ms: int = 0) -> bool:
        """Whether the monitor has events not read yet (waits up to ``timeout_ms``)."""
        return self._monitor is not None and bool(self._monitor.poll(timeout_ms))

    def fd_of(self, rid: bytes) -> int | None:
        """The connection ``rid`` is bound to, if any."""
        return self._fd_of.get(rid)

    def __len__(self) -> int:
        """How many routing ids are bound to a connection."""
        return len(self._fd_of)

    def close(self) -> None:
        """Stop monitoring (before the ROUTER closes)."""
        if self._monitor is None:
            return
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._monitor = None
