"""Which broker gets the next message, and what to re-send when one goes away.

A sender keeps one DEALER per broker of its queue: a :class:`Link`. A link
is NEW until its first ZMTP handshake, then UP; it goes DOWN on a
disconnect (a killed broker at once; a hung one when ZMTP heartbeats go
unanswered for 3 intervals) or a refused connect. Submissions go
round-robin over UP links (else NEW ones, else any: libzmq then queues
them until a broker is there, as a single-broker sender always did).

Every tracked message remembers the link and the connection (``epoch``) it
went out on, until a worker acknowledges it (ACK) or it completes. Then:

- a link goes DOWN while another is UP: its DEALER is re-created (dropping
  copies still queued in libzmq) and its messages are re-sent through UP
  links, same id. A duplicate reply is dropped by the correlator. A message
  whose worker acknowledges the start at once (FLAG_ACK) is re-sent at once;
  any other may have started without a word yet (its worker's first ACK
  comes with its next heartbeat), so it is held for two heartbeats first
  and re-sent only if neither an ACK nor its outcome came meanwhile;
- a link comes back UP: after a grace period (time for the ACCEPTED of
  copies that got through to arrive), messages sent on its previous
  connection that its broker never ACCEPTED are re-sent to it. Those it did
  accept are in its journal (if it keeps one) or lost: their callers get
  Timeout at the deadline.

Socket creation and closing belong to the façade (sync or asyncio), given
as ``opener``/``closer``; everything here is plain, synchronous logic.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from sqm.errors import AuthError
from sqm.protocol import (
    ACCEPTED,
    COMPACT_SUBMIT,
    FEATURE_BATCH,
    FEATURE_COMPACT,
    FLAG_ACK,
    SIGNATURE,
    SUBMIT,
)
from sqm.security.handshake import NO_DETAIL_REPEATS, classify
from sqm.security.keys import KeyPair
from sqm.sockets import make_socket
from sqm.zmqfast import readable, recv_frames, send_frames

from ._correlator import Correlator

NEW, UP, DOWN, GONE = 0, 1, 2, 3  # GONE: removed by set_endpoints, closed

UP_EVENTS = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
DOWN_EVENTS = int(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
#: A refused CURVE handshake: the caller gets AuthError, not a Timeout.
AUTH_EVENTS = int(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
MONITOR_EVENTS = UP_EVENTS | DOWN_EVENTS | AUTH_EVENTS


def tune(sock: zmq.Socket, heartbeat: float) -> None:
    """ZMTP heartbeats: a silent broker is dropped after 3 intervals, a stuck handshake too."""
    ms = max(1, int(heartbeat * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ms)
    sock.setsockopt(zmq.HANDSHAKE_IVL, max(3 * ms, 1000))


_monitor_ids = itertools.count(1)


def open_dealer(ctx: zmq.Context, endpoint: str, routing_id: bytes, heartbeat: float,
                prefix: str, curve: tuple[KeyPair, bytes] | None = None,
                ) -> tuple[zmq.Socket, zmq.Socket]:
    """A tuned DEALER connected to ``endpoint`` and its monitor socket.

    ``ctx`` decides the flavour (a zmq.asyncio context gives asyncio
    sockets); ``curve`` (own pair, server key) makes it a CURVE client.
    Nothing is left open on failure.
    """
    if curve is None:
        sock = make_socket(ctx, zmq.DEALER, routing_id=routing_id)
    else:
        sock = make_socket(ctx, zmq.DEALER, routing_id=routing_id, curve_client=curve[0],
                           server_key=curve[1])
    try:
        tune(sock, heartbeat)
        monitor = sock.get_monitor_socket(
            MONITOR_EVENTS, f"inproc://sqm-sender-{prefix}-{next(_monitor_ids)}"
        )
    except zmq.ZMQError:
        sock.close(0)
        raise
    try:
        sock.connect(endpoint)
    except zmq.ZMQError:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        raise
    return sock, monitor


def monitor_event(frames: list[bytes]) -> int:
    """The event number of a libzmq monitor message (first 2 bytes, native order)."""
    return int.from_bytes(frames[0][:2], sys.byteorder)


def learn_features(link: Link, features: bytes) -> None:
    """What the broker on ``link`` takes, from its ACCEPTED's features frame."""
    link.batches = FEATURE_BATCH in features
    link.compact = FEATURE_COMPACT in features


def compact_submit(frames: list[bytes]) -> bytes:
    """A 4-frame SUBMIT's frame in compact form (one frame: docs/PROTOCOL.md).

    A payload over COMPACT_MAX is joined too: a batch is all of one form,
    and a batch of big payloads is rare enough not to matter.
    """
    return COMPACT_SUBMIT + frames[2] + frames[3]


