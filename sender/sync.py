"""The blocking Sender: submit messages, receive replies from workers' direct sends."""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from sqm import protocol
from sqm.config import resolve
from sqm.errors import SQMError, Timeout
from sqm.sockets import make_socket
from sqm.zmqfast import RCVTIMEO, recv_frames, send_frames, set_option

from ._correlator import Correlator, drain

#: How often a waiting Sender looks for errors from sqm (seconds).
BROKER_CHECK_S = 0.02


class Sender:
    """Submit messages to a queue and collect the workers' replies.

    Thread-safety: a Sender belongs to the thread that created it (ZeroMQ
    sockets are not thread-safe). Calling it from another thread raises
    :class:`~sqm.errors.SQMError`; create one Sender per thread instead.
    Several messages may be outstanding at once; replies are matched by id,
    and replies for other ids that arrive while waiting for one are kept.
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
        self._owner = threading.get_ident()
        self._core = Correlator(
            self.settings,
            serializer=serializer,
            allow_pickle=allow_pickle,
            max_message_size=max_message_size,
        )
        self._ctx = zmq.Context.instance()
        self._closed = False
        self._mailbox = make_socket(self._ctx, zmq.PULL, linger_ms=0)
        self._broker = make_socket(self._ctx, zmq.DEALER, routing_id=self._core.routing_id)
        try:
            self._mailbox.bind(self._core.mailbox_bind_address())
            self._core.set_mailbox(self._mailbox.last_endpoint.decode())
            self._broker.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise SQMError(f"cannot set up sender for queue {self.queue!r}: {exc}") from None
        self._next_broker_check = 0.0

    @property
    def mailbox(self) -> str:
        """The address workers send this sender's replies to."""
        return self._core.mailbox.decode()

    def _check(self) -> None:
        if self._closed:
            raise SQMError("this Sender is closed")
        if threading.get_ident() != self._owner:
            raise SQMError(
                "a Sender may only be used by the thread that created it; "
                "create one Sender per thread"
            )

    def submit(
        self,
        method: str,
        payload: Any = None,
        *,
        oneway: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        priority: str = "normal",
    ) -> str:
        """Queue ``method(payload)`` for one worker and return the message id.

        ``timeout`` gives the message a deadline: sqm will not hand it to a
        worker after it, and ``receive(id=...)`` waits at most that long.
        ``retries`` is how many more workers may be tried if the one holding
        the message dies. ``oneway`` messages get no reply.
        """
        self._check()
        mid, frames = self._core.encode_submit(
            method, payload, oneway=oneway, timeout=timeout, retries=retries, priority=priority
        )
        try:
            send_frames(self._broker, frames)
        except zmq.Again:
            self._send_slow(mid, frames, timeout)
        return mid

    def _send_slow(self, mid: str, frames: list[bytes], timeout: float | None) -> None:
        """The send queue towards sqm is full (sqm down or slow): wait, bounded."""
        limit = timeout if timeout is not None else self.timeout
        if self._broker.poll(None if limit is None else int(limit * 1000), zmq.POLLOUT):
            send_frames(self._broker, frames)
            return
        self._core.forget(mid)
        raise Timeout(
            f"sqm at {self.endpoint} did not take the message within {limit} s: is it running?"
        )

    def receive(self, timeout: float | None = None, id: str | None = None) -> Any:  # noqa: A002
        """Return the next reply's result (or that of message ``id``).

        Raises :class:`Timeout` when nothing came in time (the message stays
        outstanding), or the error the reply carries (RemoteError, WorkerLost,
        QueueFull...).
        """
        self._check()
        core = self._core
        outcome = core.take(id)
        if outcome is None:
            core.check_waitable(id)
            deadline = core.deadline_for(id, timeout, self.timeout)
            outcome = self._wait(id, deadline)
        return core.result(outcome)

    def rpc(
        self,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int = 0,
        priority: str = "normal",
    ) -> Any:
        """Submit and wait for that message's result (timeout: explicit, else the Sender's)."""
        limit = timeout if timeout is not None else self.timeout
        mid = self.submit(method, payload, timeout=limit, retries=retries, priority=priority)
        try:
            outcome = self._wait(mid, self._core.deadline_for(mid, limit, None))
        except BaseException:
            self._core.forget(mid)
            raise
        return self._core.result(outcome)

    def _wait(self, mid: str | None, deadline: float) -> Any:
        """Block in recv on the mailbox, where replies arrive; look at the
        connection to sqm (which only carries errors) every BROKER_CHECK_S.

        Blocking in one recv costs far fewer system calls per reply than
        polling two sockets; a broker error still reaches the caller within
        BROKER_CHECK_S.
        """
        core = self._core
        mailbox = self._mailbox
        while True:
            now = time.monotonic()
            if now >= self._next_broker_check:
                self._next_broker_check = now + BROKER_CHECK_S
                drain(self._broker, core, True)
                outcome = core.take(mid)
                if outcome is not None:
                    return outcome
            if mid is None and not core.outstanding and not core.ready:
                raise SQMError("nothing to receive: no message is outstanding")
            remaining = deadline - now
            if remaining <= 0:
                what = f"message {mid}" if mid else "any reply"
                raise Timeout(f"no reply for {what} from queue {self.queue!r} in time")
            wait = min(remaining, self._next_broker_check - now)
            set_option(mailbox, RCVTIMEO, max(1, int(wait * 1000)))
            try:
                frames = recv_frames(mailbox, 0)
            except zmq.Again:
                continue
            if core.feed(frames, False) is not None:
                outcome = core.take(mid)
                if outcome is not None:
                    return outcome

    def started(self, id: str) -> bool:  # noqa: A002
        """True once a worker has acknowledged message ``id`` ("working"), before its reply."""
        self._check()
        drain(self._mailbox, self._core, False)
        return id in self._core.started

    @property
    def outstanding(self) -> int:
        """How many messages still await a reply."""
        return len(self._core.outstanding) + len(self._core.ready)

    def close(self) -> None:
        """Close the sockets; replies that arrive later are dropped by ZeroMQ."""
        if self._closed:
            return
        self._closed = True
        self._broker.close(linger=1000)
        self._mailbox.close(linger=0)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass
