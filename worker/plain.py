"""The plain runner: one broker, one callback at a time, blocking in ``recv``.

The fastest path: no event loop, no poll of several sockets, the GIL
released while it waits. Used unless the worker needs the asyncio runner
(several brokers, ``concurrency`` > 1, ``async def`` callbacks).

With several slots (``prefetch``), the messages it holds but has not
started wait in its inbox or its socket. When a callback runs long, sqm
asks the process's heartbeat thread (:mod:`worker.beats`) to have them
given back; the runner holds a lock at every moment but while a callback
runs, so that thread can take it then (:meth:`PlainRunner.reclaim`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any

import zmq

from sqm import protocol
from sqm.protocol import (
    COMPACT_SUBMIT,
    CREDIT,
    DISPATCH,
    GIVE_BACK,
    RECLAIM_AFTER_S,
    RECLAIM_MIN_RUN_S,
    SIGNATURE,
    envelope_id,
    is_multi_dispatch,
    split_dispatch,
)
from sqm.zmqfast import NOBLOCK, RCVTIMEO, readable, recv_message, send_frames
from sqm.zmqfast import set_option as _set_option

from .execute import Workload
from .links import BrokerLink, done_messages, recv_broker
from .session import Session

log = logging.getLogger("sqm.worker")

#: Runs one dispatch (its classic frames, or one compact frame): (message id, succeeded).
Execute = Callable[[Any], tuple[bytes, "bool | None"]]

# How long recv blocks for the next message before the runner counts itself
# idle. Idle, it waits in one poll for a message, a stop (:meth:`PlainRunner.stop`
# wakes it) or its chores, so it wakes at most every half heartbeat: hundreds
# of idle workers in one process that each woke every WAKE_S kept so many
# threads queued for the GIL that heartbeat threads waited seconds for it and
# sqm dropped their live workers (W4: 1,000 workers, WorkerLost).
WAKE_S = 0.1
# A DONE whose next message is already here waits to go with the next ones'
# (one multi-id DONE): at most until nothing more is there to read, half the
# slots have ended, or the first of them ended this long ago.
DONE_HOLD_S = 0.005


class PlainRunner:
    """Serves one broker with synchronous callbacks, one message after another."""

    def __init__(self) -> None:
        self._session: Session | None = None
        self._stop = threading.Event()
        self._work = Workload()
        self._execute: Execute = (
            lambda frames: (b"", False))
        self._link: BrokerLink | None = None
        # Frames read but not handled yet, in arrival order, handled before the
        # socket is read again: the rest of a multi-message DISPATCH (one
        # 4-frame DISPATCH each), and what the pump (a callback waiting for a
        # follow-up reply) or a give-back (worker.beats) read while a callback ran.
        self._inbox: deque[list[bytes]] = deque()
        # Held by the runner at every moment but while a callback runs: the
        # heartbeat thread takes it then to read the link and give back what
        # waits (reclaim). Reentrant: the pump and follow-ups take it from
        # inside the callback, or from the runner itself (then it is held already).
        self._lock = threading.RLock()
        self._slots = 1
        # The running callback runs long: we sent GIVE_BACK (sqm parked our slots).
        self._gave_back = False
        # Slots sqm may still hold parked since a give-back (at most; it frees no
        # more than it parked): they come back by CREDIT 1, 2, 4, ... after each
        # quick callback, so a worker whose callbacks run long takes one message
        # at a time instead of taking and giving back a full prefetch each time.
        self._withheld = 0
        self._credit_step = 1
        # DONEs held back while more work is there to read (sent as one multi-id
        # DONE each); never with one slot: a prefetch-1 worker reports at once.
        self._ok: list[bytes] = []
        self._failed: list[bytes] = []
        self._held = 0
        self._held_since = 0.0
        self._hold_max = 1  # held DONEs that go out at once: half the slots
        # stop() writes a byte here to wake an idle run() (any thread, a signal handler).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def stop(self) -> None:
        """Wake an idle :meth:`run` to notice the stop flag (a busy one sees it within ``WAKE_S``)."""
        try:
            self._wake_w.send(b"x")
        except OSError:  # already woken (buffer full) or the run has ended
            pass

    def _idle_wait(self, sock: zmq.Socket, seconds: float) -> bool:
        """Wait up to ``seconds`` for a message on ``sock`` or a stop(); False on timeout."""
        ready = zmq.zmq_poll([(sock, zmq.POLLIN), (self._wake_r, zmq.POLLIN)],
                             max(0, int(seconds * 1000) + 1))
        if not ready:
            return False
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:  # BlockingIOError: drained
            pass
        return True

    def run(self, session: Session) -> None:
        with self._lock:
            self._serve(session)

    def reclaim(self) -> None:
        """sqm asks (through the heartbeat thread): give back what waits behind the
        running callback, if one runs and has run a while; else it moves: keep all."""
        started = self._work.busy[1]
        if self._slots > 1 and started and monotonic() - started >= RECLAIM_MIN_RUN_S:
            self.give_back(started)

    def give_back(self, started: float) -> None:
        """Give back the messages not started while the callback from ``started`` runs.

        Reads what arrived meanwhile, and sends GIVE_BACK with the ids of every
        dispatched message in the inbox (none the first time is fine: sqm then
        parks the free slots, so nothing new comes); the runner sends CREDIT
        when the callback ends. Does nothing between callbacks.
        """
        lock = self._lock
        if not lock.acquire(blocking=False):
            return  # the runner holds it: no callback runs
        try:
            link = self._link
            sock = link.sock if link is not None else None
            if (sock is None or link is None or not link.gives_back
                    or self._work.busy[1] != started):
                return
            inbox = self._inbox
            while True:
                try:
                    inbox.append(recv_broker(sock, NOBLOCK))
                except zmq.Again:
                    break
                link.last_heard = monotonic()
            ids = [envelope_id(frames[i]) for frames in inbox if _dispatch(frames)
                   for i in range(2, len(frames) - 1, 2)]
            if not ids and self._gave_back:
                return  # parked already, and nothing new came
            if self._held:  # the DONEs before it: their slots are free, not parked
                self._send_done(link)
            try:
                send_frames(sock, [SIGNATURE, GIVE_BACK, *ids])
            except zmq.ZMQError:
                return
            if ids:
                keep = [frames for frames in inbox if not _dispatch(frames)]
                inbox.clear()
                inbox.extend(keep)
            self._gave_back = True
            self._withheld = self._slots - 1  # all but the running one's
            self._credit_step = 1
            log.debug("worker: gave back %d message(s) waiting behind a long callback", len(ids))
        finally:
            lock.release()

    def _credit_back(self, link: BrokerLink, n: int) -> None:
        """CREDIT ``n`` of the slots withheld since a give-back (the next step doubles)."""
        self._withheld -= n
        self._credit_step = n * 2
        sock = link.sock
        if sock is not None:
            try:
                send_frames(sock, [SIGNATURE, CREDIT, b"%d" % n])
            except zmq.ZMQError:
                pass

    def _serve(self, session: Session) -> None:
        self._session = s = session
        self._stop = stop = s.stop
        self._work = s.workload
        self._execute = s.execution.run  # looked up once, not per message
        run_compact = s.execution.run_compact
        self._hold_max = max(1, s.slots // 2)
        self._slots = s.slots
        link = self._link = BrokerLink(s.endpoints[0], s.routing_id, s.curve,
                                       heartbeat=s.heartbeat, liveness=s.liveness)
        sock = self._open(link)
        if s.followups is not None:
            s.followups.attach(s.ctx, self._send_link, s.curve, self._pump)
        s.execution.pump = self._pump  # originator.cancelled reads sqm's CANCEL in the callback
        log.info("worker %s serving queue %s at %s", s.worker_id, s.queue, link.endpoint)
        # Chores (liveness, reconnects, idle mailboxes) run at most every
        # `chore_s`, also while messages stream in.
        chore_s = s.heartbeat / 2
        next_chores = 0.0
        idle = False  # nothing came for WAKE_S: wait in poll until something does
        streaming = True  # the last look for more work with DONEs held found some
        inbox = self._inbox
        try:
            while not stop.is_set():
                frames = None
                if inbox:
                    frames = inbox.popleft()
                elif idle:
                    idle = not self._idle_wait(sock, next_chores - monotonic())
                else:
                    if self._held:  # DONEs held back: more work there, or send them now
                        # A failing NOBLOCK recv costs ~7 µs (pyzmq raises zmq.Again),
                        # a look at the socket's events ~2.5: read blindly while reads
                        # find work (under load), look first once one found none.
                        if streaming:
                            try:
                                frames = recv_message(sock, NOBLOCK)
                            except zmq.Again:
                                streaming = False
                                self._send_done(link)
                        elif readable(sock):
                            streaming = True
                        else:
                            self._send_done(link)
                    if frames is None:
                        try:
                            frames = recv_message(sock, 0)
                        except zmq.Again:  # receive timeout: idle now
                            idle = True
                            if self._withheld:  # nothing waits: every slot back
                                self._credit_back(link, self._withheld)
                now = monotonic()
                if frames is not None:
                    link.last_heard = now
                    if frames[0].startswith(COMPACT_SUBMIT):
                        # A compact DISPATCH: recv_message reads each of its frames
                        # (one message each) on its own; run_compact reads it in place.
                        self._handle(link, frames[0], run_compact)
                    elif (len(frames) == protocol.SUBMIT_FRAMES and frames[1] == DISPATCH
                            and frames[0] == SIGNATURE):
                        self._handle(link, frames, self._execute)
                    elif is_multi_dispatch(frames):
                        link.batch = True  # this broker batches: it reads multi-id DONEs
                        inbox.extendleft(reversed(split_dispatch(frames)))
                    else:
                        if self._held:  # anything else goes after the DONEs before it
                            self._send_done(link)
                        s.on_control(link, frames)
                if now < next_chores:
                    continue
                next_chores = now + chore_s
                if self._held:  # before any HELLO or reconnect below
                    self._send_done(link)
                s.announce([link])  # callbacks() changed: tell sqm (CAN_DO/CANT_DO)
                if link.reconnected():
                    s.hello(link)  # sqm came back (restart): register again now
                if s.reconnect_due(link, now):
                    link.close(0)
                    sock = self._open(link)
                s.mailboxes.expire(now)
            self._leave(link)
        finally:
            if self._held:
                self._send_done(link)
            if s.followups is not None:
                s.followups.detach()
            link.close(linger_ms=1000 if link.reachable() else 0)
            self._link = None
            self._wake_r.close()
            self._wake_w.close()

    def _send_link(self, frames: list[bytes], via: object) -> bool:
        """Follow-up SUBMIT or FORWARD on the broker link (callbacks run in this thread)."""
        with self._lock:
            link = self._link
            return link is not None and link.send(frames)

    def _pump(self) -> None:
        """While a callback waits on a follow-up: read the link without blocking.

        sqm's answers about follow-ups go to them; a dispatch waits in the
        inbox for the callback to return; anything else is handled as usual.
        """
        with self._lock:
            self._pump_locked()

    def _pump_locked(self) -> None:
        link = self._link
        s = self._session
        if link is None or link.sock is None or s is None:
            return
        inbox = self._inbox
        # What a give-back read meanwhile (worker.beats): sqm's answers about
        # follow-ups, a CANCEL... are for this callback too, before anything newer.
        others = [frames for frames in inbox if not _dispatch(frames)] if inbox else None
        if others:
            waiting = [frames for frames in inbox if _dispatch(frames)]
            inbox.clear()
            inbox.extend(waiting)
            for frames in others:
                if self._held:
                    self._send_done(link)
                s.on_control(link, frames)
        while True:
            try:
                frames = recv_broker(link.sock, NOBLOCK)
            except zmq.Again:
                return
            link.last_heard = monotonic()
            if len(frames) == protocol.SUBMIT_FRAMES and frames[1] == DISPATCH:
                self._inbox.append(frames)
            elif is_multi_dispatch(frames):
                link.batch = True
                self._inbox.append(frames)
            else:
                if self._held:
                    self._send_done(link)
                s.on_control(link, frames)

    def _open(self, link: BrokerLink) -> zmq.Socket:
        s = self._session
        assert s is not None
        sock = link.open(s.ctx)
        self._gave_back = False  # a new registration: nothing is parked
        self._withheld = 0
        _set_option(sock, RCVTIMEO, max(1, int(min(s.heartbeat / 2, WAKE_S) * 1000)))
        s.hello(link)
        return sock

    def _handle_any(self, link: BrokerLink, frames: list[bytes]) -> None:
        """Handle what the inbox holds: a dispatch of one message or several, or anything else."""
        if len(frames) == protocol.SUBMIT_FRAMES and frames[1] == DISPATCH:
            self._handle(link, frames, self._execute)
        elif is_multi_dispatch(frames):
            link.batch = True
            for one in split_dispatch(frames):
                self._handle(link, one, self._execute)
        else:
            s = self._session
            assert s is not None
            s.on_control(link, frames)

    def _send_done(self, link: BrokerLink) -> None:
        """Send the DONEs held back: one R and/or one F (one per id to an older sqm)."""
        ok, failed = self._ok, self._failed
        self._held = 0
        sock = link.sock
        try:
            if sock is not None:
                for frames in done_messages(link, ok, failed):
                    send_frames(sock, frames)
        except zmq.ZMQError:
            pass
        ok.clear()
        failed.clear()

    def _handle(self, link: BrokerLink, dispatch: Any, execute: Execute) -> None:
        """Run one dispatch (``execute(dispatch)``: classic frames, or a compact
        frame), then tell the broker it is done (now, or with the next ones)."""
        work = self._work
        started = monotonic()
        before = work.busy[0]
        work.busy = (before, started)
        msg_id = b""
        ok: bool | None = False
        lock = self._lock
        lock.release()  # the heartbeat thread may give back what waits while this runs
        try:
            msg_id, ok = execute(dispatch)
        finally:
            lock.acquire()
            ended = monotonic()
            work.busy = (before + ended - started, 0.0)
            if self._gave_back:  # it ran long: its DONE frees one slot, the rest stay parked
                self._gave_back = False
            elif self._withheld and ended - started < RECLAIM_AFTER_S:
                self._credit_back(link, min(self._credit_step, self._withheld))  # a quick one
            if msg_id:
                work.tasks_done += 1
                if self._stop.is_set():
                    # Say BYE before DONE, or sqm would refill the slot DONE frees
                    # (the DONEs held back go after it too).
                    link.send_bye()
                    if ok is not None:
                        (self._ok if ok else self._failed).append(msg_id)
                        self._held += 1
                    self._send_done(link)
                elif ok is None:  # forwarded: FORWARD told sqm, no DONE
                    pass
                elif self._hold_max == 1:  # one slot: nothing to batch, DONE at once
                    sock = link.sock
                    if sock is not None:
                        try:
                            send_frames(sock, done_messages(link, [msg_id] if ok else [],
                                                            [] if ok else [msg_id])[0])
                        except zmq.ZMQError:
                            pass
                else:
                    # Held back: run() sends it when nothing more is there to read.
                    (self._ok if ok else self._failed).append(msg_id)
                    held = self._held = self._held + 1
                    if held == 1:
                        self._held_since = ended
                    elif held >= self._hold_max or ended - self._held_since >= DONE_HOLD_S:
                        self._send_done(link)  # credit flows back before the pipeline drains

    def _leave(self, link: BrokerLink) -> None:
        """Tell sqm we go. What it handed us and we have not started goes back to it
        (GIVE_BACK) for another worker; an older sqm's we run before we go."""
        s = self._session
        assert s is not None
        gives_back = link.gives_back
        if not gives_back:
            while self._inbox:  # read before: run them
                self._handle_any(link, self._inbox.popleft())
        bye = link.send_bye()
        if self._held:  # after BYE: the slots they free take no new work
            self._send_done(link)
        if gives_back:
            self._return_unstarted(link)
        if not bye or not link.reachable():
            return  # nobody to wait for: no broker connected
        sock = link.sock
        assert sock is not None
        deadline = monotonic() + s.heartbeat * s.liveness
        while not link.bye_acked:
            remaining = deadline - monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                return  # sqm is gone: nothing more can arrive
            frames = recv_broker(sock, 0)
            if gives_back and _dispatch(frames):  # sent before sqm read our BYE
                self._inbox.append(frames)
                self._return_unstarted(link)
            elif _dispatch(frames):
                self._handle_any(link, frames)
                while self._inbox:  # the rest of it, or read while that callback ran
                    self._handle_any(link, self._inbox.popleft())
            else:
                s.on_control(link, frames)
            if self._held:  # BYE is sent: nothing to hold them for
                self._send_done(link)

    def _return_unstarted(self, link: BrokerLink) -> None:
        """Leaving: give back every dispatched message in the inbox; handle the rest."""
        s = self._session
        assert s is not None
        ids: list[bytes] = []
        while self._inbox:
            frames = self._inbox.popleft()
            if _dispatch(frames):
                ids.extend(envelope_id(frames[i]) for i in range(2, len(frames) - 1, 2))
            else:
                s.on_control(link, frames)
        if ids and link.sock is not None:
            try:
                send_frames(link.sock, [SIGNATURE, GIVE_BACK, *ids])
            except zmq.ZMQError:
                pass

def _dispatch(frames: list[bytes]) -> bool:
    """A DISPATCH of one message or several."""
    return (len(frames) >= protocol.SUBMIT_FRAMES and frames[1] == DISPATCH
            and frames[0] == SIGNATURE)
