"""AsyncSender: the Sender's calls as asyncio coroutines, over the same core."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Any

import zmq
import zmq.asyncio

from sqm import protocol
from sqm.config import resolve, split_endpoints
from sqm.errors import SQMError, Timeout
from sqm.sockets import make_socket
from sqm.zmqfast import recv_frames, send_frames

from ._batch import Batch, check_map_args
from ._correlator import Correlator
from ._hooks import Hooks, OnComplete, OnFail, OnStart, OnStatus, run_calls
from ._links import Link, Links, monitor_event, open_dealer

log = logging.getLogger("sender")

_ANY = object()
#: How often, at most, a busy AsyncSender reads its connections to sqm (s).
BROKER_CHECK_S = 0.02


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncSender:
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
    ) -> None:
        self.settings = resolve(queue, endpoint=endpoint, config=config)
        self.queue = self.settings.queue
        self.timeout = timeout
        self.heartbeat = float(heartbeat or self.settings.get("heartbeat", 1.0))
        self._core = Correlator(
            self.settings,
            serializer=serializer,
            allow_pickle=allow_pickle,
            max_message_size=max_message_size,
        )
        self._ctx = zmq.asyncio.Context.instance()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Future[Any]] = set()
        self._tick: asyncio.TimerHandle | None = None
        self._waiters: dict[Any, list[asyncio.Future[None]]] = {}
        self._mailbox = make_socket(self._ctx, zmq.PULL, linger_ms=0)
        try:
            self._mailbox.bind(self._core.mailbox_bind_address())
            self._core.set_mailbox(self._mailbox.last_endpoint.decode())
            self._links = Links(self._core, self.settings.endpoints, self._open_link,
                                self._close_link, self.heartbeat, self._wake)
        except zmq.ZMQError as exc:
            self._closed = True
            self._mailbox.close(0)
            raise SQMError(f"cannot set up sender for queue {self.queue!r}: {exc}") from None
        self._one = self._links.single

    # ------------------------------------------------------------ sockets and tasks

    def _open_link(self, link: Link) -> None:
        sock, monitor = open_dealer(
            self._ctx, link.endpoint, self._core.routing_id, self.heartbeat, self._core.prefix
        )
        link.sock = sock
        link.raw = zmq.Socket.shadow(sock.underlying)  # sync view: NOBLOCK send/recv
        link.monitor = monitor
        if self._loop is not None:
            self._start_link(link)

    def _start_link(self, link: Link) -> None:
        loop = self._loop
        assert loop is not None
        link.tasks = [
            loop.create_task(self._read(link.sock, link.raw, True, BROKER_CHECK_S)),
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
        if self._closed:
            raise SQMError("this AsyncSender is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._readers = [self._loop.create_task(
                self._read(self._mailbox, zmq.Socket.shadow(self._mailbox.underlying), False))]
            for link in self._links.links:
                self._start_link(link)

    async def _read(self, sock: zmq.asyncio.Socket, raw: zmq.Socket, from_broker: bool,
                    pause: float = 0.0) -> None:
        """Wait until ``sock`` is readable, then drain it without blocking.

        A broker's DEALER carries one ACCEPTED per message and rarely
        anything else: reading it at most every ``pause`` seconds costs one
        wake-up per interval under load, not one per message, and delays
        sqm's errors by at most that much.
        """
        core = self._core
        feed = core.feed
        wake = self._wake
        while True:
            await sock.poll(flags=zmq.POLLIN)
            while True:
                try:
                    frames = recv_frames(raw)
                except zmq.Again:
                    break
                mid = feed(frames, from_broker)
                if mid is not None:
                    wake(mid)
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
        nxt = self._links.due(time.monotonic())
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

    def _wake(self, mid: str) -> None:
        for key in (mid, _ANY):
            futures = self._waiters.get(key)
            while futures:
                fut = futures.pop(0)
                if not fut.done():
                    fut.set_result(None)
                    return

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.settings.endpoints

    @property
    def mailbox(self) -> str:
        return self._core.mailbox.decode()

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
                or on_fail is not None:
            if oneway:
                raise ValueError("a oneway message is never acknowledged or answered: "
                                 "it takes no callbacks")
            hooks = Hooks.make(on_start, on_status, on_complete, on_fail)
        return await self._submit(method, payload, oneway, timeout, retries, priority, ttl, hooks)

    async def _submit(self, method: str, payload: Any, oneway: bool, timeout: float | None,
                      retries: int, priority: str, ttl: float | None, hooks: Any) -> str:
        self._start()
        core = self._core
        mid, frames = core.encode_submit(
            method, payload, oneway=oneway, timeout=timeout, retries=retries,
            priority=priority, ttl=ttl,
        )
        if hooks is not None:
            core.watch(mid, hooks)
        link = self._one or self._links.pick()
        try:
            send_frames(link.raw, frames)
        except zmq.Again:  # the queue towards sqm is full (sqm down or slow)
            link = await self._send_slow(mid, frames, timeout, link)
        if not oneway:
            core.sent[mid] = (frames, link, link.epoch)
        return mid

    async def _send_slow(self, mid: str, frames: list[bytes], timeout: float | None,
                         link: Link) -> Link:
        for other in self._links.up:
            if other is not link:
                try:
                    send_frames(other.raw, frames)
                except zmq.Again:
                    continue
                return other
        limit = timeout if timeout is not None else self.timeout
        sock = link.sock
        if not await sock.poll(None if limit is None else int(limit * 1000), zmq.POLLOUT):
            self._core.forget(mid)
            raise Timeout(f"sqm at {link.endpoint} did not take the message within {limit} s")
        send_frames(zmq.Socket.shadow(sock.underlying), frames)
        return link

    async def receive(self, timeout: float | None = None, id: str | None = None) -> Any:  # noqa: A002
        """The next reply's result, or that of message ``id`` (see Sender.receive)."""
        self._start()
        core = self._core
        outcome = core.take(id)
        if outcome is None:
            core.check_waitable(id)
            outcome = await self._wait(id, core.deadline_for(id, timeout, self.timeout))
        return core.result(outcome)

    async def rpc(
        self,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        priority: str = "normal",
    ) -> Any:
        """Submit and await that message's result. Cancelling it forgets the message."""
        limit = timeout if timeout is not None else self.timeout
        mid = await self._submit(method, payload, False, limit, retries, priority, None, None)
        try:
            outcome = await self._wait(mid, self._core.deadline_for(mid, limit, None))
        except BaseException:
            self._core.forget(mid)
            raise
        return self._core.result(outcome)

    async def _wait(self, mid: str | None, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        key = _ANY if mid is None else mid
        core = self._core
        while True:
            outcome = core.take(mid)
            if outcome is not None:
                return outcome
            remaining = deadline - loop.time() if deadline != float("inf") else None
            # deadline is time.monotonic(); asyncio's loop.time() is monotonic too
            if remaining is not None and remaining <= 0:
                what = f"message {mid}" if mid else "any reply"
                raise Timeout(f"no reply for {what} from queue {self.queue!r} in time")
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
        if self._closed:
            raise SQMError("this AsyncSender is closed")
        check_map_args(max_concurrent, retries, timeout)
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        limit = timeout if timeout is not None else self.timeout
        return self._map(method, payloads, Batch(self._core, max_concurrent, ordered),
                         retries, limit)

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
        exhausted = False
        try:
            while True:
                while not exhausted and batch.room():
                    try:
                        if items is not None:
                            payload = next(items)
                        else:
                            payload = await aitems.__anext__()
                    except (StopIteration, StopAsyncIteration):
                        exhausted = True
                        break
                    try:
                        mid = await self._submit(method, payload, False, limit, retries,
                                                 "normal", None, batch.sink)
                    except SQMError as exc:
                        batch.failed(exc)
                    else:
                        batch.sent(mid)
                batch.collect()
                out = batch.out
                while out:
                    yield out.popleft()
                if exhausted and not batch.inflight:
                    return
                if batch.sink.done or (not exhausted and batch.room()):
                    continue
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
        """True once a worker has acknowledged message ``id`` ("working"), before its reply."""
        return id in self._core.started

    def accepted(self, id: str) -> bool:  # noqa: A002
        """True once sqm has taken message ``id`` (journaled, in journal mode), before its reply."""
        return id in self._core.accepted

    @property
    def outstanding(self) -> int:
        return len(self._core.outstanding) + len(self._core.ready)

    def set_endpoints(self, endpoints: str | Iterable[str]) -> None:
        """Talk to exactly these brokers from now on (see Sender.set_endpoints)."""
        if self._closed:
            raise SQMError("this AsyncSender is closed")
        eps = split_endpoints(endpoints if isinstance(endpoints, str) else list(endpoints))
        try:
            self._links.replace(eps)
        except zmq.ZMQError as exc:
            raise SQMError(f"cannot connect to {eps}: {exc}") from None
        self.settings = replace(self.settings, endpoint=eps[0], endpoints=eps)
        self._one = self._links.single

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
        self._links.close(1000)
        self._mailbox.close(linger=0)

    async def __aenter__(self) -> AsyncSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
