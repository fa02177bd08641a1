"""Follow-up work from inside a callback: submit, receive, rpc and forward.

A callback that needs another worker's help uses the worker's own broker
connection(s) to submit (no new socket per call, the worker's keys apply)
and a mailbox of the worker's own for the replies. Envelopes and the
correlation of replies are the sender's (:class:`sender._correlator.Correlator`),
so a follow-up message is, to sqm and to the worker that runs it, exactly
a Sender's message.

Threads: callbacks run in the runner's thread (plain runner), in a pool of
threads or as tasks on the runner's event loop (asyncio runner). Every
access to the mailbox socket and the correlator happens under one lock, so
concurrent callbacks may submit and wait at once; whoever waits reads the
mailbox for everyone. Sends to the queue's broker go through the runner
(``send``), which owns the broker sockets. ``async def`` callbacks await the
same calls (``await worker.rpc(...)``): the wait runs in a small thread
pool, never on the event loop.

A worker waiting for a follow-up reply keeps heartbeating (heartbeats go
out from their own thread). Deadlock: if every worker of a queue waits in a
sub-rpc to that same queue, no worker is left to run the inner messages;
they wait until their deadline and the rpc raises ``Timeout`` (every
follow-up rpc has one). Give such workers ``concurrency`` > 1 (the waiting
callback holds one slot, the inner message takes another) or serve the
inner method from other workers (see docs/GUARANTEES.md).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from sender._correlator import Correlator
from sqm import protocol
from sqm.config import QueueSettings, resolve
from sqm.errors import HopLimitExceeded, SQMError, Timeout
from sqm.protocol import FLAG_COMPACT_REPLY, FLAG_ONEWAY, FORWARD, SIGNATURE, pack_envelope
from sqm.security.keys import KeyPair
from sqm.sockets import make_socket
from sqm.zmqfast import recv_frames, send_frames

if TYPE_CHECKING:
    from .execute import Originator

#: How long one wait blocks on the mailbox before looking again at what the
#: runner fed meanwhile (sqm's own errors arrive on the broker connection).
SLICE_S = 0.05
DEFAULT_MAX_HOPS = 32

#: ``send(frames, via)``: SUBMIT or FORWARD frames onto the broker link ``via``
#: (None: the first one), from any thread; False if it could not be queued.
SendLink = Callable[[list[bytes], Any], bool]


class FollowUps:
    """One worker's follow-up messages (see the module docstring)."""

    def __init__(self, settings: QueueSettings, *, config: str | dict[str, Any] | None,
                 serializer: str = "cbor", allow_pickle: bool = False,
                 timeout: float | None = 30.0, max_hops: int = DEFAULT_MAX_HOPS) -> None:
        if not isinstance(max_hops, int) or not 1 <= max_hops <= 255:
            raise ValueError("max_hops must be an int between 1 and 255")
        self.settings = settings
        self.config = config
        self.timeout = timeout
        self.max_hops = max_hops
        self._core = Correlator(settings, serializer=serializer, allow_pickle=allow_pickle,
                                max_message_size=protocol.DEFAULT_MAX_MESSAGE_SIZE)
        # _state guards the correlator (held briefly, also by the runner's
        # thread feeding sqm's answers); _io guards the mailbox and the other
        # queues' sockets (held by whoever waits, at most SLICE_S at a time).
        # Order: _io, then _state.
        self._lock = self._state = threading.Lock()
        self._io = threading.Lock()
        self._ctx: zmq.Context | None = None
        self._curve: Any = None
        self._mailbox: zmq.Socket | None = None
        self._bound = ""  # the mailbox's address, once bound
        self._others: dict[str, zmq.Socket] = {}  # queue name -> DEALER (another queue)
        self._send: SendLink | None = None
        self._pump: Callable[[], None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------ runner side

    def attach(self, ctx: zmq.Context, send: SendLink, curve: Any = None,
               pump: Callable[[], None] | None = None) -> None:
        """A run starts: sends go through ``send``; ``pump`` reads the broker link
        (plain runner: nobody else reads it while a callback waits)."""
        with self._io, self._state:
            self._ctx = ctx
            self._send = send
            self._curve = curve
            self._pump = pump

    def detach(self) -> None:
        """The run ended: close the mailbox and the other queues' sockets."""
        with self._io, self._state:
            self._send = None
            self._pump = None
            if self._mailbox is not None:
                self._mailbox.close(0)
                self._mailbox = None
                if self._bound.startswith("ipc://"):
                    try:
                        os.unlink(self._bound[len("ipc://"):])
                    except OSError:
                        pass
            for sock in self._others.values():
                sock.close(0)
            self._others.clear()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def feed_broker(self, frames: list[bytes]) -> None:
        """sqm's answer on the worker's link (ACCEPTED, or an error for a follow-up)."""
        with self._state:
            self._core.feed(frames, True)

    # ------------------------------------------------------------ callback side

    def submit(self, method: str, payload: Any = None, *, queue: str | None = None,
               oneway: bool = False, timeout: float | None = None, retries: int = 0,
               priority: str = "normal", ttl: float | None = None) -> str:
        """Submit a follow-up message; returns its id (see :meth:`Worker.submit`)."""
        with self._io:
            self._open_mailbox()
            other = None if queue is None or queue == self.settings.queue else self._other(queue)
        with self._state:
            mid, frames = self._core.encode_submit(
                method, payload, oneway=oneway,
                timeout=timeout if timeout is not None else self.timeout,
                retries=retries, priority=priority, ttl=ttl)
            send = self._send
        if other is None:
            ok = send is not None and send(frames, None)
        else:
            with self._io:
                try:
                    send_frames(other, frames)
                    ok = True
                except zmq.Again:
                    ok = False
        if not ok:
            with self._state:
                self._core.forget(mid)
            raise SQMError(f"cannot hand message {mid} to sqm: the worker is not connected")
        return mid

    def receive(self, timeout: float | None = None, id: str | None = None) -> Any:  # noqa: A002
        """The reply to ``id`` (or to any follow-up message); raises its error."""
        with self._state:
            self._core.check_waitable(id)
            deadline = self._core.deadline_for(id, timeout, self.timeout)
        while True:
            with self._state:
                outcome = self._core.take(id)
                if outcome is not None:
                    return self._core.result(outcome)
                left = deadline - time.monotonic()
                if left <= 0:
                    if id is not None:
                        self._core.forget(id)
                    what = f"message {id}" if id else "any follow-up reply"
                    raise Timeout(f"no reply for {what} in time")
            with self._io:
                self._read(min(left, SLICE_S), id)

    def rpc(self, method: str, payload: Any = None, **kw: Any) -> Any:
        """Submit and wait for the reply (see :meth:`Worker.rpc`)."""
        timeout = kw.get("timeout")
        mid = self.submit(method, payload, **kw)
        return self.receive(timeout=timeout if timeout is not None else self.timeout, id=mid)

    def in_thread(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run a blocking call for an ``async def`` callback: an awaitable."""
        with self._state:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(8, thread_name_prefix="sqm-followup")
            executor = self._executor
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(executor, lambda: fn(*args, **kw))

    # ------------------------------------------------------------ forward

    def forward_frames(self, orig: Originator, method: str, body: bytes) -> list[bytes]:
        """FORWARD frames handing ``orig``'s message on to ``method``, one hop further."""
        hops = orig.hops + 1
        if hops > self.max_hops:
            raise HopLimitExceeded(
                f"message {orig.message_id} was already handed on {orig.hops} times "
                f"(max_hops={self.max_hops}): a forwarding loop?")
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        method_b = method.encode("utf-8")
        if len(method_b) > protocol.MAX_METHOD:
            raise ValueError("method name too long")
        flags = FLAG_ONEWAY if orig.oneway else 0
        if orig.env is not None:  # the same mailbox: it reads what it read before
            flags |= orig.env.flags & FLAG_COMPACT_REPLY
        env = pack_envelope(flags, orig.retries, orig.priority,
                            orig.deadline, orig.id, orig.mailbox, method_b, orig.sertag, hops)
        return [SIGNATURE, FORWARD, env, body]

    def send_forward(self, frames: list[bytes], via: Any) -> None:
        with self._state:
            send = self._send
        if send is None:
            raise SQMError("worker.forward() is only valid while the worker runs")
        if not send(frames, via):
            raise SQMError("cannot hand the message on: the broker connection is not ready")

    # ------------------------------------------------------------ internals

    def _open_mailbox(self) -> None:
        if self._mailbox is not None:
            return
        if self._ctx is None:
            raise SQMError("follow-up messages are only valid while the worker runs")
        # Secured (as a Sender's): a CURVE server with a key pair of its own,
        # its public key in the envelope, so replies travel encrypted.
        pair = None if self._curve is None else KeyPair(*zmq.curve_keypair())
        sock = make_socket(self._ctx, zmq.DEALER, linger_ms=0, curve_server=pair)
        try:
            sock.bind(self._core.mailbox_bind_address())
        except zmq.ZMQError as exc:
            sock.close(0)
            raise SQMError(f"cannot open the worker's follow-up mailbox: {exc}") from None
        last = sock.last_endpoint
        bound = last.decode() if isinstance(last, bytes) else str(last)
        self._bound = bound
        if pair is None:
            self._core.set_mailbox(bound)
        else:
            self._core.set_mailbox(
                f"{bound}{protocol.MAILBOX_KEY_SEP}{pair.public.decode('ascii')}")
        self._mailbox = sock

    def _other(self, queue: str) -> zmq.Socket:
        """The DEALER towards another queue of the same sqm (opened once)."""
        sock = self._others.get(queue)
        if sock is None:
            assert self._ctx is not None
            st = resolve(queue, config=self.config)
            from .links import broker_socket

            sock = broker_socket(self._ctx, self._curve, linger_ms=0)
            sock.connect(st.endpoint)
            self._others[queue] = sock
        return sock

    def _read(self, wait_s: float, mid: str | None) -> None:
        """Feed what waits on the mailbox, the other queues' sockets and (plain) the link;
        block up to ``wait_s`` unless ``mid``'s reply (or any, without ``mid``) is in."""
        socks = [s for s in (self._mailbox, *self._others.values()) if s is not None]
        self._read_all(socks)
        with self._state:
            if (self._core.ready if mid is None else mid in self._core.ready):
                return
        if wait_s > 0 and socks:
            poller = zmq.Poller()
            for s in socks:
                poller.register(s, zmq.POLLIN)
            poller.poll(int(wait_s * 1000) + 1)
            self._read_all(socks)

    def _read_all(self, socks: list[zmq.Socket]) -> None:
        if self._pump is not None:
            self._pump()  # plain runner: sqm's answers on the link, read in this thread
        for s in socks:
            from_broker = s is not self._mailbox
            while True:
                try:
                    frames = recv_frames(s)
                except zmq.Again:
                    break
                with self._state:
                    self._core.feed(frames, from_broker)
