"""Connections from a worker to senders' mailboxes, bounded and validated.

A worker serving many senders must not keep a socket per sender forever:
sockets live in an LRU of at most ``max_open`` entries and are closed after
``idle_s`` without use. Only addresses the deployment's
:class:`~sqm.protocol.MailboxPolicy` allows are ever connected to. A
mailbox that names a CURVE key (``ADDRESS KEY``, a secured sender's) is
reached as a CURVE client of that key, so replies travel encrypted.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import zmq

from sqm.protocol import MAILBOX_KEY_SEP, MailboxPolicy
from sqm.security.keys import KeyPair
from sqm.sockets import make_socket


class MailboxPool:
    def __init__(
        self,
        ctx: zmq.Context,
        policy: MailboxPolicy,
        *,
        max_open: int = 64,
        idle_s: float = 60.0,
        linger_ms: int = 2000,
        keys: KeyPair | None = None,
    ) -> None:
        self.ctx = ctx
        #: Our CURVE pair towards secured mailboxes (the worker's own key; an
        #: ephemeral one when it has none: the mailbox admits any key it gave out).
        self.keys = keys
        self.policy = policy
        self.max_open = max(1, max_open)
        self.idle_s = idle_s
        self.linger_ms = linger_ms
        self._open: OrderedDict[bytes, list] = OrderedDict()  # addr -> [socket, last_used]
        self._refused: dict[bytes, str] = {}
        self.opened_total = 0
        self.closed_total = 0

    def get(self, addr: bytes) -> zmq.Socket:
        """A PUSH socket connected to ``addr``; raises ValueError if the address is refused."""
        entry = self._open.get(addr)
        if entry is not None:
            self._open.move_to_end(addr)
            entry[1] = time.monotonic()
            sock: zmq.Socket = entry[0]
            return sock
        reason = self._refused.get(addr)
        if reason is None:
            try:
                reason = self.policy.check(addr.decode("ascii"))
            except UnicodeDecodeError:
                reason = "mailbox is not ASCII"
            if reason:
                if len(self._refused) > 1000:
                    self._refused.clear()
                self._refused[addr] = reason
        if reason:
            raise ValueError(reason)
        where, _, key = addr.decode("ascii").partition(MAILBOX_KEY_SEP)
        if key:
            # A secured sender's mailbox: a CURVE server whose key came in the envelope.
            if self.keys is None:
                self.keys = KeyPair(*zmq.curve_keypair())
            try:
                sock = make_socket(self.ctx, zmq.PUSH, linger_ms=self.linger_ms, hwm=10_000,
                                   curve_client=self.keys, server_key=key.encode("ascii"))
            except zmq.ZMQError as exc:
                self._refused[addr] = reason = f"mailbox key refused: {exc}"
                raise ValueError(reason) from None
        else:
            sock = make_socket(self.ctx, zmq.PUSH, linger_ms=self.linger_ms, hwm=10_000)
        sock.connect(where)
        self._open[addr] = [sock, time.monotonic()]
        self.opened_total += 1
        while len(self._open) > self.max_open:
            _, (old, _) = self._open.popitem(last=False)
            old.close(linger=self.linger_ms)
            self.closed_total += 1
        return sock

    def expire(self, now: float | None = None) -> None:
        """Close sockets idle for longer than ``idle_s``."""
        now = time.monotonic() if now is None else now
        while self._open:
            addr, (sock, used) = next(iter(self._open.items()))
            if now - used < self.idle_s:
                return
            del self._open[addr]
            sock.close(linger=self.linger_ms)
            self.closed_total += 1

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        for sock, _ in self._open.values():
            sock.close(linger=self.linger_ms)
        self.closed_total += len(self._open)
        self._open.clear()
