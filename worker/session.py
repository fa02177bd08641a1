"""What a runner gets from its Worker: a :class:`Session`, and the :class:`Runner` protocol.

A runner (plain or asyncio) serves a worker's queue until told to stop. It
sees the worker only through this narrow object (settings, the shared
:class:`~worker.execute.Execution`, the mailbox pool, the stop flag and the
registration/control handling both runners share), never the Worker's
own attributes, so runners and the Worker can change independently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from sqm import protocol
from sqm.protocol import (
    ABILITIES,
    ACCEPTED,
    BATCHES,
    BYE,
    CANCEL,
    COMPACT_DONE,
    ERROR,
    GIVE_BACK,
    HEARTBEAT,
    HELLO,
    PACKED_BEATS,
    SIGNATURE,
    STOP,
)
from sqm.security.keys import KeyPair

from .execute import Execution, Workload
from .followup import FollowUps
from .links import BrokerLink, ReportPlan
from .mailboxes import MailboxPool

log = logging.getLogger("sqm.worker")


class CountingWorkload(Workload):
    """A Workload that calls ``after_message(tasks_done)`` as each message ends.

    Runners count each finished message before they report it DONE, so a
    worker that stops itself from here (recycling) says BYE first and is
    handed nothing more. Only Workers with limits use it: no cost otherwise.
    """

    __slots__ = ("_done", "after_message")

    def __init__(self, after_message: Callable[[int], None]) -> None:
        self._done = 0
        self.after_message = after_message
        super().__init__()

    @property
    def tasks_done(self) -> int:
        return self._done

    @tasks_done.setter
    def tasks_done(self, value: int) -> None:
        self._done = value
        if value:
            self.after_message(value)


class Runner(Protocol):
    """Serves one worker: :meth:`run` blocks until the worker leaves."""

    def run(self, session: Session) -> None:
        """Register, take work and run it until ``session.stop`` is set, then leave."""

    def stop(self) -> None:
        """Wake :meth:`run` to notice ``session.stop`` (any thread, even a signal handler)."""

    def reclaim(self) -> None:
        """sqm asks (from the heartbeat thread) for the messages waiting behind a
        callback that runs long: give them back (GIVE_BACK), or keep them if it moves."""


@dataclass(eq=False)
class Session:
    """One run of a worker, as its runner sees it."""

    worker_id: str
    queue: str
    endpoints: list[str]
    routing_id: bytes
    heartbeat: float
    liveness: int
    slots: int
    concurrency: int
    ctx: zmq.Context
    execution: Execution
    mailboxes: MailboxPool
    workload: Workload
    info: dict[str, Any]  # what HELLO tells a broker about this worker
    on_stop_request: Callable[[], None]  # a broker sent STOP
    stop: threading.Event = field(default_factory=threading.Event)
    #: (own CURVE pair, server key) towards a secured sqm; None: plain sockets.
    curve: tuple[KeyPair, bytes] | None = None
    #: The worker's follow-up messages (submit/rpc/forward from callbacks).
    followups: FollowUps | None = None
    #: The callbacks version last told to the brokers (HELLO or ABILITIES).
    told: int = -1
    #: When HELLO last went to each broker (monotonic, by endpoint).
    said_hello: dict[str, float] = field(default_factory=dict)
    #: Which brokers the heartbeat thread reports to at each beat (watched or not).
    reports: ReportPlan | None = None
    #: The routing id of the heartbeat socket towards an endpoint (worker.beats), if any.
    beat_id: Callable[[str], bytes | None] = lambda _endpoint: None

    def hello(self, link: BrokerLink) -> None:
        """Register with one broker (again): it forgets what it had parked.

        HELLO says the worker reads multi-message DISPATCHes (``batch``) and
        compact ones (``compact``: one frame per message, as the Sender sent
        it; docs/PROTOCOL.md), and
        asks the broker to watch this connection (``watch``); until it
        answers that it does (a HEARTBEAT with a 4th frame), the link is
        judged by heartbeats and reported to every beat, as with an older sqm.
        ``packed_beats`` asks whether it reads the process's packed beat
        (:mod:`worker.beats`); until a 5th frame says so, this worker beats
        to it on its own (``[SQM1, H, worker-id]``).
        """
        self.told = self.execution.abilities
        # batch: it reads multi-message DISPATCHes (an older worker gets one message each).
        info = dict(self.info, methods=sorted(self.execution.callbacks), watch=True,
                    packed_beats=True, batch=True, compact=True)
        beat_id = self.beat_id(link.endpoint)
        if beat_id is not None:  # where sqm asks it to give back (prefetch reclaim)
            info["beat_id"] = beat_id.hex()
        link.parked = 0
        # until this broker shows it batches (it may be older)
        link.batch = link.gives_back = link.compact = False
        self._watched(link, None)
        self.said_hello[link.endpoint] = time.monotonic()
        link.send([SIGNATURE, HELLO, protocol.encode_json(info)])

    def _watched(self, link: BrokerLink, report_s: float | None, packed: bool = False) -> None:
        """The broker watches ``link`` and wants a report every ``report_s``; None: it
        heartbeats. ``packed``: it reads packed beats."""
        link.watch(report_s)
        if self.reports is not None:
            self.reports.watch(link.endpoint, report_s, time.monotonic(), packed=packed)

    def announce(self, links: list[BrokerLink]) -> None:
        """Tell every broker the methods served now, if callbacks() changed them (CAN_DO)."""
        version = self.execution.abilities
        if version == self.told:
            return
        self.told = version
        body = protocol.encode_json({"methods": sorted(self.execution.callbacks)})
        for link in links:
            if link.sock is not None and not link.bye_sent:
                link.send([SIGNATURE, ABILITIES, body])

    def on_control(self, link: BrokerLink, frames: list[bytes]) -> None:
        """Anything from a broker but a dispatch (both runners)."""
        if len(frames) < 2 or frames[0] != SIGNATURE:
            return
        cmd = frames[1]
        if cmd == HEARTBEAT:
            n = len(frames)
            if 3 <= n <= 5 and frames[2].isdigit():
                link.broker_heartbeat = max(0.001, int(frames[2]) / 1000)
            if n in (4, 5) and frames[3].isdigit():  # it watches our connection (answers HELLO)
                self._watched(link, max(self.heartbeat, int(frames[3]) / 1000),
                              packed=n == 5 and frames[4] == PACKED_BEATS)
            elif n == 3 and link.watched:  # it heartbeats us: it does not watch us (any more)
                self._watched(link, None)
        elif cmd == BYE:
            if link.bye_sent:
                link.bye_acked = True  # our leave is acknowledged: nothing more will come
            elif time.monotonic() - self.said_hello.get(link.endpoint, -1e9) >= self.heartbeat:
                # sqm restarted or is stopping: say hello again. Not twice in one
                # beat: a BYE answering what we queued before our last HELLO
                # reached it is already answered by that HELLO.
                self.hello(link)
        elif cmd == ACCEPTED or cmd == ERROR:  # sqm about a follow-up message of ours
            if self.followups is not None:
                self.followups.feed_broker(frames)
        elif cmd == BATCHES:  # it reads multi-id DONEs (it answers our HELLO's "batch")
            link.batch = True
            # ... and GIVE_BACK, if it names it (an older sqm sends [SIG, L] alone)
            link.gives_back = len(frames) > 2 and GIVE_BACK in frames[2]
            link.compact = len(frames) > 2 and COMPACT_DONE[4:] in frames[2]  # compact DONEs
        elif cmd == CANCEL and len(frames) == 3:  # the sender cancelled a message we run
            self.execution.cancel(frames[2])
        elif cmd == STOP:
            if not self.stop.is_set():
                log.info("worker %s: sqm at %s asked it to stop", self.worker_id, link.endpoint)
            self.on_stop_request()
        else:
            log.debug("worker %s: ignoring command %r", self.worker_id, cmd[:8])

    def reconnect_due(self, link: BrokerLink, now: float) -> bool:
        """True when ``link``'s broker is silent and the link should start afresh.

        Says so in the log the first time, then at most once a minute
        (counting the attempts in between); and says when it answers again.
        A watched link is never started afresh: when its connection closes
        (a killed broker at once, a silent host after ``liveness`` beats of
        TCP keepalive) libzmq reconnects it by itself, and the runner says
        HELLO when it is back; that outage is logged the same way.
        """
        if link.watched:
            if link.connected or link.down_at is None:
                self._answered(link, now)
            elif (link.outage.since is None
                    or now - link.down_at >= self.heartbeat * self.liveness):
                link.down_at = now  # counted as one reconnect attempt per liveness beats
                self._outage(link, now, "silent or gone (its connection closed)")
            return False
        if not link.silent(now, self.heartbeat, self.liveness):
            self._answered(link, now)
            return False
        self._outage(link, now, f"silent for {self.heartbeat * self.liveness:.0f} s")
        return True

    def _answered(self, link: BrokerLink, now: float) -> None:
        """Say so when a broker answers again after an outage."""
        back = link.answered_again(now)
        if back is not None:
            log.info("worker %s: sqm at %s answers again after %.0f s (%d reconnect(s))",
                     self.worker_id, link.endpoint, *back)

    def _outage(self, link: BrokerLink, now: float, what: str) -> None:
        """Count a reconnect attempt; log the first one, then at most once a minute."""
        report = link.outage.attempt(now)
        if report is None:
            log.debug("worker %s: no answer from sqm at %s, reconnect attempt %d",
                      self.worker_id, link.endpoint, link.outage.attempts)
        elif report == 0:
            log.warning("worker %s: sqm at %s %s, reconnecting (said again at most once a"
                        " minute)", self.worker_id, link.endpoint, what)
        else:
            log.warning("worker %s: sqm at %s still silent, %d reconnect(s) since the last"
                        " report", self.worker_id, link.endpoint, report)
