"""The Worker: takes messages from sqm, runs callbacks, replies to mailboxes.

Two runners share this class. The plain one (this module) serves one broker
with synchronous callbacks, one message after another, blocking in ``recv``:
the fastest path. The asyncio one (:mod:`worker.aio`) takes over when there
is more than one broker, more than one callback at a time, or an ``async
def`` callback.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import operator
import os
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from types import CoroutineType
from typing import Any

import zmq

from sqm import protocol, serializers
from sqm.config import resolve
from sqm.errors import SQMError
from sqm.protocol import (
    ACK,
    BYE,
    DISPATCH,
    DONE,
    DONE_FAILED,
    ERROR,
    HEARTBEAT,
    HELLO,
    PROGRESS,
    RESULT,
    SIGNATURE,
    STOP,
    MailboxPolicy,
    decode_envelope,
)
from sqm.sockets import make_socket
from sqm.zmqfast import RCVTIMEO, recv_frames, send_frames
from sqm.zmqfast import set_option as _set_option

from . import selfreport
from .links import BrokerLink
from .mailboxes import MailboxPool

log = logging.getLogger("sqm.worker")

Callback = Callable[["Worker", "Originator", Any], Any]
_counter = itertools.count(1)


def is_async_callback(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions (also behind partial or an async ``__call__``)."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - the method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


class Originator:
    """Opaque handle for where a reply goes. Pass it back to :meth:`Worker.respond`."""

    __slots__ = ("id", "mailbox", "sertag", "oneway", "responded", "method")

    def __init__(self, msg_id: bytes, mailbox: bytes, sertag: bytes, oneway: bool, method: str):
        self.id = msg_id
        self.mailbox = mailbox
        self.sertag = sertag
        self.oneway = oneway
        self.method = method
        self.responded = False

    @property
    def message_id(self) -> str:
        return self.id.decode("ascii", "replace")

    def __repr__(self) -> str:
        return f"<Originator {self.message_id} {self.method}>"


class Worker:
    """Serve a queue with callbacks ``fn(worker, originator, payload)``.

    ``context`` lets many Workers in one process share one ZeroMQ context
    (one I/O thread) instead of each creating its own. Each Worker uses 4
    sockets per broker plus one per sender it is replying to (at most
    ``max_mailboxes``): raise the context's ``max_sockets`` (default 1023)
    when sharing it among many Workers.

    ``concurrency`` is how many callbacks run at once: ``async def``
    callbacks as tasks on an asyncio event loop inside the worker, plain
    ones in a pool of that many threads. ``prefetch`` is how many messages
    sqm may hand this worker at once (its slots, at least ``concurrency``);
    the ones beyond ``concurrency`` wait here for a turn. Prefetch raises
    throughput at the cost of head-of-line blocking: a message may wait
    behind a slow one on this worker while another worker is idle.

    ``endpoint`` may name several brokers (a list, or a comma-separated
    string): the worker registers with each and takes work from any, never
    holding more than its slots; a dispatch that finds it full goes back to
    its broker at once (NACK) for another worker to take.

    The callback's return value is the reply unless it called
    :meth:`respond` itself; an exception becomes a ``RemoteError`` at the
    sender and the worker carries on. Heartbeats go out from a background
    thread, so a long callback does not look like a dead worker, and carry
    a self-report (memory, nice, busy time) that ``sqm status`` shows. If
    sqm restarts, the worker registers again by itself. When sqm sends STOP
    (``sqm stop-worker``) it leaves like :meth:`terminate` and sets
    ``stop_requested``.
    """

    def __init__(
        self,
        queue: str | None = None,
        *,
        callbacks: Mapping[str, Callback] | None = None,
        endpoint: str | list[str] | tuple[str, ...] | None = None,
        config: str | dict[str, Any] | None = None,
        heartbeat: float | None = None,
        allow_pickle: bool = False,
        max_mailboxes: int = 64,
        mailbox_idle_s: float = 60.0,
        prefetch: int = 1,
        concurrency: int = 1,
        context: zmq.Context | None = None,
    ) -> None:
        self.settings = resolve(queue, endpoint=endpoint, config=config)
        self.queue = self.settings.queue
        self.endpoints = self.settings.endpoints
        self.endpoint = self.settings.endpoint
        self.heartbeat = float(heartbeat or self.settings.get("heartbeat", 1.0))
        self.liveness = 3
        self.allow_pickle = allow_pickle
        for name, value in (("prefetch", prefetch), ("concurrency", concurrency)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000:
                raise ValueError(f"{name} must be an int between 1 and 10000")
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.slots = max(prefetch, concurrency)  # what sqm may hand us at once
        self._shared_ctx = context  # many Workers in one process may share one
        self.max_mailboxes = max_mailboxes
        self.mailbox_idle_s = mailbox_idle_s
        self._callbacks: dict[str, Callback] = {}
        self._codecs: dict[bytes, serializers.Serializer] = {}
        if callbacks:
            self.callbacks(**dict(callbacks))
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.id = f"{self.host}:{self.pid}:{next(_counter)}:{secrets.token_hex(2)}"
        self._rid = b"W" + self.id.encode()
        self.started_at = time.time()
        self.tasks_done = 0
        # (seconds busy before the current spell, monotonic start of it or 0):
        # one tuple so the heartbeat thread reads a consistent pair.
        self._busy = (0.0, 0.0)
        self.stop_requested = False  # sqm asked this worker to stop (STOP)
        self._stop = threading.Event()
        self._hb_stop = threading.Event()
        self._pool: MailboxPool | None = None
        self._running = False
        # Set while the asyncio runner serves: replies from callback threads
        # are handed to the loop's thread, which owns every socket.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: Callable[[], None] | None = None

    # ------------------------------------------------------------ public API

    def callbacks(self, **fns: Callback) -> Worker:
        """Add or replace callbacks by method name."""
        for name, fn in fns.items():
            if not callable(fn):
                raise TypeError(f"callback for {name!r} is not callable")
            self._callbacks[name] = fn
        return self

    def respond(self, originator: Originator, value: Any) -> None:
        """Send ``value`` as the reply to ``originator`` (at most once per message)."""
        if originator.oneway:
            return
        if originator.responded:
            raise SQMError(f"message {originator.message_id} was already answered")
        codec = self._codec(originator.sertag)
        try:
            body = codec.dumps(value)
        except Exception as exc:
            raise serializers.SerializerError(
                f"cannot encode the reply with {codec.name}: {exc}"
            ) from exc
        originator.responded = True
        self._to_mailbox(originator, [SIGNATURE, RESULT, originator.id, body])

    def progress(self, originator: Originator, done: int, total: int) -> None:
        """Tell the originator how far along its message is (Gearman's WORK_STATUS).

        Goes straight to the sender's mailbox, in order with the reply; the
        Sender reports it as ``on_status(done, total)``. Nothing is sent for
        oneway messages or once the message was answered.
        """
        done = operator.index(done)
        total = operator.index(total)
        if done < 0 or total < 0:
            raise ValueError("progress figures must not be negative")
        if originator.oneway or originator.responded:
            return
        self._to_mailbox(originator, [SIGNATURE, PROGRESS, originator.id,
                                      b"%d" % done, b"%d" % total])

    def terminate(self) -> None:
        """Finish the message in hand, tell sqm we are gone, and make run() return."""
        self._stop.set()  # the plain runner notices within heartbeat/2 or at the next message
        wake = self._wake
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the loop has just closed: nothing left to wake
                pass

    @property
    def busy_s(self) -> float:
        """Seconds spent with a callback running, the current one included."""
        total, since = self._busy
        return total + (time.monotonic() - since if since else 0.0)

    # ------------------------------------------------------------ run loop

    def run(self) -> None:
        """Serve until terminate(), SIGTERM, SIGINT or sqm's STOP."""
        if self._running:
            raise SQMError("this Worker is already running")
        self._running = True
        self._stop.clear()
        self._hb_stop.clear()
        self.stop_requested = False
        restore = self._install_signals()
        ctx = self._shared_ctx or zmq.Context()
        self._pool = MailboxPool(
            ctx,
            MailboxPolicy.for_settings(self.settings),
            max_open=self.max_mailboxes,
            idle_s=self.mailbox_idle_s,
        )
        hb = threading.Thread(target=self._heartbeat_loop, args=(ctx,), daemon=True,
                              name=f"sqm-heartbeat-{self.id}")
        try:
            hb.start()
            if self._needs_loop():
                from .aio import AsyncRunner

                AsyncRunner(self, ctx).run()
            else:
                self._run_plain(ctx)
        finally:
            self._stop.set()
            self._hb_stop.set()
            hb.join(timeout=self.heartbeat * 2)
            self._pool.close()
            if self._shared_ctx is None:
                ctx.term()
            restore()
            self._running = False
            log.info("worker %s stopped after %d task(s)", self.id, self.tasks_done)

    def _needs_loop(self) -> bool:
        """The asyncio runner is needed for several brokers, concurrency or async callbacks."""
        return (len(self.endpoints) > 1 or self.concurrency > 1
                or any(is_async_callback(fn) for fn in self._callbacks.values()))

    def _run_plain(self, ctx: zmq.Context) -> None:
        """One broker, one callback at a time: block in recv, the fewest system calls."""
        link = BrokerLink(self.endpoint, self._rid)
        sock = link.open(ctx)
        self._hello(link)
        log.info("worker %s serving queue %s at %s", self.id, self.queue, self.endpoint)
        # Block in recv (the GIL released) rather than poll several sockets:
        # fewer system calls per message. Chores run at most every `chore_s`.
        chore_s = self.heartbeat / 2
        try:
            while not self._stop.is_set():
                _set_option(sock, RCVTIMEO, max(1, int(chore_s * 1000)))
                reconnect = False
                next_chores = 0.0
                while not self._stop.is_set():
                    try:
                        frames = recv_frames(sock, 0)
                    except zmq.Again:  # receive timeout: time for chores
                        frames = None
                    now = time.monotonic()
                    if frames is not None:
                        link.last_heard = now
                        if (len(frames) == protocol.SUBMIT_FRAMES and frames[1] == DISPATCH
                                and frames[0] == SIGNATURE):
                            self._handle(link, frames)
                        else:
                            self._on_control(link, frames)
                        if now < next_chores:
                            continue
                    next_chores = now + chore_s
                    if link.reconnected():
                        self._hello(link)  # sqm came back (restart): register again now
                    if link.silent(now, self.heartbeat, self.liveness):
                        reconnect = True
                        break
                    self._pool.expire(now)
                if reconnect:
                    log.info("worker %s: sqm silent, reconnecting to %s", self.id, link.endpoint)
                    link.close(0)
                    sock = link.open(ctx)
                    self._hello(link)
            self._leave(link)
        finally:
            link.close(linger_ms=1000)

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, lambda *_: self.terminate())

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore

    def _hello(self, link: BrokerLink) -> None:
        """Register with one broker (again): it forgets what it had parked."""
        info = {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "slots": self.slots,
            "concurrency": self.concurrency,
            "heartbeat": self.heartbeat,
            "methods": sorted(self._callbacks),
            "version": protocol.SIGNATURE.decode(),
        }
        link.parked = 0
        link.send([SIGNATURE, HELLO, protocol.encode_json(info)])

    def _on_control(self, link: BrokerLink, frames: list[bytes]) -> None:
        """Anything from a broker but a dispatch (both runners)."""
        if len(frames) < 2 or frames[0] != SIGNATURE:
            return
        cmd = frames[1]
        if cmd == HEARTBEAT:
            if len(frames) == 3 and frames[2].isdigit():
                link.broker_heartbeat = max(0.001, int(frames[2]) / 1000)
        elif cmd == BYE:
            if link.bye_sent:
                link.bye_acked = True  # our leave is acknowledged: nothing more will come
            else:
                self._hello(link)  # sqm restarted or is stopping: say hello again
        elif cmd == STOP:
            if not self._stop.is_set():
                log.info("worker %s: sqm at %s asked it to stop", self.id, link.endpoint)
            self.stop_requested = True
            self.terminate()
        else:
            log.debug("worker %s: ignoring command %r", self.id, cmd[:8])

    def _leave(self, link: BrokerLink) -> None:
        """Tell sqm we go; finish whatever it dispatched before it acknowledged."""
        if not link.send_bye():
            return
        sock = link.sock
        deadline = time.monotonic() + self.heartbeat * self.liveness
        while not link.bye_acked:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                return  # sqm is gone: nothing more can arrive
            frames = recv_frames(sock, 0)
            if len(frames) == protocol.SUBMIT_FRAMES and frames[1] == DISPATCH:
                self._handle(link, frames)
            else:
                self._on_control(link, frames)

    def _handle(self, link: BrokerLink, frames: list[bytes]) -> None:
        try:
            env = decode_envelope(frames[2])
        except ValueError as exc:  # sqm validated it: this is a bug, not input
            log.error("worker %s: undecodable dispatch envelope: %s", self.id, exc)
            return
        msg_id = env.id
        sertag = env.serializer
        body = frames[3]
        method = env.method.decode("utf-8", "replace")
        orig = Originator(msg_id, env.mailbox, sertag, env.oneway, method)
        if not orig.oneway:
            self._to_mailbox(orig, [SIGNATURE, ACK, msg_id])
        started = time.monotonic()
        busy_before = self._busy[0]
        self._busy = (busy_before, started)
        ok = False
        try:
            fn = self._callbacks.get(method)
            if fn is None:
                self._fail(orig, "UnknownMethod", f"no callback for method {method!r} on this worker")
            else:
                try:
                    payload = self._codec(sertag).loads(body)
                except Exception as exc:
                    self._fail(orig, "SerializerError", str(exc))
                else:
                    try:
                        value = fn(self, orig, payload)
                        if type(value) is CoroutineType:  # async, but not declared so
                            value = asyncio.run(value)
                    except Exception as exc:
                        self._fail(orig, type(exc).__name__, str(exc), traceback.format_exc())
                    else:
                        if not orig.responded and not orig.oneway:
                            try:
                                self.respond(orig, value)
                                ok = True
                            except Exception as exc:
                                self._fail(orig, type(exc).__name__, str(exc))
                        else:
                            ok = True
        finally:
            self.tasks_done += 1
            self._busy = (busy_before + time.monotonic() - started, 0.0)
            if self._stop.is_set():
                # Say BYE before DONE, or sqm would refill the slot DONE frees.
                link.send_bye()
            try:
                send_frames(link.sock, [SIGNATURE, DONE if ok else DONE_FAILED, msg_id])
            except zmq.ZMQError:
                pass

    def _reply(self, orig: Originator, value: Any) -> bool:
        """Send a callback's return value unless it answered itself; True if all went well."""
        if orig.responded or orig.oneway:
            return True
        try:
            self.respond(orig, value)
        except Exception as exc:
            self._fail(orig, type(exc).__name__, str(exc))
            return False
        return True

    def _codec(self, tag: bytes) -> serializers.Serializer:
        """The serializer for a message's tag (looked up once per tag)."""
        codec = self._codecs.get(tag)
        if codec is None:
            codec = serializers.get(tag.decode("ascii", "replace"), allow_pickle=self.allow_pickle)
            self._codecs[tag] = codec
        return codec

    def _fail(self, orig: Originator, etype: str, message: str, trace: str = "") -> None:
        if orig.oneway or orig.responded:
            if etype != "UnknownMethod":
                log.warning("worker %s: %s in oneway/answered %s: %s", self.id, etype, orig, message)
            return
        orig.responded = True
        self._to_mailbox(
            orig, [SIGNATURE, ERROR, orig.id, etype.encode(), message.encode(), trace.encode()]
        )

    def _to_mailbox(self, orig: Originator, frames: list[bytes]) -> None:
        """Send to a sender's mailbox (from the thread that owns the sockets)."""
        assert self._pool is not None, "respond() is only valid while the worker runs"
        try:
            sock = self._pool.get(orig.mailbox)
        except ValueError as exc:
            log.warning("worker %s: refusing mailbox %r: %s", self.id, orig.mailbox[:80], exc)
            return
        except zmq.ZMQError as exc:  # e.g. the context's socket limit: keep serving
            log.error("worker %s: cannot open mailbox %r: %s", self.id, orig.mailbox[:80], exc)
            return
        try:
            send_frames(sock, frames)
        except zmq.Again:
            log.debug("worker %s: mailbox %r not keeping up; reply dropped", self.id, orig.mailbox)

    def _to_mailbox_any_thread(self, orig: Originator, frames: list[bytes]) -> None:
        """:meth:`_to_mailbox` while the asyncio runner serves (it installs this one).

        Callback threads hand the send to the loop's thread, which owns every
        socket; the loop runs them in call order, so replies stay in order.
        The plain runner never pays for the check.
        """
        if threading.get_ident() == self._loop_thread:
            Worker._to_mailbox(self, orig, frames)
            return
        try:
            self._loop.call_soon_threadsafe(Worker._to_mailbox, self, orig, frames)
        except RuntimeError:
            log.warning("worker %s: reply for %s after the worker stopped", self.id, orig)

    # ------------------------------------------------------------ heartbeats

    def _heartbeat_loop(self, ctx: zmq.Context) -> None:
        """Own sockets, own thread: keeps beating (with a self-report) while callbacks run."""
        socks: list[zmq.Socket] = []
        wid = self.id.encode()
        try:
            for endpoint in self.endpoints:
                sock = make_socket(ctx, zmq.DEALER, linger_ms=0)
                socks.append(sock)
                sock.connect(endpoint)
            while not self._hb_stop.wait(self.heartbeat):
                try:
                    frames = [SIGNATURE, HEARTBEAT, wid, selfreport.encode(self)]
                except Exception:  # never let a report stop the heartbeats
                    log.exception("worker %s: cannot build its self-report", self.id)
                    frames = [SIGNATURE, HEARTBEAT, wid]
                for sock in socks:
                    try:
                        sock.send_multipart(frames, zmq.NOBLOCK)
                    except zmq.Again:
                        pass
        finally:
            for sock in socks:
                sock.close(0)
