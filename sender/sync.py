"""The blocking Sender: submit messages, receive replies from workers' direct sends."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import zmq
import zmq.asyncio

from sqm import protocol
from sqm.errors import SQMError
from sqm.protocol import COMPACT_MAX, COMPACT_SUBMIT, MAX_SUBMIT_BATCH
from sqm.zmqfast import (
    NOBLOCK,
    RCVTIMEO,
    readable,
    recv_frames,
    recv_message,
    send_frames,
    send_raw,
    set_option,
)

from ._batch import DONE, EMIT, NEED, Batch
from ._correlator import NO_TIMING, Outcome, read_all, timing
from ._hooks import OnComplete, OnFail, OnStart, OnStatus, run_calls
from ._links import Link, monitor_event
from .base import SenderBase

#: How often a waiting Sender looks at its connections to sqm (errors,
#: ACCEPTED notices, connects and disconnects), in seconds.
BROKER_CHECK_S = 0.02
#: A Sender that only submits still looks at them every this many submissions,
#: so sqm's notices never pile up unread.
CHECK_EVERY = 64


class Sender(SenderBase):
    """Submit messages to a queue and collect the workers' replies.

    Thread-safety: a Sender belongs to the thread that created it (ZeroMQ
    sockets are not thread-safe). Calling it from another thread raises
    :class:`~sqm.errors.SQMError`; create one Sender per thread instead.
    Several messages may be outstanding at once; replies are matched by id,
    and replies for other ids that arrive while waiting for one are kept.

    ``endpoint`` may name several brokers of the queue (a list, or a
    comma-separated string): messages are spread over the live ones.
    Callbacks given to :meth:`submit` run inside this Sender's own calls
    (receive, rpc, map, poll), never from another thread. ``context``: a
    zmq.Context to share (in-process brokers on ``inproc://`` need it).
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
        self._owner = threading.get_ident()
        self._next_broker_check = 0.0
        self._next_due = float("inf")  # the next re-send or watch the links asked for
        self._unchecked = 0
        self._rcvtimeo = -2  # the mailbox's RCVTIMEO as last set (_recv_within)
        # The last wait outlasted BROKER_CHECK_S: the next one sleeps in the poll
        # at once instead of timing out in recv first (many senders each waiting
        # longer than that paid a timed-out recv and a poll per reply).
        self._long_waits = False
        self._poller: zmq.Poller | None = None  # _sleep's, kept while the sockets stay
        self._polled: tuple[Any, ...] = ()
        super().__init__(queue, endpoint=endpoint, config=config, serializer=serializer,
                         timeout=timeout, allow_pickle=allow_pickle,
                         max_message_size=max_message_size, heartbeat=heartbeat,
                         context=context, secret_key=secret_key, server_key=server_key)

    # ------------------------------------------------------------ sockets

    def _context(self, context: zmq.Context | None) -> zmq.Context:
        if context is None:
            return zmq.Context.instance()
        if isinstance(context, zmq.asyncio.Context):
            return zmq.Context.shadow(context.underlying)  # blocking sockets on the same context
        return context

    def _open_link(self, link: Link) -> None:
        link.sock = link.raw = self._dealer(link)

    @staticmethod
    def _close_link(link: Link, linger: int) -> None:
        try:
            link.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        link.monitor.close(0)
        link.sock.close(linger=linger)
        link.sock = link.raw = link.monitor = None

    def _check(self) -> None:
        if self._closed:
            raise SQMError("this Sender is closed")
        if threading.get_ident() != self._owner:
            raise SQMError(
                "a Sender may only be used by the thread that created it; "
                "create one Sender per thread"
            )

    # ------------------------------------------------------------ sending

    def submit(
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
        """Queue ``method(payload)`` for one worker and return the message id.

        ``timeout`` gives the message a deadline: sqm will not hand it to a
        worker after it, and ``receive(id=...)`` waits at most that long.
        ``ttl`` is a deadline for sqm only (the smaller of the two applies);
        with neither, the message waits for a worker as long as it takes.
        ``retries`` is how many more workers may be tried if the one holding
        the message dies. ``oneway`` messages get no reply.

        ``ack=True`` asks the worker to acknowledge the start at once
        ("working": :meth:`started`, ``on_start``); without it a worker says
        so only at its next heartbeat, and only if the callback still runs
        then (one message less per task on the hot path).

        Callbacks run inside this Sender's receive/rpc/map/poll calls:
        ``on_start()`` when a worker acknowledges the message (it sets ``ack``),
        ``on_status(done, total)`` per progress report (in order),
        ``on_complete(result)`` / ``on_fail(exc)`` with the outcome. A message
        given on_complete or on_fail is consumed by them: receive() never
        returns it.
        """
        hooks = None
        if on_start is not None or on_status is not None or on_complete is not None \
                or on_fail is not None:  # checked here first: no call on the hot path
            hooks = self._hooks(oneway, on_start, on_status, on_complete, on_fail)
            ack = ack or on_start is not None  # on_start wants the start at once
        if delay is None and not_before is None and time_limit is None and not ack:
            return self._submit(method, payload, oneway, timeout, retries, priority, ttl, hooks)
        return self._submit(method, payload, oneway, timeout, retries, priority, ttl, hooks,
                                  timing(delay, not_before, time_limit), ack)

    def _submit(self, method: str, payload: Any, oneway: bool, timeout: float | None,
                retries: int, priority: str, ttl: float | None, hooks: Any,
                extra: tuple[float, float] = NO_TIMING, ack: bool = False,
                defer: bool = False) -> str:
        self._check()
        core = self._core
        mid, frames = core.encode_submit(
            method, payload, oneway=oneway, timeout=timeout, retries=retries,
            priority=priority, ttl=ttl, not_before=extra[0], time_limit=extra[1], ack=ack,
        )
        if hooks is not None:
            core.watch(mid, hooks)
        link = self._one or self._links.pick()  # inline, not a base method: the hot path
        if defer and link.batches:
            # map(): queued until it waits or hands out items (_flush), then one SUBMIT.
            queued = link.queued
            queued.append((mid, frames))
            core.sent[mid] = (frames, link, link.epoch)
            if len(queued) >= MAX_SUBMIT_BATCH:
                self._links.flush(link)
            return mid
        try:
            if link.compact and len(frames[3]) <= COMPACT_MAX:  # one frame: docs/PROTOCOL.md
                send_raw(link.raw, COMPACT_SUBMIT + frames[2] + frames[3], NOBLOCK)
            else:
                send_frames(link.raw, frames)
        except zmq.Again:
            link = self._send_slow(mid, frames, timeout, link)
        if not oneway:
            core.sent[mid] = (frames, link, link.epoch)
        self._unchecked += 1
        if self._unchecked >= CHECK_EVERY:
            self._check_brokers(time.monotonic())
        return mid

    def _send_slow(self, mid: str, frames: list[bytes], timeout: float | None,
                   link: Link) -> Link:
        """The send queue towards sqm is full (sqm down or slow): another
        live broker, else wait, bounded."""
        other = self._send_elsewhere(frames, link)
        if other is not None:
            return other
        limit = self._limit(timeout)
        if link.raw.poll(None if limit is None else int(limit * 1000), zmq.POLLOUT):
            send_frames(link.raw, frames)
            return link
        raise self._not_taken(mid, limit, link)

    # ------------------------------------------------------------ receiving

    def receive(self, timeout: float | None = None, id: str | None = None) -> Any:  # noqa: A002
        """Return the next reply's result (or that of message ``id``).

        Raises :class:`Timeout` when nothing came in time (the message stays
        outstanding), :class:`BrokerUnreachable` when no broker listens at
        the queue's ipc endpoint, or the error the reply carries
        (RemoteError, WorkerLost, QueueFull, Expired...).
        """
        self._check()
        core = self._core
        outcome = core.take(id)
        if outcome is None:
            outcome = self._wait(id, self._receive_deadline(id, timeout))
        return core.result(outcome)

    def rpc(
        self,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        priority: str = "normal",
        time_limit: float | None = None,
    ) -> Any:
        """Submit and wait for that message's result (timeout: explicit, else the Sender's)."""
        limit = timeout if timeout is not None else self.timeout
        mid = self._submit(method, payload, False, limit, retries, priority, None, None,
                                 NO_TIMING if time_limit is None
                                 else timing(None, None, time_limit))
        try:
            outcome = self._wait(mid, self._core.deadline_for(mid, limit, None))
        except BaseException:
            self._core.forget(mid)
            raise
        return self._core.result(outcome)

    def _wait(self, mid: str | None, deadline: float) -> Outcome:
        """Block in recv on the mailbox, where replies arrive; look at the
        connections to sqm (errors, notices, connects) every BROKER_CHECK_S.

        Blocking in one recv costs far fewer system calls per reply than
        polling several sockets; a broker error still reaches the caller
        within BROKER_CHECK_S. A wait that outlasts one BROKER_CHECK_S (a
        long queue, a slow callback) sleeps in :meth:`_sleep` instead: a
        thread waking 50 times a second to look at quiet sockets is
        nothing alone, but hundreds of waiting Senders spent most of the
        CPU doing only that.
        """
        core = self._core
        mailbox = self._mailbox
        graced = False
        # quiet: a recv ran out (or the last wait was long): sleep until something happens
        quiet = self._long_waits
        started = 0.0
        while True:
            now = time.monotonic()
            if not started:
                started = now
            # Sleeping in the poll, a Sender wakes for whatever its brokers send
            # (_sleep then zeroes _next_broker_check) or for a due re-send: no
            # look by the clock.
            if now >= self._next_broker_check and (
                    not quiet or not self._next_broker_check or now >= self._next_due):
                outcome = self._settle(now, mid)
                if outcome is not None:
                    return self._late(outcome, mid) if graced else outcome
            if mid is None and not core.receivable():
                raise SQMError("nothing to receive: no message is outstanding")
            remaining = deadline - now
            if remaining <= 0:
                # Past the deadline: still take what has already arrived
                # (a reply may be waiting unread) before giving up.
                read_all(mailbox, core, False)
                outcome = self._settle(now, mid)
                if outcome is not None:
                    return self._late(outcome, mid) if graced else outcome
                grace = 0.0 if graced else self._verdict_grace(mid, now)
                if grace <= 0:
                    raise self._timeout(mid)
                graced = True  # sqm accepted it: its Expired is on the way
                deadline = now + grace
                continue
            if quiet:
                self._sleep(min(remaining, self._next_due - now))
                try:
                    frames = recv_message(mailbox)
                except zmq.Again:
                    continue
                # A reply within BROKER_CHECK_S: back to blocking in recv.
                self._long_waits = time.monotonic() - started >= BROKER_CHECK_S
            else:
                wait = min(remaining, self._next_broker_check - now)
                try:
                    frames = self._recv_within(mailbox, wait)
                except zmq.Again:
                    # Only a wait that outlasted BROKER_CHECK_S makes the next
                    # one sleep at once: a recv cut short by a near check does not.
                    quiet = True
                    self._long_waits = now + wait - started >= BROKER_CHECK_S
                    continue
                self._long_waits = False
            done = core.feed(frames, False)
            if core.calls:
                run_calls(core)
            if done is not None:
                outcome = core.take(mid)
                if outcome is not None:
                    return self._late(outcome, mid) if graced else outcome

    def _recv_within(self, mailbox: zmq.Socket, wait: float) -> list[bytes]:
        """One message from the mailbox, waiting at most ``wait`` s (zmq.Again if none).

        The receive timeout is set only when its whole milliseconds change:
        a setsockopt costs ~2 µs, and receives under load come many per ms.
        """
        ms = max(1, int(wait * 1000))
        if ms != self._rcvtimeo:
            set_option(mailbox, RCVTIMEO, ms)
            self._rcvtimeo = ms
        return recv_message(mailbox, 0)

    def _sleep(self, timeout: float) -> None:
        """Sleep until the mailbox, a broker's socket or its monitor has
        something, or ``timeout`` (s) passes.

        Anything but the mailbox (or the timeout) makes the next turn of the
        wait look at the brokers at once.
        """
        links = [link for link in self._links.links if link.sock is not None]
        socks = (self._mailbox, *(link.sock for link in links),
                 *(link.monitor for link in links))
        poller = self._poller
        if poller is None or socks != self._polled:  # a link's sockets were re-created
            poller = self._poller = zmq.Poller()
            for sock in socks:
                poller.register(sock, zmq.POLLIN)
            self._polled = socks
        ready = poller.poll(None if timeout == float("inf") else max(1, int(timeout * 1000)))
        if len(ready) != 1 or ready[0][0] is not self._mailbox:
            self._next_broker_check = 0.0

    def _settle(self, now: float, mid: str | None) -> Outcome | None:
        """Look at the brokers, run due callbacks, and take ``mid``'s outcome if it is in.

        Raises BrokerUnreachable when a refused connect shows no broker exists.
        """
        core = self._core
        self._check_brokers(now)
        if self._links.refused:
            error = self._unreachable()
            if error is not None:
                raise error
        if core.calls:
            run_calls(core)
        return core.take(mid)

    def _check_brokers(self, now: float) -> int:
        """Read every broker socket dry (errors, ACCEPTED notices) and every
        connect/disconnect event; do the re-sends that are due."""
        self._next_broker_check = now + BROKER_CHECK_S
        self._unchecked = 0
        links = self._links
        n = 0
        for link in links.links:
            n += links.read_all(link)
        for link in links.links:
            # (link.monitor read again each turn: an event may re-create the link's sockets)
            while link.monitor is not None and readable(link.monitor):  # not a failing read
                links.event(link, monitor_event(recv_frames(link.monitor)), now)
        self._next_due = links.due(now)
        return n

    def poll(self, timeout: float | None = 0) -> int:
        """Take in whatever has arrived and run the callbacks it triggers.

        Returns how many messages were handled: replies, acknowledgements,
        progress reports and errors (sqm's ACCEPTED notices are taken in
        but not counted). With a ``timeout`` (seconds; None = no limit) it
        first waits up to that long for one to arrive.
        Replies for messages without on_complete/on_fail stay for receive().
        """
        self._check()
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        return self._poll_until(deadline, True)

    def _poll_until(self, deadline: float, fresh: bool = False) -> int:
        """poll() (``fresh``: look at sqm's sockets now) and map()'s wait."""
        core = self._core
        mailbox = self._mailbox
        n = read_all(mailbox, core, False)
        now = time.monotonic()
        if fresh or now >= self._next_broker_check:
            n += self._check_brokers(now)
        while not n:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= self._next_broker_check:
                n = self._check_brokers(now)
                if n:
                    break
            wait = min(deadline, self._next_broker_check) - now
            try:
                frames = self._recv_within(mailbox, wait)
            except zmq.Again:
                continue
            core.feed(frames, False)
            n = 1 + read_all(mailbox, core, False)
        if core.calls:
            run_calls(core)
        return n

    # ------------------------------------------------------------ batches

    def map(
        self,
        method: str,
        payloads: Iterable[Any],
        max_concurrent: int = 50,
        retries: int = 0,
        timeout: float | None = None,
        ordered: bool = True,
    ) -> Iterator[Any]:
        """Run ``method`` on every payload, at most ``max_concurrent`` at a time.

        Yields one item per payload: its result, or in its place the
        :class:`SQMError` it ended with (RemoteError, Timeout, Expired...); a failed
        item never stops the batch. In input order, or with
        ``ordered=False`` as ``(index, item)`` pairs as they complete.
        ``timeout`` is per item (default: the Sender's). The batch advances
        as you iterate; stopping early forgets what is still outstanding.
        """
        batch, limit = self._batch(method, max_concurrent, retries, timeout, ordered)
        return self._map(method, iter(payloads), batch, retries, limit)

    def _map(self, method: str, items: Iterator[Any], batch: Batch, retries: int,
             limit: float | None) -> Iterator[Any]:
        try:
            while True:
                step = batch.step()
                if step == NEED:
                    try:
                        payload = next(items)
                    except StopIteration:
                        batch.exhausted = True
                        continue
                    try:
                        mid = self._submit(method, payload, False, limit, retries, "normal",
                                           None, batch.sink, defer=True)
                    except SQMError as exc:
                        batch.failed(exc)
                    else:
                        batch.sent(mid)
                    continue
                self._flush()  # what this round of NEED queued: one SUBMIT per broker
                if step == EMIT:
                    out = batch.out
                    while out:
                        yield out.popleft()
                elif step == DONE:
                    return
                else:
                    self._poll_until(batch.next_deadline())
        finally:
            for link in self._links.links:  # stopped early: what was never sent stays unsent
                link.queued.clear()
            batch.close()

    def _flush(self) -> None:
        """Send the submissions map() queued (see Links.flush)."""
        links = self._links
        for link in links.links:
            if link.queued and links.flush(link):
                self._next_due = time.monotonic()  # re-send the ones a full queue refused

    # ------------------------------------------------------------ state

    def started(self, id: str) -> bool:  # noqa: A002
        """True once a worker has acknowledged message ``id`` ("working"), before its reply.

        At once for a message submitted with ``ack=True`` (or ``on_start``);
        else from the worker's next heartbeat while the callback runs.
        """
        self._check()
        read_all(self._mailbox, self._core, False)
        return id in self._core.started

    def accepted(self, id: str) -> bool:  # noqa: A002
        """True once sqm has taken message ``id`` (journaled, in journal mode), before its reply."""
        self._check()
        self._check_brokers(time.monotonic())
        return id in self._core.accepted

    def cancel(self, id: str) -> bool:  # noqa: A002
        """Cancel message ``id``; True if it was still pending, scheduled or running.

        Its outcome becomes :class:`~sqm.errors.Cancelled` at once (receive()
        raises it, or on_fail gets it); sqm removes a pending or scheduled
        message and tells the worker running one (``originator.cancelled``);
        a late reply is dropped. False for a message that has ended (its
        reply arrived, also when not yet received) or an unknown id. It first
        takes in what has arrived, as ``poll(0)`` does (callbacks due run).
        """
        self._check()
        self.poll(0)  # a reply already here means it has ended
        return self._cancel(id)

    def close(self) -> None:
        """Close the sockets; replies that arrive later are dropped by ZeroMQ."""
        if self._closed:
            return
        self._closed = True
        self._close_sockets()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and hasattr(self, "_links"):
                self.close()
        except Exception:
            pass
