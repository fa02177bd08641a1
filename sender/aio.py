"""AsyncSender: the Sender's calls as asyncio coroutines, over the same core."""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
import zmq.asyncio

from sqm import protocol
from sqm.config import resolve
from sqm.errors import SQMError, Timeout
from sqm.sockets import make_socket
from sqm.zmqfast import recv_frames, send_frames

from ._correlator import Correlator

_ANY = object()


def _set_if_pending(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncSender:
    """Like :class:`sender.Sender`, for asyncio. Many coroutines may share one.

    Replies are read by background tasks on the event loop the sender is
    first used on, so concurrent ``rpc`` calls each get their own result.
    Use it from one event loop only.
    """

    def __init__(
        self,
        queue: str | None = None,
        *,
        endpoint: str | None = None,
        config: str | dict[str, Any] | None = None,
        serializer: str = "cbor",
        timeout: float | None = 5.0,
        allow_pickle: bool = False,
        max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.settings = resolve(queue, endpoint=endpoint, config=config)
        self.queue = self.settings.queue
        self.endpoint = self.settings.endpoint
        self.timeout = timeout
        self._core = Correlator(
            self.settings,
            serializer=serializer,
            allow_pickle=allow_pickle,
            max_message_size=max_message_size,
        )
        self._ctx = zmq.asyncio.Context.instance()
        self._closed = False
        self._mailbox = make_socket(self._ctx, zmq.PULL, linger_ms=0)
        self._broker = make_socket(self._ctx, zmq.DEALER, routing_id=self._core.routing_id)
        try:
            self._mailbox.bind(self._core.mailbox_bind_address())
            self._core.set_mailbox(self._mailbox.last_endpoint.decode())
            self._broker.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._mailbox.close(0)
            self._broker.close(0)
            raise SQMError(f"cannot set up sender for queue {self.queue!r}: {exc}") from None
        raw_broker = zmq.Socket.shadow(self._broker.underlying)
        self._send_now = lambda frames, _flags: send_frames(raw_broker, frames)
        self._waiters: dict[Any, list[asyncio.Future[None]]] = {}
        self._readers: list[asyncio.Task[None]] = []

    @property
    def mailbox(self) -> str:
        return self._core.mailbox.decode()

    def _start(self) -> None:
        if self._closed:
            raise SQMError("this AsyncSender is closed")
        if not self._readers:
            self._readers = [
                asyncio.ensure_future(self._read(self._mailbox, False)),
                asyncio.ensure_future(self._read(self._broker, True)),
            ]

    async def _read(self, sock: zmq.asyncio.Socket, from_broker: bool) -> None:
        """Wait until ``sock`` is readable, then drain it without blocking."""
        feed = self._core.feed
        wake = self._wake
        raw = zmq.Socket.shadow(sock.underlying)  # sync view of the same socket
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

    def _wake(self, mid: str) -> None:
        for key in (mid, _ANY):
            futures = self._waiters.get(key)
            while futures:
                fut = futures.pop(0)
                if not fut.done():
                    fut.set_result(None)
                    return

    async def submit(
        self,
        method: str,
        payload: Any = None,
        *,
        oneway: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        priority: str = "normal",
    ) -> str:
        """Queue ``method(payload)`` and return the message id (see Sender.submit)."""
        self._start()
        mid, frames = self._core.encode_submit(
            method, payload, oneway=oneway, timeout=timeout, retries=retries, priority=priority
        )
        try:
            self._send_now(frames, zmq.NOBLOCK)
        except zmq.Again:  # the queue towards sqm is full (sqm down or slow)
            limit = timeout if timeout is not None else self.timeout
            if not await self._broker.poll(None if limit is None else int(limit * 1000),
                                           zmq.POLLOUT):
                self._core.forget(mid)
                raise Timeout(
                    f"sqm at {self.endpoint} did not take the message within {limit} s"
                ) from None
            self._send_now(frames, zmq.NOBLOCK)
        return mid

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
        mid = await self.submit(method, payload, timeout=limit, retries=retries, priority=priority)
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

    def started(self, id: str) -> bool:  # noqa: A002
        """True once a worker has acknowledged message ``id`` ("working"), before its reply."""
        return id in self._core.started

    @property
    def outstanding(self) -> int:
        return len(self._core.outstanding) + len(self._core.ready)

    async def close(self) -> None:
        """Stop the reader tasks and close the sockets."""
        if self._closed:
            return
        self._closed = True
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._broker.close(linger=1000)
        self._mailbox.close(linger=0)

    async def __aenter__(self) -> AsyncSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
