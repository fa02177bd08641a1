"""What Sender and AsyncSender share: everything but blocking and awaiting.

Setup, argument checks, the slow paths of submit, ``set_endpoints``, the
mailbox file's clean-up and the verdict on a wait that ran out live here,
once. The façades (sync.py, aio.py) add only their socket flavour and the
way they wait, as pyzmq's asyncio façade does over ``zmq/_future.py``; the
map loop is the state machine in ``_batch.py``. The few lines run per
message (encode, send, take) stay written out in each façade: a method call
there is a measurable share of a submit.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import zmq

from sqm import protocol
from sqm.config import client_key_paths, resolve, split_endpoints
from sqm.errors import AuthError, BrokerUnreachable, SQMError, Timeout
from sqm.security.keys import KeyPair, client_keys
from sqm.sockets import ipc_listener_alive, make_socket, raise_fd_limit
from sqm.zmqfast import send_frames

from ._batch import Batch, check_map_args
from ._correlator import Correlator, Outcome
from ._hooks import Hooks, OnComplete, OnFail, OnStart, OnStatus
from ._links import DOWN, Link, Links, open_dealer

#: The longest a caller waits past a message's deadline for sqm's verdict
#: (Expired) on a message sqm accepted and no worker started (seconds).
#: sqm sweeps expired messages once per heartbeat, so the wait is one
#: heartbeat and a tick at most, capped here.
MAX_VERDICT_WAIT_S = 1.5


def remove_file(path: str, owner_pid: int) -> None:
    """Remove a mailbox's socket file (it may be gone already).

    Only in the process that bound it: a forked child exiting must not
    take its parent's mailbox away.
    """
    if os.getpid() != owner_pid:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


class SenderBase:
    """The state and decisions of one sender; subclasses supply the waiting.

    Subclass hooks: :meth:`_context` (the socket flavour), :meth:`_open_link`
    and :meth:`_close_link`, and ``_link_wake`` (told of ids made ready
    while a link is read; None for a blocking sender).
    """

    _link_wake: Callable[[str], None] | None = None

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
        self._closed = True  # until the sockets are there
        self.settings = resolve(queue, endpoint=endpoint, config=config)
        #: (own pair, server key) for a secured sqm, else None (plain sockets).
        self._curve = client_keys(*client_key_paths(self.settings, secret_key, server_key))
        self.queue = self.settings.queue
        self.timeout = timeout
        #: ZMTP heartbeat towards each broker (s): a silent one is dropped after 3.
        self.heartbeat = float(heartbeat or self.settings.get("heartbeat", 1.0))
        self._verdict_wait = min(self.heartbeat * 1.25 + 0.05, MAX_VERDICT_WAIT_S)
        self._core = Correlator(
            self.settings,
            serializer=serializer,
            allow_pickle=allow_pickle,
            max_message_size=max_message_size,
        )
        address = self._core.mailbox_bind_address()
        self._ctx = self._context(context)
        # Secured: the mailbox is a CURVE server with a key pair of its own,
        # made here and never stored; its public key travels in the envelope.
        mailbox_pair = None if self._curve is None else KeyPair(*zmq.curve_keypair())
        # A DEALER: workers reach every mailbox through one ROUTER each (a
        # connection per mailbox, not a socket); it receives the frames alone.
        raise_fd_limit()
        self._mailbox = make_socket(self._ctx, zmq.DEALER, linger_ms=0, curve_server=mailbox_pair)
        #: Removes the mailbox's socket file at close, garbage collection or
        #: interpreter exit, whichever comes first (ipc mailboxes only).
        self._mailbox_cleanup: weakref.finalize | None = None
        try:
            self._mailbox.bind(address)
            last = self._mailbox.last_endpoint
            bound = last.decode() if isinstance(last, bytes) else str(last)
            if bound.startswith("ipc://"):
                self._mailbox_cleanup = weakref.finalize(
                    self, remove_file, bound[len("ipc://"):], os.getpid())
            if mailbox_pair is None:
                self._core.set_mailbox(bound)
            else:
                self._core.set_mailbox(
                    f"{bound}{protocol.MAILBOX_KEY_SEP}{mailbox_pair.public.decode('ascii')}")
            self._links = Links(self._core, self.settings.endpoints, self._open_link,
                                self._close_link, self.heartbeat, self._link_wake)
        except zmq.ZMQError as exc:
            self._mailbox.close(0)
            if self._mailbox_cleanup is not None:
                self._mailbox_cleanup()
            raise SQMError(f"cannot set up sender for queue {self.queue!r}: {exc}") from None
        self._closed = False
        self._one = self._links.single

    # ------------------------------------------------------------ façade hooks

    def _context(self, context: zmq.Context | None) -> zmq.Context:
        raise NotImplementedError

    def _open_link(self, link: Link) -> None:
        raise NotImplementedError

    def _close_link(self, link: Link, linger: int) -> None:
        raise NotImplementedError

    def _dealer(self, link: Link) -> zmq.Socket:
        """Open ``link``'s DEALER and monitor on this sender's context."""
        sock, monitor = open_dealer(
            self._ctx, link.endpoint, self._core.routing_id, self.heartbeat, self._core.prefix,
            self._curve,
        )
        link.monitor = monitor
        return sock

    # ------------------------------------------------------------ properties

    @property
    def endpoint(self) -> str:
        """The first broker's endpoint."""
        return self.settings.endpoint

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every broker this sender talks to."""
        return self.settings.endpoints

    @property
    def mailbox(self) -> str:
        """The address workers send this sender's replies to."""
        return self._core.mailbox.decode().partition(protocol.MAILBOX_KEY_SEP)[0]

    @property
    def outstanding(self) -> int:
        """How many messages still await a reply."""
        return len(self._core.outstanding) + len(self._core.ready)

    def _check(self) -> None:
        """Refuse calls on a closed sender (Sender also refuses other threads)."""
        if self._closed:
            raise SQMError(f"this {self._kind()} is closed")

    def _kind(self) -> str:
        return "Sender"

    # ------------------------------------------------------------ submitting

    @staticmethod
    def _hooks(oneway: bool, on_start: OnStart | None, on_status: OnStatus | None,
               on_complete: OnComplete | None, on_fail: OnFail | None) -> Hooks | None:
        """The callbacks of one submit, checked (None when there are none)."""
        if on_start is None and on_status is None and on_complete is None and on_fail is None:
            return None
        if oneway:
            raise ValueError("a oneway message is never acknowledged or answered: "
                             "it takes no callbacks")
        return Hooks.make(on_start, on_status, on_complete, on_fail)

    def _send_elsewhere(self, frames: list[bytes], link: Link) -> Link | None:
        """``link``'s send queue is full: the first other live broker that takes it."""
        for other in self._links.up:
            if other is not link:
                try:
                    send_frames(other.raw, frames)
                except zmq.Again:
                    continue
                return other
        return None

    def _not_taken(self, mid: str, limit: float | None, link: Link) -> Timeout:
        """No broker took the message within ``limit``: forget it, say why."""
        self._core.forget(mid)
        return Timeout(
            f"sqm at {link.endpoint} did not take the message within {limit} s: is it running?"
        )

    def _limit(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    # ------------------------------------------------------------ waiting

    def _receive_deadline(self, mid: str | None, timeout: float | None) -> float:
        """receive() found nothing yet: check it may wait, and until when (monotonic)."""
        core = self._core
        core.check_waitable(mid)
        return core.deadline_for(mid, timeout, self.timeout)

    def _verdict_grace(self, mid: str | None, now: float) -> float:
        """How long to wait past ``mid``'s deadline for sqm's verdict (0: none).

        sqm never hands a message to a worker after its deadline and answers
        ``Expired`` at its next sweep; a caller that gave up exactly then would
        learn ``Timeout`` for what sqm counts as expired. So, for a message sqm
        ACCEPTED on a connection still up, that no worker started, whose own
        deadline (not just the caller's wait) has passed, wait briefly.
        """
        if mid is None:
            return 0.0
        core = self._core
        if mid not in core.accepted or mid in core.started:
            return 0.0
        own = core.outstanding.get(mid)
        if own is None or own > now:
            return 0.0
        entry = core.sent.get(mid)
        if entry is None:
            return 0.0
        link, epoch = entry[1], entry[2]
        if link.state == DOWN or link.epoch != epoch or link.sock is None:
            return 0.0
        return self._verdict_wait

    def _late(self, outcome: Outcome, mid: str | None) -> Outcome:
        """An outcome that came in the verdict grace (past the caller's deadline):
        sqm's verdict (Expired) stands; a worker's reply means a worker had
        started it unacknowledged (no FLAG_ACK), so the caller's time ran out:
        Timeout, as when a worker's ACK had said so before the deadline."""
        if outcome.from_broker:
            return outcome
        raise self._timeout(mid)

    def _timeout(self, mid: str | None) -> Timeout:
        """The Timeout for a wait that ran out, naming unreached brokers."""
        what = f"message {mid}" if mid else "any reply"
        text = f"no reply for {what} from queue {self.queue!r} in time"
        links = self._links.links
        unreached = [link.endpoint for link in links
                     if not link.reached and not link.endpoint.startswith("inproc://")]
        if unreached and len(unreached) == len(links):
            text += f": no broker reached at {', '.join(unreached)} (is sqm running?)"
        return Timeout(text)

    def _unreachable(self) -> BrokerUnreachable | AuthError | None:
        """BrokerUnreachable when no link ever reached a broker and no ipc
        endpoint has a listener; called only after a refused connect.

        The queued copies are dropped (their DEALERs re-created) so a broker
        started later never runs what its caller was told did not arrive;
        messages still outstanding are re-sent when a broker comes up.
        """
        links = self._links
        links.refused = False
        if links.auth_error is not None:
            return links.auth_error  # a broker refused our key: no point waiting
        eps = [link.endpoint for link in links.links]
        if any(link.reached for link in links.links) \
                or not all(ep.startswith("ipc://") for ep in eps) \
                or any(ipc_listener_alive(ep) for ep in eps):
            return None
        for link in links.links:
            links.purge(link)
        where = ", ".join(eps)
        return BrokerUnreachable(
            f"no broker reached at {where}: nothing listens there "
            f"(start it with: sqm serve {self.queue})"
        )

    # ------------------------------------------------------------ batches

    def _batch(self, method: str, max_concurrent: int, retries: int, timeout: float | None,
               ordered: bool) -> tuple[Batch, float | None]:
        """Check map()'s arguments at the call; its batch and per-item limit."""
        self._check()
        check_map_args(max_concurrent, retries, timeout)
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        return (Batch(self._core, max_concurrent, ordered, self._verdict_grace, self._timeout),
                self._limit(timeout))

    # ------------------------------------------------------------ membership and state

    def set_endpoints(self, endpoints: str | Iterable[str]) -> None:
        """Talk to exactly these brokers from now on (a list, or a comma-separated string).

        Messages a removed broker had not accepted, or that sat on a dead
        one, are re-sent through the others. The mailbox stays where it is.
        """
        self._check()
        eps = split_endpoints(endpoints if isinstance(endpoints, str) else list(endpoints))
        try:
            self._links.replace(eps, time.monotonic())
        except zmq.ZMQError as exc:
            raise SQMError(f"cannot connect to {eps}: {exc}") from None
        self.settings = replace(self.settings, endpoint=eps[0], endpoints=eps)
        self._one = self._links.single

    def _cancel(self, mid: str) -> bool:
        """Sender.cancel's work: end ``mid`` here with Cancelled, then tell sqm
        (every broker: only the one holding it acts; it checks we sent it)."""
        if not self._core.cancel(mid):
            return False
        frames = [protocol.SIGNATURE, protocol.CANCEL, mid.encode("ascii")]
        for link in self._links.links:
            if link.queued:
                self._links.flush(link)  # the message goes first: sqm cancels what it knows
            if link.raw is not None:
                try:
                    send_frames(link.raw, frames)
                except zmq.ZMQError:
                    pass  # that broker is unreachable: it cannot be running the message
        return True

    def _close_sockets(self) -> None:
        """Close every socket and remove the mailbox's file."""
        self._links.close(1000)
        self._mailbox.close(linger=0)
        if self._mailbox_cleanup is not None:
            self._mailbox_cleanup()