class Link:
    """One broker: its DEALER (``sock``; ``raw`` is a plain view for NOBLOCK
    I/O), the monitor socket, and what the sender knows of the connection."""

    __slots__ = ("endpoint", "sock", "raw", "monitor", "state", "epoch", "resend_at", "tasks",
                 "reached", "broken", "batches", "compact", "queued")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock: Any = None
        self.raw: Any = None
        self.monitor: Any = None
        self.state = NEW
        self.epoch = 0  # +1 per loss of connection
        self.resend_at = 0.0  # monotonic; when to re-send what the last connection lost
        self.tasks: list[Any] = []  # AsyncSender's reader tasks
        self.reached = False  # a broker answered here at least once (ZMTP handshake)
        self.broken = 0  # handshakes that failed without detail, in a row
        #: The broker on this connection takes batched SUBMITs (its ACCEPTED said so).
        self.batches = False
        #: ... and compact SUBMITs (one frame per message: ``FEATURE_COMPACT``).
        self.compact = False
        #: Submissions waiting for :meth:`Links.flush` (AsyncSender: this loop iteration's).
        self.queued: list[tuple[str, list[bytes]]] = []

    def __repr__(self) -> str:
        return f"<Link {self.endpoint} {('NEW', 'UP', 'DOWN', 'GONE')[self.state]} epoch {self.epoch}>"


#: How often (s) started messages of a DOWN broker are looked at, at most.
LOST_CHECK_S = 0.25


def _is_down(link: Link) -> bool:
    return link.state == DOWN or link.state == GONE


