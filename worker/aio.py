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
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from sqm.protocol import (
    ACK,
    CREDIT,
    DISPATCH,
    DONE,
    DONE_FAILED,
    NACK,
    SIGNATURE,
    SUBMIT_FRAMES,
    decode_envelope,
    envelope_id,
)
from sqm.zmqfast import recv_frames

from .core import Originator, is_async_callback
from .links import BrokerLink

if TYPE_CHECKING:
    from .core import Worker

log = logging.getLogger("sqm.worker")


class AsyncRunner:
    """Runs one :class:`~worker.Worker` until it is told to stop."""

    def __init__(self, worker: Worker, ctx: zmq.Context) -> None:
        self.worker = worker
        self.ctx = ctx
        self.links = [BrokerLink(ep, worker._rid) for ep in worker.endpoints]
        self.held = 0  # dispatches taken and not yet DONE (running or waiting a turn)
        self.running = 0  # callbacks running now
        self._async: dict[Callable[..., Any], bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: deque[tuple[BrokerLink, list[bytes]]] = deque()  # taken, not yet started
        self._executor: ThreadPoolExecutor | None = None

    def run(self) -> None:
        """Serve on a fresh event loop in this thread until the worker stops."""
        asyncio.run(self._main())

    # ------------------------------------------------------------ lifecycle

    async def _main(self) -> None:
        w = self.worker
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._acked = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        w._loop = loop
        w._loop_thread = threading.get_ident()
        w._to_mailbox = w._to_mailbox_any_thread  # callback threads may reply
        w._wake = lambda: loop.call_soon_threadsafe(self._begin_stop)
        chores = None
        try:
            for link in self.links:
                self._open(link)
            log.info("worker %s serving queue %s at %s (%d slot(s), %d at once)",
                     w.id, w.queue, ", ".join(w.endpoints), w.slots, w.concurrency)
            if w._stop.is_set():
                self._begin_stop()
            chores = loop.create_task(self._chores())
            await self._stopping.wait()
            await self._leave()
        finally:
            w._wake = None
            if chores is not None:
                chores.cancel()
            self._waiting.clear()
            for task in list(self._tasks):
                task.cancel()  # only after an error: a clean leave waited for them
            for link in self.links:
                self._close(link, linger_ms=1000)
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            del w._to_mailbox  # back to the plain method
            w._loop = None
            w._loop_thread = None

    def _begin_stop(self) -> None:
        """Stop taking work: BYE to every broker (before any further DONE)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for link in self.links:
            if link.sock is not None:
                link.send_bye()
                self._kick(link)
        self._check_acked()

    async def _leave(self) -> None:
        """Wait for the brokers' acknowledgements, then for every message held."""
        w = self.worker
        try:
            await asyncio.wait_for(self._acked.wait(), w.heartbeat * w.liveness)
        except asyncio.TimeoutError:
            pass  # a broker is gone: nothing more can come from it
        await self._idle.wait()

    def _check_acked(self) -> None:
        if all(link.bye_acked or not link.bye_sent for link in self.links):
            self._acked.set()

    # ------------------------------------------------------------ sockets

    def _open(self, link: BrokerLink) -> None:
        sock = link.open(self.ctx)
        self.worker._hello(link)
        self._loop.add_reader(sock.FD, self._drain, link)
        self._kick(link)

    def _close(self, link: BrokerLink, linger_ms: int = 0) -> None:
        if link.sock is not None:
            self._loop.remove_reader(link.sock.FD)
            link.close(linger_ms)

    def _kick(self, link: BrokerLink) -> None:
        """Look for input after a send: the socket's fd may not signal it again."""
        self._loop.call_soon(self._drain, link)

    def _drain(self, link: BrokerLink) -> None:
        """Read everything waiting on one broker socket."""
        sock = link.sock
        w = self.worker
        while sock is not None and link.sock is sock:
            try:
                frames = recv_frames(sock)
            except zmq.ZMQError:  # EAGAIN: all read
                return
            link.last_heard = time.monotonic()
            if len(frames) == SUBMIT_FRAMES and frames[1] == DISPATCH and frames[0] == SIGNATURE:
                self._take(link, frames)
            else:
                w._on_control(link, frames)
                if link.bye_acked:
                    self._check_acked()

    async def _chores(self) -> None:
        """Every half heartbeat: reconnects, broker liveness, idle mailboxes."""
        w = self.worker
        while True:
            await asyncio.sleep(w.heartbeat / 2)
            now = time.monotonic()
            stopping = self._stopping.is_set()
            for link in self.links:
                if link.sock is None:
                    continue
                if link.reconnected() and not stopping:
                    w._hello(link)  # that broker came back (restart): register again now
                    self._kick(link)
                elif not stopping and link.silent(now, w.heartbeat, w.liveness):
                    log.info("worker %s: sqm silent, reconnecting to %s", w.id, link.endpoint)
                    self._close(link)
                    self._open(link)
                else:
                    self._drain(link)  # a safety net; normally a no-op
            w._pool.expire(now)

    # ------------------------------------------------------------ messages

    def _take(self, link: BrokerLink, frames: list[bytes]) -> None:
        """Accept a dispatch, or hand it straight back when full."""
        if self.held >= self.worker.slots:
            msg_id = envelope_id(frames[2])
            if msg_id and link.send([SIGNATURE, NACK, msg_id]):
                link.parked += 1
                return
            log.warning("worker %s: cannot hand back %r; holding it", self.worker.id, msg_id)
        self.held += 1
        self._idle.clear()
        self._waiting.append((link, frames))
        self._start_next()

    def _start_next(self) -> None:
        """Start waiting messages, oldest first, while fewer than ``concurrency`` run."""
        limit = self.worker.concurrency
        while self._waiting and self.running < limit:
            link, frames = self._waiting.popleft()
            self._started()
            task = self._loop.create_task(self._serve(link, frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: BrokerLink, frames: list[bytes]) -> None:
        """Run one message; report DONE to the broker it came from."""
        msg_id = b""
        ok = False
        try:
            msg_id, ok = await self._call(frames)
        finally:
            self._finished()
            self.held -= 1
            self._credit()
            if msg_id:
                self.worker.tasks_done += 1
                if link.sock is not None:
                    link.send([SIGNATURE, DONE if ok else DONE_FAILED, msg_id])
                    self._kick(link)
            if not self.held:
                self._idle.set()
            self._start_next()

    async def _call(self, frames: list[bytes]) -> tuple[bytes, bool]:
        """Decode, acknowledge, run the callback, reply. Returns (id, succeeded)."""
        w = self.worker
        try:
            env = decode_envelope(frames[2])
        except ValueError as exc:  # sqm validated it: this is a bug, not input
            log.error("worker %s: undecodable dispatch envelope: %s", w.id, exc)
            return b"", False
        method = env.method.decode("utf-8", "replace")
        orig = Originator(env.id, env.mailbox, env.serializer, env.oneway, method)
        if not orig.oneway:
            w._to_mailbox(orig, [SIGNATURE, ACK, env.id])
        fn = w._callbacks.get(method)
        if fn is None:
            w._fail(orig, "UnknownMethod", f"no callback for method {method!r} on this worker")
            return env.id, False
        try:
            payload = w._codec(env.serializer).loads(frames[3])
        except Exception as exc:
            w._fail(orig, "SerializerError", str(exc))
            return env.id, False
        try:
            if self._is_async(fn):
                value = await fn(w, orig, payload)
            else:
                value = await self._loop.run_in_executor(self._pool(), fn, w, orig, payload)
                if inspect.isawaitable(value):  # a plain wrapper around a coroutine
                    value = await value
        except Exception as exc:
            w._fail(orig, type(exc).__name__, str(exc), traceback.format_exc())
            return env.id, False
        return env.id, w._reply(orig, value)

    def _credit(self) -> None:
        """There is room again: give every broker back the slots it parked."""
        for link in self.links:
            if link.parked and link.sock is not None and not link.bye_sent:
                if link.send([SIGNATURE, CREDIT, b"%d" % link.parked]):
                    link.parked = 0
                    self._kick(link)

    def _started(self) -> None:
        self.running += 1
        if self.running == 1:
            w = self.worker
            w._busy = (w._busy[0], time.monotonic())

    def _finished(self) -> None:
        self.running -= 1
        if not self.running:
            w = self.worker
            total, since = w._busy
            w._busy = (total + time.monotonic() - since, 0.0)

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
            self._executor = ThreadPoolExecutor(self.worker.concurrency,
                                                thread_name_prefix="sqm-callback")
        return self._executor
