"""Connections from a worker to senders' mailboxes: one socket, many connections.

A worker replying to thousands of concurrent senders must not open a socket
per sender: a socket per mailbox in a small LRU made every reply past the
LRU's size open a new connection (a ZeroMQ handshake, a linger on close), and
throughput fell off a cliff. Instead one ROUTER connects to every mailbox,
each connection named by a routing id set before its connect
(``ZMQ_CONNECT_ROUTING_ID``): libzmq makes the pipe at connect time, so the
first reply queues at once, and a reply is the routing id frame followed by
the message. Connections are dropped after ``idle_s`` without use and the
least recently used one goes when more than ``max_open`` are open.

Only addresses the deployment's :class:`~sqm.protocol.MailboxPolicy` allows
are ever connected to. A mailbox that names a CURVE key (``ADDRESS KEY``, a
secured sender's) is reached as a CURVE client of that key, so replies
travel encrypted: libzmq copies the socket's options into each connection
when it connects, so the server key set just before a connect is that
connection's alone.

A connection that has not completed its ZeroMQ handshake ``handshake_s``
after its connect (seen on the socket's monitor, read when connecting and
every half heartbeat, never per reply) is dropped and its address refused
for as long: the Sender is gone, or it refused us (an older Sender's PULL
mailbox, which a ROUTER cannot talk to, or a wrong key: logged once as a
warning). A refused handshake may also show sooner, as EHOSTUNREACH on a
send (``ROUTER_MANDATORY``). Either way queued replies stop piling up.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections import OrderedDict

import zmq

from sqm.protocol import MAILBOX_KEY_SEP, MailboxPolicy
from sqm.security.keys import KeyPair
from sqm.sockets import make_socket, raise_fd_limit
from sqm.zmqfast import recv_frames

log = logging.getLogger("sqm.worker")

#: Connections kept open at most, by default: one file descriptor each.
DEFAULT_MAX_OPEN = 4096
#: Messages queued per connection before a send reports Again (reply dropped).
MAILBOX_HWM = 10_000
#: A connection with no completed handshake this long after its connect is dropped (s).
DEFAULT_HANDSHAKE_S = 10.0
_WATCHED = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
_monitors = itertools.count()

#: One new connection (and, the first time, the socket and its monitor) at a
#: time per process. libzmq holds the GIL through each socket and connect
#: call; when work first reaches hundreds of worker threads of one process,
#: all connecting at once queued them all for the GIL, and heartbeat threads
#: waited behind them for seconds (W4: sqm dropped live workers). Waiting
#: here, a thread holds no place in the GIL's queue. Replies on an open
#: connection never take it.
_CONNECTING = threading.Lock()


class MailboxLost(ValueError):
    """The mailbox was unreachable or refused this worker lately (logged once when found)."""


class MailboxPool:
    """One ROUTER connected to many mailboxes, bounded and validated.

    :meth:`get` returns a connection's routing id as a one-frame list (the
    "head" of every message to it, made once per connection so a reply
    allocates nothing); send it with ``SNDMORE`` on :attr:`sock`, then the
    message (see :meth:`send` and ``Execution.deliver``).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        policy: MailboxPolicy,
        *,
        max_open: int = DEFAULT_MAX_OPEN,
        idle_s: float = 60.0,
        linger_ms: int = 2000,
        keys: KeyPair | None = None,
        handshake_s: float = DEFAULT_HANDSHAKE_S,
    ) -> None:
        self.ctx = ctx
        #: Our CURVE pair towards secured mailboxes (the worker's own key; an
        #: ephemeral one when it has none: the mailbox admits any key it gave out).
        self.keys = keys
        self.policy = policy
        # Each connection holds a file descriptor: stay well inside the limit.
        soft = raise_fd_limit()
        room = soft // 2 if soft > 0 else max_open
        self.max_open = max(1, min(max_open, max(64, room)))
        self.idle_s = idle_s
        self.linger_ms = linger_ms
        self.handshake_s = handshake_s
        #: The ROUTER, made at the first connect (a pool that never replies
        #: holds no socket), and its monitor (connects and handshakes).
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._key: bytes | None = None  # the CURVE server key set on sock now, if any
        #: addr -> [head, last used, endpoint], least recently used first.
        self._open: OrderedDict[bytes, list] = OrderedDict()
        self._endpoints: dict[str, bytes] = {}  # endpoint -> addr (one connection each)
        #: Endpoints connected with no handshake seen yet -> [deadline, reached].
        self._unshaken: dict[str, list] = {}
        self._refused: dict[bytes, str] = {}  # by the policy or the key: for good
        self._lost: dict[bytes, float] = {}  # unreachable or refused us: until then
        self._warned: set[bytes] = set()  # refused handshakes already logged
        self._ids = 0
        #: The "last used" stamp given to a connection on use: refreshed by
        #: :meth:`expire` and at each connect, so a reply reads no clock.
        self._now = time.monotonic()
        self.opened_total = 0
        self.closed_total = 0
        self.lost_total = 0

    def get(self, addr: bytes) -> list[bytes]:
        """The routing-id frame (as a list) of the connection to ``addr``, connecting if needed.

        Raises ValueError if the address is refused (policy, key;
        :class:`MailboxLost` when unreachable or refused lately);
        zmq.ZMQError if no socket can be made.
        """
        entry = self._open.get(addr)
        if entry is not None:
            self._open.move_to_end(addr)
            entry[1] = self._now
            head: list[bytes] = entry[0]
            return head
        return self._connect(addr)

    def send(self, addr: bytes, frames: list[bytes]) -> None:
        """Send ``frames`` to ``addr`` without blocking (off the hot path: one call does it all).

        Raises ValueError (refused; :class:`MailboxLost` when it refused our
        handshake), zmq.Again (its queue is full: nothing sent).
        """
        head = self.get(addr)
        sock = self.sock
        assert sock is not None
        try:
            sock.send(head[0], zmq.NOBLOCK | zmq.SNDMORE)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise  # Again: nothing was sent
            self.lost(addr, str(exc), refused=True)
            raise MailboxLost(f"mailbox lost: {exc}") from None
        sock.send_multipart(frames, zmq.NOBLOCK)

    def _connect(self, addr: bytes) -> list[bytes]:
        reason = self._refused.get(addr)
        if reason is None:
            try:
                reason = self.policy.check(addr.decode("ascii"))
            except UnicodeDecodeError:
                reason = "mailbox is not ASCII"
            if reason:
                self._refuse(addr, reason)
        if reason:
            raise ValueError(reason)
        now = time.monotonic()
        until = self._lost.get(addr)
        if until is not None:
            if now < until:
                raise MailboxLost("the mailbox was unreachable or refused this worker lately")
            del self._lost[addr]
        where, _, key = addr.decode("ascii").partition(MAILBOX_KEY_SEP)
        with _CONNECTING:
            sock = self.sock
            if sock is None:
                sock = self._open_socket()
            else:
                self._read_events()  # keeps the monitor's queue short
            server_key = key.encode("ascii") if key else None
            if server_key != self._key:
                self._set_key(sock, addr, server_key)
            other = self._endpoints.get(where)
            if other is not None:  # the same endpoint under another key: one connection each
                self._drop(other)
            self._ids += 1
            rid = b"m%x" % self._ids  # never reused: libzmq aborts on a routing id in use
            sock.setsockopt(zmq.CONNECT_ROUTING_ID, rid)
            sock.connect(where)
        self._now = now
        head = [rid]
        self._open[addr] = [head, now, where]
        self._endpoints[where] = addr
        if not where.startswith("inproc://"):  # inproc has no handshake to wait for
            self._unshaken[where] = [now + self.handshake_s, False]
        self.opened_total += 1
        while len(self._open) > self.max_open:
            self._drop(next(iter(self._open)))
        return head

    def _open_socket(self) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.ROUTER, linger_ms=self.linger_ms, hwm=MAILBOX_HWM)
        mon = None
        try:
            # Made by hand, not get_monitor_socket(): with no receive limit
            # on our end the inproc pipe has none, and libzmq's I/O thread,
            # which writes events with a blocking send, can never stall on it
            # between two reads.
            address = f"inproc://sqm-mailboxes-{next(_monitors)}"
            sock.monitor(address, _WATCHED)
            mon = self.ctx.socket(zmq.PAIR)
            mon.linger = 0
            mon.rcvhwm = 0
            mon.connect(address)
        except zmq.ZMQError:
            if mon is not None:
                mon.close(0)
            sock.close(0)
            raise
        self.sock, self._monitor = sock, mon
        return sock

    def _set_key(self, sock: zmq.Socket, addr: bytes, server_key: bytes | None) -> None:
        """Make the next connect a CURVE client of ``server_key`` (None: plain)."""
        if server_key is None:
            sock.curve_server = False  # back to the NULL mechanism
            self._key = None
            return
        if self.keys is None:
            self.keys = KeyPair(*zmq.curve_keypair())
        try:
            if self._key is None:
                sock.curve_secretkey = self.keys.secret
                sock.curve_publickey = self.keys.public
            sock.curve_serverkey = server_key
        except zmq.ZMQError as exc:
            sock.curve_server = False
            self._key = None
            reason = f"mailbox key refused: {exc}"
            self._refuse(addr, reason)
            raise ValueError(reason) from None
        self._key = server_key

    def _refuse(self, addr: bytes, reason: str) -> None:
        if len(self._refused) > 1000:
            self._refused.clear()
        self._refused[addr] = reason

    def _read_events(self) -> None:
        """Take in the monitor's events: connects reached, handshakes done."""
        mon = self._monitor
        if mon is None:
            return
        unshaken = self._unshaken
        while True:
            try:
                frames = recv_frames(mon)
            except zmq.Again:
                return
            where = frames[1].decode("ascii", "replace")
            state = unshaken.get(where)
            if state is None:
                continue
            if int.from_bytes(frames[0][:2], sys.byteorder) == zmq.EVENT_CONNECTED:
                state[1] = True  # reached: a missing handshake is then a refusal
            else:
                del unshaken[where]

    def lost(self, addr: bytes, why: str, *, refused: bool) -> None:
        """``addr`` cannot be reached (``refused``: it refused our handshake).

        The connection is dropped and the address refused for
        ``handshake_s`` (a new Sender may bind it later). A refusal is logged
        once per address as a warning; a Sender that is simply gone, at debug.
        """
        if addr not in self._open:
            return
        self._drop(addr)
        self.lost_total += 1
        if len(self._lost) > 1000:
            self._lost.clear()
        self._lost[addr] = time.monotonic() + self.handshake_s
        if not refused:
            log.debug("mailbox %r unreachable (%s): its replies are dropped", addr[:80], why)
            return
        if addr in self._warned:
            return
        if len(self._warned) > 1000:
            self._warned.clear()
        self._warned.add(addr)
        log.warning("mailbox %r refused this worker's connection (%s): an older Sender "
                    "(PULL mailbox, before the ROUTER/DEALER mailbox protocol) or a wrong key; "
                    "its replies are dropped", addr[:80], why)

    def _drop(self, addr: bytes) -> None:
        entry = self._open.pop(addr)
        where = entry[2]
        if self._endpoints.get(where) == addr:
            del self._endpoints[where]
            self._unshaken.pop(where, None)
        assert self.sock is not None
        try:
            self.sock.disconnect(where)  # queued replies still go out, within the linger
        except zmq.ZMQError:
            pass  # its session ended already (a refused handshake)
        self.closed_total += 1

    def expire(self, now: float | None = None) -> None:
        """Drop connections idle for ``idle_s`` and those with no handshake in
        ``handshake_s`` (called by the runners every half heartbeat)."""
        now = time.monotonic() if now is None else now
        self._now = now
        while self._open:
            addr, entry = next(iter(self._open.items()))
            if now - entry[1] < self.idle_s:
                break
            self._drop(addr)
        self._read_events()  # also keeps the event queue short when nothing is pending
        if self._unshaken:
            late = [(where, state[1]) for where, state in self._unshaken.items()
                    if state[0] <= now]
            for where, reached in late:
                owner = self._endpoints.get(where)
                if owner is not None:
                    self.lost(owner, f"no ZeroMQ handshake within {self.handshake_s:g} s",
                              refused=reached)
        if self._lost:
            for gone in [a for a, until in self._lost.items() if until <= now]:
                del self._lost[gone]

    def __len__(self) -> int:
        return len(self._open)

    def stats(self) -> dict[str, int]:
        """The pool's figures: sockets (0 or 1), open connections, totals."""
        return {"sockets": int(self.sock is not None), "open": len(self._open),
                "opened": self.opened_total, "closed": self.closed_total,
                "lost": self.lost_total}

    def close(self) -> None:
        """Close the socket (queued replies get ``linger_ms`` to go out)."""
        self.closed_total += len(self._open)
        self._open.clear()
        self._endpoints.clear()
        self._unshaken.clear()
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.sock.close(linger=self.linger_ms)
            self.sock = None
            self._key = None
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None