class Links:
    """The links of one sender and the decisions about them."""

    def __init__(
        self,
        core: Correlator,
        endpoints: Iterable[str],
        opener: Callable[[Link], None],
        closer: Callable[[Link, int], None],
        heartbeat: float,
        wake: Callable[[str], None] | None = None,
    ) -> None:
        self.core = core
        self.wake = wake  # told of ids whose reply became ready while draining
        self._open = opener
        self._close = closer
        self.grace = heartbeat
        #: Messages of a DOWN link that may have started unacknowledged:
        #: id -> when (monotonic) to re-send it if still unheard of.
        self.held: dict[str, float] = {}
        self.links: list[Link] = []
        self.up: list[Link] = []
        self._rr = 0
        self.retry: list[str] = []  # ids whose re-send found every queue full
        self.resent = 0
        #: A link that never reached a broker was refused (no socket file, no
        #: listener): the façade may then check whether any broker exists.
        self.refused = False
        #: A broker refused our CURVE handshake (set with ``refused``).
        self.auth_error: AuthError | None = None
        try:
            for ep in endpoints:
                self.links.append(self._new(ep))
        except BaseException:
            self.close(0)
            raise
        core.brokers = len(self.links)

    def _new(self, endpoint: str) -> Link:
        link = Link(endpoint)
        self._open(link)
        return link

    @property
    def single(self) -> Link | None:
        """The one link of a single-broker sender (its hot path skips pick())."""
        return self.links[0] if len(self.links) == 1 else None

    def pick(self) -> Link:
        up = self.up
        self._rr += 1
        if up:
            return up[self._rr % len(up)]
        pool = [link for link in self.links if link.state == NEW] or self.links
        return pool[self._rr % len(pool)]

    # ------------------------------------------------------------ events

    def event(self, link: Link, event: int, now: float) -> None:
        """Apply one monitor event of ``link``."""
        if event & AUTH_EVENTS:  # refused now (also after a key was removed and we reconnected)
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                link.broken += 1
                if link.broken < NO_DETAIL_REPEATS:
                    return  # maybe a broker going away mid-handshake: a refusal repeats
            self.auth_error = classify(event, 0, link.endpoint)
            self.refused = True
            return
        if event & UP_EVENTS:
            link.broken = 0
            if link.state == UP:
                return
            if link.state == DOWN and link.epoch:
                link.resend_at = now + self.grace
            link.state = UP
            link.reached = True
        elif event & DOWN_EVENTS:
            if not link.reached:
                self.refused = True
            if link.state == DOWN:
                return
            link.state = DOWN
            link.epoch += 1
            link.batches = link.compact = False  # the broker that comes back may be older
        else:
            return
        self.up = [x for x in self.links if x.state == UP]
        if link.queued:  # never sent: to a live broker now, no need to wait
            self.flush(link)
        self.rehome(now)

    def rehome(self, now: float) -> None:
        """Re-send, through UP links, what DOWN links hold that no worker took.

        Without FLAG_ACK "no ACK yet" does not mean "not started": such a
        message is held until :meth:`settle` has passed (see :meth:`due`).
        """
        if not self.up:
            return
        core = self.core
        stranded: dict[Link, list[str]] = {}
        for mid, (_, link, _) in core.sent.items():
            if link.state == DOWN and mid not in self.held:
                stranded.setdefault(link, []).append(mid)
        for link, mids in stranded.items():
            self.purge(link)
            for mid in mids:
                self._resend_or_hold(mid, self.pick(), now)

    def settle(self) -> float:
        """How long an unacknowledged message of a lost broker may have run
        unheard of: two heartbeats (the Sender's, or the slowest worker's seen)."""
        return 2 * max(self.grace, self.core.slowest_beat())

    def _resend_or_hold(self, mid: str, link: Link, now: float) -> None:
        entry = self.core.sent.get(mid)
        if entry is None:
            return  # answered or acknowledged meanwhile
        if entry[0][2][0] & FLAG_ACK:  # its worker ACKs at the start: none = not started
            self.resend(mid, link)
        else:
            self.held[mid] = now + self.settle()

    def release(self, now: float) -> float:
        """Re-send the held messages whose time has come and of which nothing
        was heard (no ACK, no outcome); return when to look again."""
        core = self.core
        nxt = float("inf")
        for mid, at in list(self.held.items()):
            if now < at:
                nxt = min(nxt, at)
                continue
            del self.held[mid]
            entry = core.sent.get(mid)
            if entry is None or mid not in core.outstanding:
                continue  # acknowledged or answered meanwhile
            link, epoch = entry[1], entry[2]
            if link.state != GONE and epoch == link.epoch:
                continue  # re-sent on a live connection meanwhile (rescue, reconnect)
            # Its connection is lost (the broker may be back, empty): another copy.
            self.resend(mid, self.pick())
        return nxt

    def purge(self, link: Link) -> None:
        """Re-create a DOWN link's DEALER so copies queued in it are never delivered."""
        self.read_all(link)  # ACCEPTED / errors that made it first
        self._close(link, 0)
        self._open(link)

    def flush(self, link: Link) -> bool:
        """Send what is queued on ``link`` as one SUBMIT (one message: as is).

        Messages of a link that went DOWN, or whose send queue is full, go
        through :meth:`resend` one by one (another live broker, else the
        retry list); True when some await a retry (:meth:`due`).
        """
        queued = link.queued
        if not queued:
            return False
        link.queued = []
        if link.state != DOWN and link.raw is not None:
            if link.compact:
                frames = [compact_submit(one) for _, one in queued]
            elif len(queued) == 1:
                frames = queued[0][1]
            else:
                frames = [SIGNATURE, SUBMIT]
                for _, one in queued:
                    frames += one[2:]
            try:
                send_frames(link.raw, frames)
                return False
            except zmq.Again:
                pass
        for mid, _ in queued:  # never oneway: those are sent at once (AsyncSender)
            self.resend(mid, self.pick() if link.state == DOWN else link)
        return bool(self.retry)

    def read_all(self, link: Link) -> int:
        """Feed everything waiting on ``link``'s DEALER to the correlator.

        Returns how many were errors rather than ACCEPTED notices (those come
        one per message and mean nothing to a caller of poll()).
        """
        core = self.core
        wake = self.wake
        n = 0
        raw = link.raw
        # A look at the events (~2.5 µs) ends the loop, not a failing read (~7 µs,
        # pyzmq raises zmq.Again): a sequential caller looks here every 20 ms.
        while readable(raw):
            frames = recv_frames(raw)
            mid = core.feed(frames, True)
            if mid is not None:
                n += 1
                if wake is not None:
                    wake(mid)
            elif len(frames) < 2 or frames[1] != ACCEPTED:
                n += 1
            elif len(frames) > 3 and not link.batches:
                learn_features(link, frames[3])
        return n

    def due(self, now: float) -> float:
        """Do re-sends whose time has come; return when to look again (inf: nothing to do)."""
        core = self.core
        nxt = float("inf")
        for link in self.links:
            if not link.resend_at:
                continue
            if now < link.resend_at:
                nxt = min(nxt, link.resend_at)
                continue
            link.resend_at = 0.0
            if link.state != UP:
                continue
            lost = [mid for mid, (_, x, epoch) in core.sent.items()
                    if x is link and epoch < link.epoch and mid not in core.accepted]
            for mid in lost:
                self.resend(mid, link)
        if self.held:
            nxt = min(nxt, self.release(now))
        if core.stopping:
            self.rescue()
        if core.running and len(self.up) < len(self.links) and self.lost_workers(now):
            nxt = min(nxt, now + LOST_CHECK_S)  # an asyncio sender comes back for them
        if self.retry:
            retry, self.retry = self.retry, []
            for mid in retry:
                self.resend(mid, self.pick())
            if self.retry:
                nxt = min(nxt, now + 0.1)
        return nxt

    def rescue(self) -> None:
        """Messages a stopping broker failed back (BrokerShutdown) before a
        worker took them: re-send them through another live broker, or pass
        the error on when there is none."""
        core = self.core
        stopping, core.stopping = core.stopping, []
        for mid, then in stopping:
            entry = core.sent.get(mid)
            if entry is not then or mid not in core.outstanding:
                continue  # answered, forgotten or already re-sent (its link went DOWN)
            others = [x for x in self.up if x is not entry[1]]
            if others:
                self._rr += 1
                self.resend(mid, others[self._rr % len(others)])
                continue
            done = core.lose(mid, "sqm stopped before a worker took it", "BrokerShutdown")
            if done is not None and self.wake is not None:
                self.wake(done)

    def lost_workers(self, now: float) -> bool:
        """Started messages whose broker is DOWN and whose worker stopped
        repeating its ACK: both died, so nobody else will say WorkerLost.
        Re-sent through a live broker while the message's retries last.
        True while started messages of a DOWN broker remain to be watched."""
        core = self.core
        for mid in core.silent_workers(now, _is_down):
            frames, link = core.running.pop(mid)[:2]
            env = frames[2]
            if env[1] > 0 and self.up:  # a retry left: another worker may run it
                frames = [frames[0], frames[1], env[:1] + bytes((env[1] - 1,)) + env[2:],
                          *frames[3:]]
                core.sent[mid] = (frames, link, link.epoch)
                self.resend(mid, self.pick())
                continue
            done = core.lose(mid, "the worker and the broker that dispatched it are gone "
                                  "(no ACK for 3 heartbeats)")
            if done is not None and self.wake is not None:
                self.wake(done)
        return any(_is_down(entry[1]) for entry in core.running.values())

    def resend(self, mid: str, link: Link) -> None:
        core = self.core
        entry = core.sent.get(mid)
        if entry is None or mid not in core.outstanding:
            return  # started or answered meanwhile
        frames = entry[0]
        for candidate in [link, *(x for x in self.up if x is not link)]:
            try:
                send_frames(candidate.raw, frames)
            except zmq.ZMQError:
                continue
            core.sent[mid] = (frames, candidate, candidate.epoch)
            core.accepted.discard(mid)
            self.resent += 1
            return
        self.retry.append(mid)

    # ------------------------------------------------------------ membership

    def replace(self, endpoints: Iterable[str], now: float) -> list[Link]:
        """Use exactly ``endpoints`` (in order) from now on; return the new links."""
        old = {link.endpoint: link for link in self.links}
        links: list[Link] = []
        added: list[Link] = []
        for ep in endpoints:
            link = old.pop(ep, None)
            if link is None:
                link = self._new(ep)
                added.append(link)
            links.append(link)
        self.links = links
        self.up = [x for x in links if x.state == UP]
        core = self.core
        core.brokers = len(links)
        for gone in old.values():
            self.read_all(gone)
            unsent = {mid for mid, _ in gone.queued}  # queued for a batch, never sent
            gone.queued = []
            for mid in unsent:
                self.resend(mid, self.pick())
            mids = [mid for mid, (_, x, _) in core.sent.items() if x is gone]
            if gone.state == UP:
                # A live broker keeps what it accepted and answers through its
                # workers; the rest may not have reached it: send elsewhere.
                self._close(gone, 1000)
                kept = [m for m in mids if m in core.accepted]
                for mid in kept:
                    del core.sent[mid]  # nowhere to re-send it to any more
                mids = [m for m in mids if m not in core.accepted]
                gone.state = GONE
                for mid in mids:
                    self.resend(mid, self.pick())
                continue
            self._close(gone, 0)
            gone.state = GONE
            for mid in mids:  # a lost broker: maybe started unacknowledged (rehome)
                if mid not in self.held:
                    self._resend_or_hold(mid, self.pick(), now)
        return added

    def close(self, linger: int) -> None:
        for link in self.links:
            if link.sock is not None:
                self.flush(link)
                self._close(link, linger)
