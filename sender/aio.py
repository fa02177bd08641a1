"""AsyncSender: the Sender's calls as asyncio coroutines, over the same core."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import zmq
import zmq.asyncio

from sqm import protocol
from sqm.errors import SQMError
from sqm.protocol import ACCEPTED, COMPACT_MAX, COMPACT_SUBMIT, MAX_SUBMIT_BATCH
from sqm.zmqfast import NOBLOCK, recv_frames, send_frames, send_raw

from ._batch import DONE, EMIT, NEED, Batch
from ._correlator import NO_TIMING, Outcome, timing
from ._hooks import OnComplete, OnFail, OnStart, OnStatus, run_calls
from ._links import Link, learn_features, monitor_event
from .base import SenderBase

log = logging.getLogger("sender")

_ANY = object()
#: How often, at most, a busy AsyncSender reads its connections to sqm (s).
BROKER_CHECK_S = 0.02


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncSender(SenderBase):
    """Like :class:`sender.Sender`, for asyncio. Many coroutines may share one.

    Replies are read by background tasks on the event loop the sender is
    first used on, so concurrent ``rpc`` calls each get their own result,
    and callbacks given to :meth:`submit` run there as replies arrive,
    whether or not anything awaits. Use it from one event loop only.
    """

    def __init__(
        self,
        queue: str | None = None,
        *,
        endpoint: str | list[str] | tuple[str, ...] | None = None,
        config: str | dict[str, Any] | None = None,
        serializer: str = "cbor",
        timeout: float | None = 5.0,
        allow_pickle: bool = False,
        max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE,
        heartbeat: float | None = None,
        context: zmq.Context | None = None,
        secret_key: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Future[Any]] = set()
        self._tick: asyncio.TimerHandle | None = None
        self._waiters: dict[Any, list[asyncio.Future[None]]] = {}
        self._link_wake = self._wake
        super().__init__(queue, endpoint=endpoint, config=config, serializer=serializer,
                         timeout=timeout, allow_pickle=allow_pickle,
                         max_message_size=max_message_size, heartbeat=heartbeat,
                         context=context, secret_key=secret_key, server_key=server_key)

    def _kind(self) -> str:
        return "AsyncSender"

    def _context(self, context: zmq.Context | None) -> zmq.Context:
        if context is None:
            return zmq.asyncio.Context.instance()
        if isinstance(context, zmq.asyncio.Context):
            return context
        return zmq.asyncio.Context.shadow(context.underlying)  # asyncio sockets, same context

    # ------------------------------------------------------------ sockets and tasks

    def _open_link(self, link: Link) -> None:
        sock = self._dealer(link)
        link.sock = sock
        link.raw = zmq.Socket.shadow(sock.underlying)  # sync view: NOBLOCK send/recv
        if self._loop is not None:
            self._start_link(link)

    def _start_link(self, link: Link) -> None:
        loop = self._loop
        assert loop is not None
        link.tasks = [
            loop.create_task(self._read(link.sock, link.raw, True, BROKER_CHECK_S, link)),
            loop.create_task(self._watch(link, link.monitor)),
        ]

    @staticmethod
    def _close_link(link: Link, linger: int) -> None:
        sock, monitor, tasks = link.sock, link.monitor, link.tasks
        link.sock = link.raw = link.monitor = None
        link.tasks = []

        def shut(_: object = None) -> None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(0)
            sock.close(linger=linger)

        pending = [t for t in tasks if not t.done()]
        if not pending:
            shut()
            return
        # Close only once the readers are gone: their sockets' file
        # descriptors must leave the event loop before they can be reused.
        for t in pending:
            t.cancel()
        asyncio.gather(*pending, return_exceptions=True).add_done_callback(shut)

    def _start(self) -> None:
        self._check()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._readers = [self._loop.create_task(
                self._read(cast(zmq.asyncio.Socket, self._mailbox),
                           zmq.Socket.shadow(self._mailbox.underlying), False))]
            for link in self._links.links:
                self._start_link(link)

    async def _read(self, sock: zmq.asyncio.Socket, raw: zmq.Socket, from_broker: bool,
                    pause: float = 0.0, link: Link | None = None) -> None:
        """Wait until ``sock`` is readable, then read everything it holds without blocking.

        A broker's DEALER carries one ACCEPTED per message and rarely
        anything else: reading it at most every ``pause`` seconds costs one
        wake-up per interval under load, not one per message, and delays
        sqm's errors by at most that much.
        """
        core = self._core
        feed = core.feed
        wake = self._wake
        while True:
            await sock.poll()  # POLLIN
            while True:
                try:
                    frames = recv_frames(raw)
                except zmq.Again:
                    break
                mid = feed(frames, from_broker)
                if mid is not None:
                    wake(mid)
                elif (link is not None and not link.batches and len(frames) > 3
                      and frames[1] == ACCEPTED):
                    learn_features(link, frames[3])  # this broker takes batches
            if core.calls:
                run_calls(core, self._spawn)
            if pause:
                await asyncio.sleep(pause)

    async def _watch(self, link: Link, monitor: zmq.asyncio.Socket) -> None:
        """Apply a link's connect/disconnect events as they happen."""
        while link.monitor is monitor:
            frames = await monitor.recv_multipart()
            if link.monitor is not monitor:
                return
            self._links.event(link, monitor_event(frames), time.monotonic())
            self._after_links()

    def _after_links(self) -> None:
        """Run callbacks link events triggered; schedule the next due re-send."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        links = self._links
        if links.refused and self._waiters:
            self._wake_all()  # a wait may now end as BrokerUnreachable
        nxt = links.due(time.monotonic())
        core = self._core
        if core.calls:
            run_calls(core, self._spawn)
        if nxt != float("inf") and self._loop is not None:
            self._tick = self._loop.call_later(max(0.0, nxt - time.monotonic()),
                                               self._after_links)

    def _spawn(self, awaitable: Any) -> None:
        """Run what an ``async def`` callback returned as a task."""
        task = asyncio.ensure_future(awaitable)
        self._spawned.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Future[Any]) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._core.callback_errors += 1
            log.error("an async sender callback raised", exc_info=task.exception())

    def _wake_all(self) -> None:
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    def _wake(self, mid: str) -> None:
        for key in (mid, _ANY):
            futures = self._waiters.get(key)
            while futures:
                fut = futures.pop(0)
                if not fut.done():
                    fut.set_result(None)
                    return

    # ------------------------------------------------------------ calls

    async def submit(
        self,
        method: str,
        payload: Any = None,
        *,
        oneway: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        priority: str = "normal",
        ttl: float | None = None,
        delay: float | None = None,
        not_before: float | None = None,
        time_limit: float | None = None,
        ack: bool = False,
        on_start: OnStart | None = None,
        on_status: OnStatus | None = None,
        on_complete: OnComplete | None = None,
        on_fail: OnFail | None = None,
    ) -> str:
        """Queue ``method(payload)`` and return the message id (see Sender.submit).

        Callbacks run on the event loop as the worker's messages arrive;
        an ``async def`` callback is run as a task.
        """
        hooks = None
        if on_start is not None or on_status is not None or on_complete is not None \
                or on_fail is not None:  # checked here first: no call on the hot path
            hooks = self._hooks(oneway, on_start, on_status, on_complete, on_fail)
            ack = ack or on_start is not None  # on_start wants the start at once
        if delay is None and not_before is None and time_limit is None and not ack:
            return await self._submit(method, payload, oneway, timeout, retries, priority, ttl, hooks)
        return await self._submit(method, payload, oneway, timeout, retries, priority, ttl, hooks,
                                  timing(delay, not_before, time_limit), ack)

    async def _submit(self, method: str, payload: Any, oneway: bool, timeout: float | None,
                      retries: int, priority: str, ttl: float | None, hooks: Any,
                      extra: tuple[float, float] = NO_TIMING, ack: bool = False) -> str:
        self._start()
        core = self._core
        mid, frames = core.encode_submit(
            method, payload, oneway=oneway, timeout=timeout, retries=retries,
            priority=priority, ttl=ttl, not_before=extra[0], time_limit=extra[1], ack=ack,
        )
        if hooks is not None:
            core.watch(mid, hooks)
        link = self._one or self._links.pick()  # inline, not a base method: the hot path
        if link.batches and not oneway and len(core.outstanding) > 1:
            # Batched under load (others outstanding): everything submitted in
            # this loop iteration leaves as one SUBMIT when the loop comes round.
            # A lone message (sequential rpc) goes at once: that round costs latency.
            queued = link.queued
            queued.append((mid, frames))
            core.sent[mid] = (frames, link, link.epoch)
            if len(queued) == 1:
                self._loop.call_soon(self._flush, link)  # type: ignore[union-attr]
            elif len(queued) >= MAX_SUBMIT_BATCH:
                self._flush(link)
            return mid
        if link.queued:
            self._flush(link)  # a oneway message keeps its place behind them
        try:
            if link.compact and len(frames[3]) <= COMPACT_MAX:
                send_raw(link.raw, COMPACT_SUBMIT + frames[2] + frames[3], NOBLOCK)
            else:
                send_frames(link.raw, frames)
        except zmq.Again:  # the queue towards sqm is full (sqm down or slow)
            link = await self._send_slow(mid, frames, timeout, link)
        if not oneway:
            core.sent[mid] = (frames, link, link.epoch)
        return mid

    def _flush(self, link: Link) -> None:
        """Send ``link``'s queued submissions; a full queue leaves them to the re-send rules."""
        if self._links.flush(link):
            self._after_links()

    async def _send_slow(self, mid: str, frames: list[bytes], timeout: float | None,
                         link: Link) -> Link:
        other = self._send_elsewhere(frames, link)
        if other is not None:
            return other
        limit = self._limit(timeout)
        sock = link.sock
        if not await sock.poll(None if limit is None else int(limit * 1000), zmq.POLLOUT):
            raise self._not_taken(mid, limit, link)
        send_frames(zmq.Socket.shadow(sock.underlying), frames)
        return link

    async def receive(self, timeout: float | None = None, id: str | None = None) -> Any:  # noqa: A002
        """The next reply's result, or that of message ``id`` (see Sender.receive)."""
        self._start()
        core = self._core
        outcome = core.take(id)
        if outcome is None:
            outcome = await self._wait(id, self._receive_deadline(id, timeout))
        return core.result(outcome)

    async def rpc(
        self,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        priority: str = "normal",
        time_limit: float | None = None,
    ) -> Any:
        """Submit and await that message's result. Cancelling it forgets the message."""
        limit = timeout if timeout is not None else self.timeout
        mid = await self._submit(method, payload, False, limit, retries, priority, None, None,
                                 NO_TIMING if time_limit is None
                                 else timing(None, None, time_limit))
        try:
            outcome = await self._wait(mid, self._core.deadline_for(mid, limit, None))
        except BaseException:
            self._core.forget(mid)
            raise
        return self._core.result(outcome)

    async def _wait(self, mid: str | None, deadline: float) -> Outcome:
        loop = asyncio.get_running_loop()
        key = _ANY if mid is None else mid
        core = self._core
        graced = False
        while True:
            outcome = core.take(mid)
            if outcome is not None:
                return self._late(outcome, mid) if graced else outcome
            if self._links.refused:
                error = self._unreachable()
                if error is not None:
                    raise error
            # deadline is time.monotonic(); asyncio's loop.time() is monotonic too
            now = loop.time()
            remaining = deadline - now if deadline != float("inf") else None
            if remaining is not None and remaining <= 0:
                grace = 0.0 if graced else self._verdict_grace(mid, now)
                if grace <= 0:
                    raise self._timeout(mid)
                graced = True  # sqm accepted it: its Expired is on the way
                deadline = now + grace
                remaining = grace
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(key, []).append(fut)
            # Await the future itself (not asyncio.wait_for, which on some
            # Pythons swallows a cancellation racing with completion).
            timer = loop.call_later(remaining, _set_if_pending, fut) if remaining else None
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()
                waiting = self._waiters.get(key)
                if waiting is not None:
                    if fut in waiting:
                        waiting.remove(fut)
                    if not waiting:
                        del self._waiters[key]

    def map(
        self,
        method: str,
        payloads: Iterable[Any] | AsyncIterator[Any],
        max_concurrent: int = 50,
        retries: int = 0,
        timeout: float | None = None,
        ordered: bool = True,
    ) -> AsyncIterator[Any]:
        """``async for item in s.map(...)``: Sender.map's twin, same arguments.

        ``payloads`` may be an iterable or an async iterable.
        """
        batch, limit = self._batch(method, max_concurrent, retries, timeout, ordered)
        return self._map(method, payloads, batch, retries, limit)

    async def _map(self, method: str, payloads: Any, batch: Batch, retries: int,
                   limit: float | None) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        aitems = payloads.__aiter__() if hasattr(payloads, "__aiter__") else None
        items = iter(payloads) if aitems is None else None
        waiter: list[asyncio.Future[None] | None] = [None]

        def notify() -> None:
            fut = waiter[0]
            if fut is not None and not fut.done():
                fut.set_result(None)

        batch.sink.notify = notify
        try:
            while True:
                step = batch.step()
                if step == NEED:
                    try:
                        if items is not None:
                            payload = next(items)
                        else:
                            assert aitems is not None
                            payload = await aitems.__anext__()
                    except (StopIteration, StopAsyncIteration):
                        batch.exhausted = True
                        continue
                    try:
                        mid = await self._submit(method, payload, False, limit, retries,
                                                 "normal", None, batch.sink)
                    except SQMError as exc:
                        batch.failed(exc)
                    else:
                        batch.sent(mid)
                    continue
                if step == EMIT:
                    out = batch.out
                    while out:
                        yield out.popleft()
                    continue
                if step == DONE:
                    return
                if batch.sink.done:
                    continue  # arrived while we were yielding
                fut: asyncio.Future[None] = loop.create_future()
                waiter[0] = fut
                deadline = batch.next_deadline()
                timer = None
                if deadline != float("inf"):
                    timer = loop.call_later(max(0.0, deadline - time.monotonic()),
                                            _set_if_pending, fut)
                try:
                    await fut
                finally:
                    waiter[0] = None
                    if timer is not None:
                        timer.cancel()
        finally:
            batch.close()

    def started(self, id: str) -> bool:  # noqa: A002
        """True once a worker has acknowledged message ``id`` ("working"), before its
        reply: at once with ``submit(ack=True)`` / ``on_start``, else from the
        worker's next heartbeat while the callback runs (see Sender.started)."""
        return id in self._core.started

    def accepted(self, id: str) -> bool:  # noqa: A002
        """True once sqm has taken message ``id`` (journaled, in journal mode), before its reply."""
        return id in self._core.accepted

    async def cancel(self, id: str) -> bool:  # noqa: A002
        """Cancel message ``id`` (see :meth:`Sender.cancel`); True if it had not ended."""
        self._start()
        if not self._cancel(id):
            return False
        self._wake(id)  # a receive() waiting for it raises Cancelled now
        return True

    async def close(self) -> None:
        """Stop the reader tasks and close the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._tick is not None:
            self._tick.cancel()
        links = self._links.links
        tasks = [*self._readers, *(t for link in links for t in link.tasks)]
        for link in links:
            link.tasks = []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._close_sockets()

    async def __aenter__(self) -> AsyncSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
