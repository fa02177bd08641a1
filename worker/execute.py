"""Executing a dispatch: the one place that turns a DISPATCH into a call and a reply.

Both runners use :class:`Execution`, so what a message means is written once:
decode the envelope, acknowledge it, find the callback, decode the payload,
call, and answer (the callback's return value unless it answered itself; an
exception becomes a ``RemoteError``). Runners differ only in *how* they call
(in this thread, on an event loop, in a thread pool) and in what they tell
the broker afterwards. Handling that wraps a call (retries, time limits,
cancellation) belongs here too, so both runners get it at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import operator
import time
import traceback
from collections.abc import Callable, Mapping
from types import CoroutineType
from typing import TYPE_CHECKING, Any

import zmq

from sqm import serializers
from sqm.errors import SQMError
from sqm.protocol import (
    ACK,
    COMPACT_MAX,
    ERROR,
    FLAG_ACK,
    FLAG_COMPACT_REPLY,
    PROGRESS,
    RESULT,
    RETRY,
    SIGNATURE,
    Envelope,
    compact_result,
    decode_compact,
    decode_envelope,
    encode_json,
)
from sqm.zmqfast import NOBLOCK, SNDMORE, send_frames, send_raw

from .mailboxes import MailboxLost, MailboxPool
from .retry import Retry, RetryPolicy

if TYPE_CHECKING:
    from .followup import FollowUps

log = logging.getLogger("sqm.worker")
#: Flags of a reply's routing-id frame: more follows, never block.
ROUTE = NOBLOCK | SNDMORE

# fn(worker, originator, payload); the worker is typed in worker.core.
AnyCallback = Callable[[Any, "Originator", Any], Any]
Send = Callable[["Originator", list[bytes]], None]


def is_async_callback(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions (also behind partial or an async ``__call__``)."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - the method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


class Originator:
    """Opaque handle for where a reply goes. Pass it back to :meth:`Worker.respond`.

    ``hops``: how many times workers handed this message on
    (:meth:`Worker.forward`) before it reached this callback.
    """

    __slots__ = ("id", "mailbox", "sertag", "oneway", "responded", "method", "env", "via",
                 "forwarded", "limit_at", "flagged", "pump")

    def __init__(self, msg_id: bytes, mailbox: bytes, sertag: bytes, oneway: bool, method: str,
                 env: Envelope | None = None):
        self.id = msg_id
        self.mailbox = mailbox
        self.sertag = sertag
        self.oneway = oneway
        self.method = method
        self.responded = False
        self.env = env  # the envelope it came in (what a forward keeps)
        self.via: Any = None  # the broker link it came from (None: the only one)
        self.forwarded = False  # handed on with Worker.forward: no reply, no DONE here
        self.limit_at = 0.0  # monotonic time its time limit passes (0: none)
        self.flagged = False  # its sender cancelled it (see cancelled)
        self.pump: Callable[[], None] | None = None  # reads sqm's link (plain runner)

    @property
    def cancelled(self) -> bool:
        """True once the sender (or an operator) cancelled this message: stop early.

        The caller already got ``Cancelled``; whatever this callback answers is dropped.
        """
        if not self.flagged and self.pump is not None:
            self.pump()  # the plain runner reads sqm's CANCEL here, in the callback's thread
        return self.flagged

    @property
    def attempts(self) -> int:
        """How many times this message was retried (Retry) before this run."""
        return self.env.attempts if self.env is not None else 0

    @property
    def time_left(self) -> float | None:
        """Seconds left before the time limit (None without one)."""
        return max(0.0, self.limit_at - time.monotonic()) if self.limit_at else None

    @property
    def message_id(self) -> str:
        return self.id.decode("ascii", "replace")

    @property
    def hops(self) -> int:
        return self.env.hops if self.env is not None else 0

    @property
    def deadline(self) -> float:
        """The caller's deadline (unix seconds, 0: none): a forward keeps it."""
        return self.env.deadline if self.env is not None else 0.0

    @property
    def retries(self) -> int:
        return self.env.retries if self.env is not None else 0

    @property
    def priority(self) -> int:
        return self.env.priority if self.env is not None else 1

    def __repr__(self) -> str:
        return f"<Originator {self.message_id} {self.method}>"


