"""One heartbeat thread per process: every Worker of the process beats through it.

Each Worker must beat to each broker every interval, also while a callback
runs (sqm drops a worker silent for 3). A thread and a socket per Worker did
that, but a process of 250 Workers then sent 250 beats an interval to each
broker (1,000 a second for W4's 1,000 workers: most of an idle broker's CPU)
and ran 250 threads that each had to win the GIL in time. Here one thread
beats for all of them: the Workers that share a ZeroMQ context, a broker
endpoint, CURVE keys and an interval form a *group*, and each group sends
one message per interval, ``[SQM1, H, "", pack_ids(worker ids)]``, on a
socket of its own. A broker reads that form only if it said so in its
answer to the worker's HELLO (:data:`sqm.protocol.PACKED_BEATS`); to any
other broker, and when the group lists a single worker, each worker's beat
goes alone as before (``[SQM1, H, worker-id]``). Self-reports, when due
(:class:`~worker.links.ReportPlan`), go as each worker's own
``[SQM1, H, worker-id, report]`` in the same instant instead.

The thread also reads those sockets: sqm sends ``[SQM1, G, worker-id]`` on
it when a worker holds messages beyond what it runs at once and has ended
none for a while (prefetch reclaim). The worker's runner is then inside a
callback and reads nothing, so this thread asks the runner to give back
what waits behind it (:meth:`Member.reclaim`). Between beats the thread
sleeps in a poll of those sockets: it wakes for a beat, an ask, or a
change of members, never on a timer of its own.

After the beats, the thread re-sends the ACK of each Worker's running
messages (:meth:`Worker._ack_again`, once per interval, with a mailbox pool
of that Worker's that only this thread uses): the beats go first, since a
re-sent ACK may have to connect to a mailbox first.

Workers join with :meth:`Beater.register` when they start serving and leave
with :meth:`Beater.unregister` (which returns once their sockets are closed,
so a Worker's own context can be terminated after it). The thread starts
with the first Worker and ends with the last.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from sqm.protocol import GIVE_BACK, HEARTBEAT, SIGNATURE, pack_ids
from sqm.security.keys import KeyPair

from .links import ReportPlan, beat_phase, broker_socket, next_beat_in
from .mailboxes import MailboxPool

log = logging.getLogger("sqm.worker")

#: What a group shares: (context, endpoint, CURVE client key + server key, interval).
GroupKey = tuple[int, str, tuple[bytes, bytes] | None, float]

#: ``Worker._ack_again(acks, running, before) -> running now`` (``running``: the
#: Execution's message id -> what it needs to reach the caller's mailbox).
AckAgain = Callable[[MailboxPool, dict[bytes, Any], set[bytes]], set[bytes]]


class Member:
    """One serving Worker as the beater sees it (made by ``Worker.run``)."""

    __slots__ = ("worker_id", "wid", "ctx", "endpoints", "heartbeat", "curve", "reports",
                 "running", "report", "ack_again", "new_acks", "acks", "before", "left",
                 "reclaim")

    def __init__(self, worker_id: str, ctx: zmq.Context, endpoints: list[str], heartbeat: float,
                 curve: tuple[KeyPair, bytes] | None, reports: ReportPlan,
                 running: dict[bytes, Any], report: Callable[[], bytes],
                 ack_again: AckAgain, new_acks: Callable[[], MailboxPool]) -> None:
        self.worker_id = worker_id
        self.wid = worker_id.encode()
        self.ctx = ctx
        self.endpoints = list(endpoints)
        self.heartbeat = heartbeat
        self.curve = curve
        self.reports = reports  # which beats carry the report; which brokers read packed beats
        self.running = running  # the callbacks running now, by message id
        self.report = report  # the self-report frame
        self.ack_again = ack_again
        self.new_acks = new_acks  # its mailbox pool for re-sent ACKs (made by the beat thread)
        self.acks: MailboxPool | None = None
        self.before: set[bytes] = set()  # ids running at the last beat
        self.left = threading.Event()  # the beat thread let go of it (its sockets are closed)
        # sqm asks it to give back what waits behind its running callback (its
        # runner's reclaim(); called from the beat thread).
        self.reclaim: Callable[[], None] = _nothing

    def keys(self, endpoint: str) -> GroupKey:
        curve = None if self.curve is None else (self.curve[0].public, self.curve[1])
        return (id(self.ctx), endpoint, curve, self.heartbeat)

    def close(self) -> None:
        if self.acks is not None:
            self.acks.close()
            self.acks = None


class Group:
    """The Workers beating to one broker through one socket, at one phase of the interval."""

    __slots__ = ("key", "ctx", "endpoint", "curve", "heartbeat", "phase", "members", "sock",
                 "next_at", "rid")

    def __init__(self, key: GroupKey, member: Member, endpoint: str, now: float) -> None:
        self.key = key
        self.ctx = member.ctx  # held: the key's id(ctx) stays this context's
        self.endpoint = endpoint
        self.curve = member.curve
        self.heartbeat = member.heartbeat
        # By process and broker: the groups of a broker's processes fall on a few
        # phases of the interval, so it reads them in a few batches (links.BEAT_PHASES).
        self.phase = beat_phase(f"{os.getpid()}|{endpoint}", self.heartbeat)
        self.members: dict[Member, None] = {}  # in order of joining
        self.sock: zmq.Socket | None = None  # made and used by the beat thread only
        # Its socket's routing id, which its members' HELLO names (``beat_id``): sqm
        # knows where to ask them for a reclaim before their first beat comes.
        self.rid = b"B" + os.urandom(15)
        self.next_at = now + next_beat_in(now, self.heartbeat, self.phase)

    def frames(self, members: list[Member], mono: float) -> list[list[bytes]]:
        """The messages of one beat of ``members``: the packed beat (or the lone ones)
        first, then the self-reports due (each a worker's 4-frame beat)."""
        out: list[list[bytes]] = []
        packed: list[bytes] = []
        reporting: list[Member] = []
        endpoint = self.endpoint
        for m in members:
            reports = m.reports
            if reports.due_for(endpoint, mono, bool(m.running)):
                reporting.append(m)
            elif reports.packed(endpoint) and len(m.wid) <= 255:
                packed.append(m.wid)
            else:
                out.append([SIGNATURE, HEARTBEAT, m.wid])
        if len(packed) == 1:
            out.insert(0, [SIGNATURE, HEARTBEAT, packed[0]])
        elif packed:
            out.insert(0, [SIGNATURE, HEARTBEAT, b"", pack_ids(packed)])
        for m in reporting:
            try:
                out.append([SIGNATURE, HEARTBEAT, m.wid, m.report()])
            except Exception:  # never let a report stop the heartbeats
                log.exception("worker %s: cannot build its self-report", m.worker_id)
                out.append([SIGNATURE, HEARTBEAT, m.wid])
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None


class Beater:
    """The process's heartbeat thread and the groups it beats for."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall clock: beats fall on fixed phases of the interval
        self._cond = threading.Condition()
        self._groups: dict[GroupKey, Group] = {}
        self._closing: list[Group] = []  # emptied groups whose socket the thread closes
        self._leaving: list[Member] = []  # members whose pool the thread closes
        self._thread: threading.Thread | None = None
        # register/unregister write a byte here to wake the thread's poll.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        #: Messages sent (every beat, report and packed beat), for tests and curiosity.
        self.sent = 0
        #: Reclaim asks received from sqm, and the thread's wake-ups, for tests and curiosity.
        self.reclaims = 0
        self.wakes = 0

    # ------------------------------------------------------------ any thread

    def register(self, member: Member) -> None:
        """Beat for ``member`` to each of its brokers from the next phase instant on."""
        with self._cond:
            now = self._clock()
            for endpoint in member.endpoints:
                key = member.keys(endpoint)
                group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = Group(key, member, endpoint, now)
                group.members[member] = None
            member.left.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="sqm-heartbeat")
                self._thread.start()
            self._cond.notify()
        self._wake()

    def unregister(self, member: Member, timeout: float) -> bool:
        """Stop beating for ``member``; True once its sockets (and an emptied group's)
        are closed, False if the thread did not get to it within ``timeout`` s."""
        with self._cond:
            for endpoint in member.endpoints:
                group = self._groups.get(member.keys(endpoint))
                if group is None or member not in group.members:
                    continue
                del group.members[member]
                if not group.members:
                    del self._groups[group.key]
                    self._closing.append(group)
            self._leaving.append(member)
            self._cond.notify()
        self._wake()
        return member.left.wait(timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # already woken (buffer full)
            pass

    def beat_id(self, member: Member, endpoint: str) -> bytes | None:
        """The routing id of the socket ``member`` beats through to ``endpoint``."""
        with self._cond:
            group = self._groups.get(member.keys(endpoint))
            return group.rid if group is not None and member in group.members else None

    def groups(self) -> list[tuple[str, list[str]]]:
        """(endpoint, worker ids) of each group now (for tests and debugging)."""
        with self._cond:
            return [(g.endpoint, [m.worker_id for m in g.members]) for g in self._groups.values()]

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                closing, self._closing = self._closing, []
                leaving, self._leaving = self._leaving, []
                if not self._groups and not closing and not leaving:
                    self._thread = None
                    return
                now = self._clock()
                # (group, its members now): the lists may change as soon as the lock is let go
                due = [(g, list(g.members)) for g in self._groups.values() if g.next_at <= now]
                for g, _ in due:
                    g.next_at = now + next_beat_in(now, g.heartbeat, g.phase)
                fresh = [g for g in self._groups.values() if g.sock is None]
            items: list[Group | Member] = [*closing, *leaving]
            for item in items:
                try:
                    item.close()
                except Exception:  # the thread must go on beating for the others
                    log.exception("heartbeats: cannot close a socket")
            for m in leaving:
                m.left.set()
            for g in fresh:
                # Connected at once, not at its first beat (up to an interval away):
                # sqm asks a reclaim on it from the members' HELLO on, and a ROUTER
                # drops what it sends to a peer that has not connected yet.
                try:
                    self._connect(g)
                except Exception:  # the thread must go on beating for the others
                    log.exception("heartbeats: cannot connect to %s", g.endpoint)
            if due:
                self._beat(due)
            with self._cond:
                if self._closing or self._leaving or not self._groups:
                    continue
                wait = min(g.next_at for g in self._groups.values()) - self._clock()
                groups = [g for g in self._groups.values() if g.sock is not None]
            if wait > 0:
                self._wait(groups, wait)

    def _wait(self, groups: list[Group], seconds: float) -> None:
        """Sleep up to ``seconds`` in a poll of the groups' sockets; act on sqm's asks."""
        items: list[tuple[Any, int]] = [(g.sock, zmq.POLLIN) for g in groups]
        items.append((self._wake_r, zmq.POLLIN))
        try:
            ready = zmq.zmq_poll(items, max(0, int(seconds * 1000)) + 1)
        except zmq.ZMQError:  # a socket closed under us: the next round rebuilds the list
            return
        self.wakes += 1
        if not ready:
            return
        try:  # (zmq_poll names a plain socket by its fd: drain it whatever came)
            while self._wake_r.recv(64):
                pass
        except OSError:  # drained
            pass
        for item, _ev in ready:
            for g in groups:
                if g.sock is item:
                    self._read(g)

    def _read(self, group: Group) -> None:
        """What sqm sent on a group's socket: ``[SQM1, G, worker-id]`` asks a reclaim."""
        sock = group.sock
        while sock is not None:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:  # Again: drained
                return
            if len(frames) != 3 or frames[0] != SIGNATURE or frames[1] != GIVE_BACK:
                continue
            for m in list(group.members):
                if m.wid == frames[2]:
                    self.reclaims += 1
                    try:
                        m.reclaim()
                    except Exception:  # the thread must go on beating for the others
                        log.exception("worker %s: cannot give back its messages", m.worker_id)

    @staticmethod
    def _connect(g: Group) -> None:
        """Make and connect ``g``'s socket, unless it has one (the beat thread only)."""
        if g.sock is None:
            g.sock = broker_socket(g.ctx, g.curve, routing_id=g.rid, linger_ms=0)
            g.sock.connect(g.endpoint)

    def _beat(self, due: list[tuple[Group, list[Member]]]) -> None:
        """Send the due groups' beats, then re-send their workers' ACKs."""
        mono = time.monotonic()
        acked: list[Member] = []
        for g, members in due:
            try:
                self._connect(g)
                assert g.sock is not None
                for frames in g.frames(members, mono):
                    try:
                        g.sock.send_multipart(frames, zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.Again:
                        pass
                # A worker's ACKs go once an interval: with the beat to its first broker.
                acked.extend(m for m in members if m.endpoints[0] == g.endpoint)
            except Exception:  # one group's trouble must not silence the others
                log.exception("heartbeats to %s failed", g.endpoint)
        for m in acked:
            if m.running or m.before:
                try:
                    if m.acks is None:
                        m.acks = m.new_acks()
                    m.before = m.ack_again(m.acks, m.running, m.before)
                except Exception:
                    log.exception("worker %s: cannot re-send its ACKs", m.worker_id)


def _nothing() -> None:
    """A Member's reclaim() until its runner sets one."""


#: The process's beater (a forked child starts with a fresh one: threads do not survive fork).
BEATER = Beater()


def _after_fork() -> None:
    global BEATER
    BEATER = Beater()


os.register_at_fork(after_in_child=_after_fork)


def beater() -> Beater:
    """The process's beater (looked up at each use: a fork replaces it)."""
    return BEATER


__all__ = ["BEATER", "Beater", "Group", "Member", "beater"]

