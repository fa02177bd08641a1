"""The asyncio runner: ``async def`` callbacks, N at once, work from several brokers.

One event loop thread owns every socket. Broker sockets are watched with
``add_reader`` on their ZeroMQ file descriptor (edge-triggered, so each
wake-up reads until nothing is left, and every send is followed by another
look). ``async def`` callbacks run as tasks on the loop; plain ones run in a
pool of ``concurrency`` threads, and what they send is handed back to the
loop thread in order.

Credit across brokers: each broker grants the worker all of its slots, so
together they may offer more than it can hold. A dispatch that arrives when
the worker already holds ``slots`` messages goes straight back (NACK); that
broker parks the slot until the worker sends CREDIT, which it does as soon
as it has room again.

Reclaim: when sqm asks (through the heartbeat thread, :mod:`worker.beats`)
while messages wait a turn and no callback has started for
``RECLAIM_MIN_RUN_S`` (every one of the ``concurrency`` running ones runs
long), the waiting ones go back (GIVE_BACK) to their broker: sqm gives
them to another worker and parks this one's slots; they come back (CREDIT)
as callbacks end quickly, as with the plain runner.

DONE batching: a message that ends while others wait their turn holds its
DONE back; the held DONEs of a broker go as one multi-id DONE (to a broker
that batches) once nothing waits, half the slots have ended, or the first
ended ``DONE_HOLD_S`` ago; and before anything else sent to that broker
that must follow them (BYE goes first: the slots they free take no work).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from sqm.protocol import (
    CREDIT,
    DISPATCH,
    DONE,
    DONE_FAILED,
    GIVE_BACK,
    NACK,
    RECLAIM_AFTER_S,
    RECLAIM_MIN_RUN_S,
    SIGNATURE,
    SUBMIT_FRAMES,
    envelope_id,
    is_multi_dispatch,
    split_dispatch,
)

from .execute import Originator, is_async_callback
from .links import BrokerLink, done_messages, recv_broker
from .session import Session

log = logging.getLogger("sqm.worker")

DONE_HOLD_S = 0.005  # as in the plain runner


class AsyncRunner:
    """Serves a worker on an event loop in the calling thread until it is told to stop."""

    def __init__(self) -> None:
        self.links: list[BrokerLink] = []
        self.held = 0  # dispatches taken and not yet DONE (running or waiting a turn)
        self.running = 0  # callbacks running now
        self._async: dict[Callable[..., Any], bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: deque[tuple[BrokerLink, list[bytes]]] = deque()  # taken, not yet started
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # DONEs held back, per link: (ok ids, failed ids, when the first ended).
        self._held: dict[BrokerLink, tuple[list[bytes], list[bytes], float]] = {}
        self._hold_max = 1
        self._last_start = 0.0  # when the latest callback started (monotonic)

    def run(self, session: Session) -> None:
        """Serve on a fresh event loop in this thread until the worker stops."""
        self.session = session
        self.execution = session.execution
        self._hold_max = max(1, session.slots // 2)
        self.links = [BrokerLink(ep, session.routing_id, session.curve,
                                 heartbeat=session.heartbeat, liveness=session.liveness)
                      for ep in session.endpoints]
        asyncio.run(self._main())

    def stop(self) -> None:
        """Wake the loop to begin leaving (from any thread)."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._begin_stop)
            except RuntimeError:  # the loop has just closed: nothing left to wake
                pass

    # ------------------------------------------------------------ lifecycle

    async def _main(self) -> None:
        s = self.session
        self._stopping = asyncio.Event()
        self._acked = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop_thread = threading.get_ident()
        self.execution.route(self._send_any_thread)  # callback threads may reply
        loop = self._loop = asyncio.get_running_loop()
        if s.followups is not None:
            s.followups.attach(s.ctx, self._send_link_any_thread, s.curve)
        chores = None
        try:
            for link in self.links:
                self._open(link)
            log.info("worker %s serving queue %s at %s (%d slot(s), %d at once)",
                     s.worker_id, s.queue, ", ".join(s.endpoints), s.slots, s.concurrency)
            if s.stop.is_set():
                self._begin_stop()
            chores = loop.create_task(self._chores())
            await self._stopping.wait()
            await self._leave()
        finally:
            self._send_all_done()
            self._loop = None
            if chores is not None:
                chores.cancel()
            self._waiting.clear()
            for task in list(self._tasks):
                task.cancel()  # only after an error: a clean leave waited for them
            for link in self.links:
                self._close(link, linger_ms=1000 if link.reachable() else 0)
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self.execution.route(None)  # back to sending straight to the socket
            if s.followups is not None:
                s.followups.detach()
            self._loop_thread = None

    def _begin_stop(self) -> None:
        """Stop taking work: BYE to every broker (before any further DONE)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for link in self.links:
            if link.sock is not None:
                link.send_bye()
                self._send_done(link)  # after BYE: the slots they free take no new work
                self._kick(link)
        self._give_back()  # we run nothing more than what has started
        if not self.held:
            self._idle.set()
        self._check_acked()

    async def _leave(self) -> None:
        """Wait for the brokers' acknowledgements, then for every message held."""
        s = self.session
        try:
            await asyncio.wait_for(self._acked.wait(), s.heartbeat * s.liveness)
        except asyncio.TimeoutError:
            pass  # a broker is gone: nothing more can come from it
        await self._idle.wait()

    def _check_acked(self) -> None:
        """Set ``_acked`` when no broker's answer to BYE is still worth waiting for."""
        if all(link.bye_acked or not link.bye_sent or not link.reachable()
               for link in self.links):
            self._acked.set()

    # ------------------------------------------------------------ sockets

    def _open(self, link: BrokerLink) -> None:
        assert self._loop is not None
        sock = link.open(self.session.ctx)
        self.session.hello(link)
        self._loop.add_reader(sock.FD, self._read_all, link)
        self._kick(link)

    def _close(self, link: BrokerLink, linger_ms: int = 0) -> None:
        if link.sock is not None:
            asyncio.get_running_loop().remove_reader(link.sock.FD)
            link.close(linger_ms)

    def _kick(self, link: BrokerLink) -> None:
        """Look for input after a send: the socket's fd may not signal it again."""
        asyncio.get_running_loop().call_soon(self._read_all, link)

    def _read_all(self, link: BrokerLink) -> None:
        """Read everything waiting on one broker socket."""
        sock = link.sock
        s = self.session
        while sock is not None and link.sock is sock:
            try:
                frames = recv_broker(sock)
            except zmq.ZMQError:  # EAGAIN: all read
                return
            link.last_heard = time.monotonic()
            if len(frames) == SUBMIT_FRAMES and frames[1] == DISPATCH and frames[0] == SIGNATURE:
                self._take(link, frames)
            elif is_multi_dispatch(frames):
                link.batch = True  # this broker batches: it reads multi-id DONEs
                for one in split_dispatch(frames):
                    self._take(link, one)
            else:
                if link in self._held:  # anything else goes after the DONEs before it
                    self._send_done(link)
                s.on_control(link, frames)
                if link.bye_acked:
                    self._check_acked()

    async def _chores(self) -> None:
        """Every half heartbeat: reconnects, broker liveness, idle mailboxes."""
        s = self.session
        while True:
            await asyncio.sleep(s.heartbeat / 2)
            now = time.monotonic()
            stopping = self._stopping.is_set()
            for link in self.links:
                if link.sock is None:
                    continue
                if link in self._held:  # before any HELLO or reconnect below
                    self._send_done(link)
                if link.reconnected() and not stopping:
                    s.hello(link)  # that broker came back (restart): register again now
                    self._kick(link)
                elif not stopping and s.reconnect_due(link, now):
                    self._close(link)
                    self._open(link)
                else:
                    self._read_all(link)  # a safety net; normally a no-op
            if stopping:
                self._check_acked()  # a broker that went away will not answer BYE
            s.announce(self.links)  # callbacks() changed: tell every broker
            s.mailboxes.expire(now)

    def _send_any_thread(self, orig: Originator, frames: list[bytes]) -> None:
        """Send to a mailbox from any thread: the loop's thread owns every socket.

        Callback threads hand the send to the loop, which runs them in call
        order, so replies stay in order.
        """
        if threading.get_ident() == self._loop_thread:
            self.execution.deliver(orig, frames)
            return
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self.execution.deliver, orig, frames)
        except RuntimeError:
            log.warning("worker %s: reply for %s after the worker stopped",
                        self.session.worker_id, orig)

    def _send_link_any_thread(self, frames: list[bytes], via: Any) -> bool:
        """Follow-up SUBMIT or FORWARD onto a broker link, from any thread (the loop sends)."""
        link = via if isinstance(via, BrokerLink) else next(
            (lk for lk in self.links if lk.sock is not None), None)
        if link is None:
            return False
        if threading.get_ident() == self._loop_thread:
            sent = link.send(frames)
            self._kick(link)
            return sent
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(self._send_on, link, frames)
        except RuntimeError:  # the loop has just closed
            return False
        return True

    def _send_on(self, link: BrokerLink, frames: list[bytes]) -> None:
        if not link.send(frames):
            log.warning("worker %s: follow-up message to %s dropped (connection not ready)",
                        self.session.worker_id, link.endpoint)
        self._kick(link)

    # ------------------------------------------------------------ messages

    def _take(self, link: BrokerLink, frames: list[bytes]) -> None:
        """Accept a dispatch, or hand it straight back when full (or leaving)."""
        if self._stopping.is_set() and link.gives_back:  # sent before sqm read our BYE
            if link.send([SIGNATURE, GIVE_BACK, envelope_id(frames[2])]):
                self._kick(link)
                return
        if self.held >= self.session.slots:
            msg_id = envelope_id(frames[2])
            if msg_id and link.send([SIGNATURE, NACK, msg_id]):
                link.parked += 1
                return
            log.warning("worker %s: cannot hand back %r; holding it",
                        self.session.worker_id, msg_id)
        self.held += 1
        link.holding += 1
        self._idle.clear()
        self._waiting.append((link, frames))
        self._start_next()

    def _start_next(self) -> None:
        """Start waiting messages, oldest first, while fewer than ``concurrency`` run."""
        limit = self.session.concurrency
        loop = asyncio.get_running_loop()
        while self._waiting and self.running < limit:
            link, frames = self._waiting.popleft()
            self._started()
            task = loop.create_task(self._serve(link, frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def reclaim(self) -> None:
        """sqm asks (from the heartbeat thread): give back what waits a turn."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._reclaim)
            except RuntimeError:  # the loop has just closed
                pass

    def _reclaim(self) -> None:
        """Messages wait a turn: give them back if no callback started for a while."""
        if self._waiting and time.monotonic() - self._last_start >= RECLAIM_MIN_RUN_S:
            self._give_back()

    def _give_back(self) -> None:
        """Hand the messages waiting a turn back to their brokers (those that read
        GIVE_BACK): sqm gives them to another worker and parks our slots."""
        back: dict[BrokerLink, list[bytes]] = {}
        for link, frames in self._waiting:
            if link.gives_back and link.sock is not None:  # not to an older sqm
                back.setdefault(link, []).append(envelope_id(frames[2]))
        gone: set[BrokerLink] = set()
        for link, ids in back.items():
            if link in self._held:  # their slots are free, not parked
                self._send_done(link)
            if link.send([SIGNATURE, GIVE_BACK, *ids]):
                gone.add(link)
                self.held -= len(ids)
                link.holding -= len(ids)
                if not link.bye_sent:  # as much as sqm may have parked (it frees no more)
                    link.withheld = self.session.slots
                    link.credit_step = 1
                self._kick(link)
                log.debug("worker: gave back %d message(s) waiting for a turn", len(ids))
        if gone:
            self._waiting = deque(item for item in self._waiting if item[0] not in gone)

    async def _serve(self, link: BrokerLink, frames: list[bytes]) -> None:
        """Run one message; report DONE to the broker it came from."""
        msg_id = b""
        ok: bool | None = False
        started = time.monotonic()
        try:
            msg_id, ok = await self._call(link, frames)
        finally:
            self._finished()
            self.held -= 1
            link.holding -= 1
            self._credit()
            # What give-backs parked comes back: all once nothing is left here, else
            # 1, 2, 4, ... slots per quick callback; and one to a broker that has
            # nothing here (its messages all went back), whose DONE would free none
            # while another broker's keep this worker busy.
            quick = time.monotonic() - started < RECLAIM_AFTER_S
            for lk in self.links:
                if not lk.withheld or lk.sock is None:
                    continue
                if not self.held:
                    n = lk.withheld
                elif quick:
                    n = min(lk.credit_step, lk.withheld)
                elif not lk.holding:
                    n = 1
                else:
                    continue
                if lk.send([SIGNATURE, CREDIT, b"%d" % n]):
                    lk.withheld -= n
                    if quick:
                        lk.credit_step = n * 2
                    self._kick(lk)
            if msg_id:
                self.session.workload.tasks_done += 1
                if link.sock is not None and ok is not None:  # None: forwarded, sqm knows
                    self._done(link, msg_id, ok)
            if not self._waiting and self._held:
                self._send_all_done()  # nothing waits a turn: report every end now
            if not self.held:
                self._idle.set()
            self._start_next()

    async def _call(self, link: BrokerLink, frames: list[bytes]) -> tuple[bytes, bool | None]:
        """Run one dispatch's callback (awaited, or in a thread). Returns (id, succeeded);
        succeeded is None when the callback handed the message on (forward)."""
        ex = self.execution
        call = ex.prepare(frames)
        if len(call) == 2:
            return call
        orig, fn, payload = call
        orig.via = link
        try:
            if self._is_async(fn):
                value = await fn(ex.worker, orig, payload)
            else:
                value = await asyncio.get_running_loop().run_in_executor(
                    self._pool(), fn, ex.worker, orig, payload)
                if inspect.isawaitable(value):  # a plain wrapper around a coroutine
                    value = await value
        except Exception as exc:
            if orig.forwarded:
                ex.raised_after_forward(orig, exc)
                return orig.id, None
            return orig.id, ex.raised(orig, exc)  # None: retried (RETRY told sqm)
        return orig.id, ex.settle(orig, value)

    def _done(self, link: BrokerLink, msg_id: bytes, ok: bool) -> None:
        """Report ``msg_id`` ended: at once, or held back while others wait their turn."""
        held = self._held.get(link)
        hold = self._hold_max > 1 and bool(self._waiting) and not self._stopping.is_set()
        if held is None:
            if not hold:  # the common case when nothing queues up: as before batching
                link.send([SIGNATURE, DONE if ok else DONE_FAILED, msg_id])
                self._kick(link)
                return
            held = self._held[link] = ([], [], time.monotonic())
        (held[0] if ok else held[1]).append(msg_id)
        if (not hold or len(held[0]) + len(held[1]) >= self._hold_max
                or time.monotonic() - held[2] >= DONE_HOLD_S):
            self._send_done(link)  # credit flows back before the pipeline drains

    def _send_done(self, link: BrokerLink) -> None:
        """Send ``link``'s held DONEs: one R and/or one F (one per id to an older sqm)."""
        held = self._held.pop(link, None)
        if held is None:
            return
        ok, failed, _since = held
        if link.sock is None:
            return
        for frames in done_messages(link, ok, failed):
            link.send(frames)
        self._kick(link)

    def _send_all_done(self) -> None:
        for link in list(self._held):
            self._send_done(link)

    def _credit(self) -> None:
        """There is room again: give every broker back the slots it parked."""
        for link in self.links:
            if link.parked and link.sock is not None and not link.bye_sent:
                if link.send([SIGNATURE, CREDIT, b"%d" % link.parked]):
                    link.parked = 0
                    self._kick(link)

    def _started(self) -> None:
        self._last_start = time.monotonic()
        self.running += 1
        if self.running == 1:
            self.session.workload.begin()

    def _finished(self) -> None:
        self.running -= 1
        if not self.running:
            self.session.workload.end()

    def _is_async(self, fn: Callable[..., Any]) -> bool:
        """Whether to await ``fn`` on the loop (else: a thread), asked once per callback."""
        try:
            known = self._async.get(fn)
            if known is None:
                known = self._async[fn] = is_async_callback(fn)
        except TypeError:  # an unhashable callable object
            known = is_async_callback(fn)
        return known

    def _pool(self) -> ThreadPoolExecutor:
        """Threads for plain callbacks, made on first use."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.session.concurrency,
                                                thread_name_prefix="sqm-callback")
        return self._executor