class Workload:
    """How much a worker has done: read by the heartbeat thread, written by a runner.

    ``busy`` is (seconds busy before the current spell, monotonic start of
    it or 0): one tuple, so another thread always reads a consistent pair.
    """

    __slots__ = ("tasks_done", "busy")

    def __init__(self) -> None:
        self.tasks_done = 0
        self.busy = (0.0, 0.0)

    def begin(self) -> None:
        """A busy spell starts (the first callback running)."""
        self.busy = (self.busy[0], time.monotonic())

    def end(self) -> None:
        """The busy spell ends (no callback running any more)."""
        total, since = self.busy
        self.busy = (total + time.monotonic() - since, 0.0)

    @property
    def busy_s(self) -> float:
        """Seconds spent with a callback running, the current spell included."""
        total, since = self.busy
        return total + (time.monotonic() - since if since else 0.0)


# A dispatch ready to run: (originator, callback, decoded payload); or, when
# there is nothing to call, (message id or b"", False).
Call = tuple[Originator, AnyCallback, Any]
Nothing = tuple[bytes, bool]


class Execution:
    """Runs a worker's callbacks on dispatches and sends their replies.

    Replies go through :attr:`send`: straight to the mailbox socket when
    the caller owns the sockets (:meth:`deliver`), or through whatever a
    runner installs with :meth:`route` (the asyncio runner hands sends from
    callback threads to its loop thread).
    """

    def __init__(
        self,
        worker: object,
        worker_id: str,
        callbacks: Mapping[str, AnyCallback],
        *,
        allow_pickle: bool = False,
    ) -> None:
        self.worker = worker  # the first argument of every callback
        self.worker_id = worker_id
        self.callbacks = callbacks
        self.allow_pickle = allow_pickle
        self.mailboxes: MailboxPool | None = None  # set while the worker runs
        self.followups: FollowUps | None = None  # the worker's follow-up messages
        self.abilities = 0  # bumped when the callbacks change: brokers are told (ABILITIES)
        self.send: Send = self.deliver
        self._codecs: dict[bytes, serializers.Serializer] = {}
        #: The worker's heartbeat (ms, ASCII) as ACK's last frame; empty: plain
        #: 3-frame ACKs and no ``running`` record (an Execution without a Worker).
        self.beat_ms = b""
        #: Messages started and not yet answered. The heartbeat thread sends
        #: their ACK each beat (the first one too, unless the envelope's
        #: FLAG_ACK had it sent at the start), so a caller whose broker died
        #: still learns whether the worker lives.
        self.running: dict[bytes, Originator] = {}
        #: Messages with a caller being run: id -> originator (CANCEL finds them here).
        self.active: dict[bytes, Originator] = {}
        self.retry_policy = RetryPolicy()
        self.time_limit = 0.0  # the worker's own limit per callback (0: none)
        #: In a fleet child: ends the process when a callback passes its limit.
        self.watchdog: Any = None
        #: Reads sqm's link from inside a callback (the plain runner's pump), or None.
        self.pump: Callable[[], None] | None = None

    def route(self, send: Send | None) -> None:
        """Send replies through ``send`` from now on (None: straight to the socket)."""
        self.send = self.deliver if send is None else send

    # ------------------------------------------------------------ a dispatch

    def run(self, frames: list[bytes]) -> tuple[bytes, bool | None]:
        """Run one dispatch in this thread. Returns (message id or b"", succeeded).

        Succeeded is None when the callback handed the message on
        (:meth:`forward`): the FORWARD told sqm, no DONE is due.
        """
        try:
            env = decode_envelope(frames[2])
        except ValueError as exc:
            return self._undecodable(exc)
        return self.run_decoded(env, frames[3])

    def run_compact(self, frame: bytes) -> tuple[bytes, bool | None]:
        """:meth:`run` for a compact one-message DISPATCH (one ``SQM1s`` frame):
        its envelope is read in place, not rebuilt as the classic frames first."""
        try:
            env, start = decode_compact(frame)
        except ValueError as exc:
            return self._undecodable(exc)
        return self.run_decoded(env, frame[start:])

    def run_decoded(self, env: Envelope, body: bytes) -> tuple[bytes, bool | None]:
        """:meth:`run` once the envelope is read: ``body`` is the payload."""
        # prepare() and settle(), inlined: the plain runner's hot path, where
        # two calls and a tuple cost 4 % (tests/unit/worker/test_execute.py
        # checks that both ways answer alike).
        msg_id = env.id
        method = env.method.decode("utf-8", "replace")
        orig = Originator(msg_id, env.mailbox, env.serializer, env.oneway, method, env)
        if not orig.oneway:
            beat = self.beat_ms
            if beat:
                self.running[msg_id] = orig
            if env.flags & FLAG_ACK:  # asked for at once; else the heartbeat thread sends it
                self.send(orig, [SIGNATURE, ACK, msg_id, beat] if beat
                          else [SIGNATURE, ACK, msg_id])
        self.active[msg_id] = orig  # CANCEL finds it here (oneway ones too: sqm cancel)
        orig.pump = self.pump
        if env.time_limit or self.time_limit:
            self._limit(orig, env.time_limit)
        fn = self.callbacks.get(method)
        if fn is None:
            self.fail(orig, "UnknownMethod", f"no callback for method {method!r} on this worker")
            return msg_id, False
        try:
            payload = self.codec(env.serializer).loads(body)
        except Exception as exc:
            self.fail(orig, "SerializerError", str(exc))
            return msg_id, False
        try:
            value = fn(self.worker, orig, payload)
            if type(value) is CoroutineType:  # async, but not declared so
                value = asyncio.run(value)
        except Exception as exc:
            if orig.forwarded:
                self.raised_after_forward(orig, exc)
                return orig.id, None
            return orig.id, self.raised(orig, exc)
        if orig.forwarded:
            return orig.id, None
        if orig.responded or orig.oneway:
            if orig.oneway:
                self._oneway_ended(orig)
            return orig.id, True
        try:
            self.respond(orig, value)
        except Exception as exc:
            self.fail(orig, type(exc).__name__, str(exc))
            return orig.id, False
        return orig.id, True

    def prepare(self, frames: list[bytes]) -> Call | Nothing:
        """Decode and acknowledge a dispatch and find its callback.

        Returns the call to make (originator, callback, payload), or (message
        id or b"", False) when there is nothing to call (the sender was
        already told why).
        """
        try:
            env = decode_envelope(frames[2])
        except ValueError as exc:
            return self._undecodable(exc)
        msg_id = env.id
        method = env.method.decode("utf-8", "replace")
        orig = Originator(msg_id, env.mailbox, env.serializer, env.oneway, method, env)
        if not orig.oneway:
            beat = self.beat_ms
            if beat:
                self.running[msg_id] = orig
            if env.flags & FLAG_ACK:  # asked for at once; else the heartbeat thread sends it
                self.send(orig, [SIGNATURE, ACK, msg_id, beat] if beat
                          else [SIGNATURE, ACK, msg_id])
        self.active[msg_id] = orig  # CANCEL finds it here (oneway ones too: sqm cancel)
        orig.pump = self.pump
        if env.time_limit or self.time_limit:
            self._limit(orig, env.time_limit)
        fn = self.callbacks.get(method)
        if fn is None:
            self.fail(orig, "UnknownMethod", f"no callback for method {method!r} on this worker")
            return msg_id, False
        try:
            payload = self.codec(env.serializer).loads(frames[3])
        except Exception as exc:
            self.fail(orig, "SerializerError", str(exc))
            return msg_id, False
        return orig, fn, payload

    def _undecodable(self, exc: ValueError) -> Nothing:
        # sqm validated the envelope: this is a bug, not input
        log.error("worker %s: undecodable dispatch envelope: %s", self.worker_id, exc)
        return b"", False

    def settle(self, orig: Originator, value: Any) -> bool | None:
        """Send a callback's return value unless it answered itself; True if all went well.

        None when the callback handed the message on (no DONE is due).
        """
        if orig.forwarded:
            return None
        if orig.responded or orig.oneway:
            if orig.oneway:
                self._oneway_ended(orig)
            return True
        try:
            self.respond(orig, value)
        except Exception as exc:
            self.fail(orig, type(exc).__name__, str(exc))
            return False
        return True

    def raised_after_forward(self, orig: Originator, exc: BaseException) -> None:
        """A callback raised after handing its message on: the next step answers; log it."""
        log.warning("worker %s: callback for %s raised after forwarding it: %s: %s",
                    self.worker_id, orig, type(exc).__name__, exc)

    def forward(self, orig: Originator, method: str, payload: Any) -> None:
        """Hand ``orig``'s message on to ``method`` (see :meth:`Worker.forward`)."""
        if self.followups is None:
            raise SQMError("worker.forward() is only valid while the worker runs")
        if orig.forwarded or orig.responded:
            raise SQMError(f"message {orig.message_id} was already answered or handed on")
        codec = self.codec(orig.sertag)
        try:
            body = codec.dumps(payload)
        except Exception as exc:
            raise serializers.SerializerError(
                f"cannot encode the forwarded payload with {codec.name}: {exc}") from exc
        self.running.pop(orig.id, None)  # the next step acknowledges it
        self.active.pop(orig.id, None)
        if orig.limit_at:
            self._unwatch(orig)
        frames = self.followups.forward_frames(orig, method, body)
        self.followups.send_forward(frames, orig.via)
        orig.forwarded = orig.responded = True

    def raised(self, orig: Originator, exc: BaseException) -> bool | None:
        """A callback raised: ask sqm for a retry (Retry, ``retry_on``), or log it
        (debug, with the traceback) and tell the sender. False; None when retried
        (RETRY told sqm: no DONE is due)."""
        if isinstance(exc, Retry) or self.retry_policy.retry_on:
            retry = self.retry_policy.decide(exc, orig.attempts)
            if retry is not None and self._retry(orig, retry):
                return None
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.debug("worker %s: callback for %s raised\n%s", self.worker_id, orig, trace.rstrip())
        self.fail(orig, type(exc).__name__, str(exc), trace)
        return False

    def _retry(self, orig: Originator, retry: Retry) -> bool:
        """Tell sqm to run ``orig``'s message again later; False if it cannot be told."""
        if self.followups is None or orig.responded or orig.flagged:
            return False
        if orig.limit_at and time.monotonic() > orig.limit_at:
            return False  # sqm has failed it already (TimeLimitExceeded)
        limit = self.retry_policy.max_retries if retry.max_retries is None else retry.max_retries
        etype, emsg = retry.last_error()
        frames = [SIGNATURE, RETRY, orig.id, b"%d" % int(retry.delay * 1000), b"%d" % limit,
                  encode_json({"type": etype, "message": emsg[:2000]})]
        try:
            self.followups.send_forward(frames, orig.via)
        except SQMError as exc:
            log.warning("worker %s: cannot ask sqm to retry %s: %s", self.worker_id, orig, exc)
            return False
        orig.responded = True
        self.running.pop(orig.id, None)
        self.active.pop(orig.id, None)
        if orig.limit_at:
            self._unwatch(orig)
        log.debug("worker %s: %s retried (%s) in %.3f s", self.worker_id, orig, etype, retry.delay)
        return True

    # ------------------------------------------------------------ time limits, cancel

    def _limit(self, orig: Originator, own: float) -> None:
        """Start ``orig``'s time limit: the smaller of the message's and the worker's."""
        limit = own if not self.time_limit or (own and own < self.time_limit) else self.time_limit
        orig.limit_at = time.monotonic() + limit
        if self.watchdog is not None:
            self.watchdog.watch(orig.id, orig.limit_at)

    def _oneway_ended(self, orig: Originator) -> None:
        """A oneway message's callback is over (it sends no reply that would say so)."""
        self.active.pop(orig.id, None)
        if orig.limit_at:
            self._unwatch(orig)

    def _unwatch(self, orig: Originator) -> None:
        if self.watchdog is not None:
            self.watchdog.unwatch(orig.id)

    def cancel(self, msg_id: bytes) -> None:
        """sqm says the sender cancelled ``msg_id`` (CANCEL): flag it for its callback."""
        orig = self.active.get(msg_id)
        if orig is not None:
            orig.flagged = True

    def _late(self, orig: Originator) -> bool:
        """True (and the answer dropped) when the caller no longer waits: the
        message was cancelled or ran past its time limit (sqm answered for it)."""
        if not orig.flagged and not (orig.limit_at and time.monotonic() > orig.limit_at):
            return False
        orig.responded = True
        self.running.pop(orig.id, None)
        self.active.pop(orig.id, None)
        if orig.limit_at:
            self._unwatch(orig)
        log.info("worker %s: dropped the late answer to %s (%s)", self.worker_id, orig,
                 "cancelled" if orig.flagged else "past its time limit")
        return True

    # ------------------------------------------------------------ replies

    def respond(self, orig: Originator, value: Any) -> None:
        """Send ``value`` as the reply (at most once per message)."""
        if orig.oneway:
            return
        if orig.responded:
            raise SQMError(f"message {orig.message_id} was already answered")
        if (orig.flagged or orig.limit_at) and self._late(orig):
            return
        codec = self.codec(orig.sertag)
        try:
            body = codec.dumps(value)
        except Exception as exc:
            raise serializers.SerializerError(
                f"cannot encode the reply with {codec.name}: {exc}"
            ) from exc
        orig.responded = True
        if self.running:
            self.running.pop(orig.id, None)
        self.active.pop(orig.id, None)
        if orig.limit_at:
            self._unwatch(orig)
        env = orig.env
        if env is not None and env.flags & FLAG_COMPACT_REPLY and len(body) <= COMPACT_MAX:
            self.send(orig, [compact_result(orig.id, body)])  # its mailbox reads one frame
        else:
            self.send(orig, [SIGNATURE, RESULT, orig.id, body])

    def progress(self, orig: Originator, done: int, total: int) -> None:
        """Send PROGRESS unless the message is oneway or already answered."""
        done = operator.index(done)
        total = operator.index(total)
        if done < 0 or total < 0:
            raise ValueError("progress figures must not be negative")
        if orig.oneway or orig.responded:
            return
        self.send(orig, [SIGNATURE, PROGRESS, orig.id, b"%d" % done, b"%d" % total])

    def fail(self, orig: Originator, etype: str, message: str, trace: str = "") -> None:
        """Answer with a RemoteError (or log it, when nobody waits for an answer)."""
        if orig.oneway:
            self._oneway_ended(orig)
        if not orig.responded and (orig.flagged or orig.limit_at) and self._late(orig):
            return
        if orig.oneway or orig.responded:
            if etype != "UnknownMethod":
                log.warning("worker %s: %s in oneway/answered %s: %s",
                            self.worker_id, etype, orig, message)
            return
        orig.responded = True
        if self.running:
            self.running.pop(orig.id, None)
        self.active.pop(orig.id, None)
        if orig.limit_at:
            self._unwatch(orig)
        self.send(orig, [SIGNATURE, ERROR, orig.id, etype.encode(), message.encode(),
                         trace.encode()])

    def codec(self, tag: bytes) -> serializers.Serializer:
        """The serializer for a message's tag (looked up once per tag)."""
        codec = self._codecs.get(tag)
        if codec is None:
            codec = serializers.get(tag.decode("ascii", "replace"), allow_pickle=self.allow_pickle)
            self._codecs[tag] = codec
        return codec

    def deliver(self, orig: Originator, frames: list[bytes]) -> None:
        """Send to a sender's mailbox (from the thread that owns the sockets).

        One ROUTER reaches every mailbox: the connection's routing-id frame
        (made once per connection) goes first with SNDMORE, then the frames.
        """
        pool = self.mailboxes
        assert pool is not None, "respond() is only valid while the worker runs"
        try:
            head = pool.get(orig.mailbox)
        except MailboxLost:
            log.debug("worker %s: mailbox %r unreachable or refused us lately; reply dropped",
                      self.worker_id, orig.mailbox[:80])
            return
        except ValueError as exc:
            log.warning("worker %s: refusing mailbox %r: %s",
                        self.worker_id, orig.mailbox[:80], exc)
            return
        except zmq.ZMQError as exc:  # e.g. the context's socket limit: keep serving
            log.error("worker %s: cannot open mailbox %r: %s",
                      self.worker_id, orig.mailbox[:80], exc)
            return
        sock = pool.sock
        assert sock is not None  # get() made it
        try:
            send_raw(sock, head[0], ROUTE)  # atomic: refused here or the whole message goes
            send_frames(sock, frames)
        except zmq.Again:
            log.debug("worker %s: mailbox %r not keeping up; reply dropped",
                      self.worker_id, orig.mailbox)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # the mailbox refused our handshake
                pool.lost(orig.mailbox, str(exc), refused=True)
            else:
                log.error("worker %s: cannot send to mailbox %r: %s",
                          self.worker_id, orig.mailbox[:80], exc)
