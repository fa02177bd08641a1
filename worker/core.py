"""The Worker: takes messages from sqm, runs callbacks, replies to mailboxes."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

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
    RESULT,
    SIGNATURE,
    MailboxPolicy,
    decode_envelope,
)
from sqm.sockets import make_socket
from sqm.zmqfast import RCVTIMEO, recv_frames, send_frames
from sqm.zmqfast import set_option as _set_option

from .mailboxes import MailboxPool

log = logging.getLogger("sqm.worker")

Callback = Callable[["Worker", "Originator", Any], Any]
_counter = itertools.count(1)


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
    sockets plus one per sender it is replying to (at most
    ``max_mailboxes``): raise the context's ``max_sockets`` (default 1023)
    when sharing it among many Workers.

    ``prefetch`` is how many messages sqm may hand this worker at once (its
    credit). The default, 1, gives work only to idle workers; more raises
    throughput at the cost of head-of-line blocking: a message may wait
    behind a slow one on this worker while another worker is idle.

    The callback's return value is the reply unless it called
    :meth:`respond` itself; an exception becomes a ``RemoteError`` at the
    sender and the worker carries on. Heartbeats go out from a background
    thread, so a long callback does not look like a dead worker. If sqm
    restarts, the worker registers again by itself.
    """

    def __init__(
        self,
        queue: str | None = None,
        *,
        callbacks: Mapping[str, Callback] | None = None,
        endpoint: str | None = None,
        config: str | dict[str, Any] | None = None,
        heartbeat: float | None = None,
        allow_pickle: bool = False,
        max_mailboxes: int = 64,
        mailbox_idle_s: float = 60.0,
        prefetch: int = 1,
        context: zmq.Context | None = None,
    ) -> None:
        self.settings = resolve(queue, endpoint=endpoint, config=config)
        self.queue = self.settings.queue
        self.endpoint = self.settings.endpoint
        self.heartbeat = float(heartbeat or self.settings.get("heartbeat", 1.0))
        self.liveness = 3
        self.allow_pickle = allow_pickle
        if not isinstance(prefetch, int) or not 1 <= prefetch <= 10_000:
            raise ValueError("prefetch must be an int between 1 and 10000")
        self.prefetch = prefetch
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
        self.started_at = time.time()
        self.tasks_done = 0
        self.busy_s = 0.0
        self._stop = threading.Event()
        self._hb_stop = threading.Event()
        self._pool: MailboxPool | None = None
        self._running = False
        self._bye_sent = False
        self._broker_heartbeat = 0.0

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

    def _codec(self, tag: bytes) -> serializers.Serializer:
        """The serializer for a message's tag (looked up once per tag)."""
        codec = self._codecs.get(tag)
        if codec is None:
            codec = serializers.get(tag.decode("ascii", "replace"), allow_pickle=self.allow_pickle)
            self._codecs[tag] = codec
        return codec

    def terminate(self) -> None:
        """Finish the message in hand, tell sqm we are gone, and make run() return."""
        self._stop.set()  # run() notices within heartbeat/2, or as soon as a message arrives

    # ------------------------------------------------------------ run loop

    def run(self) -> None:
        """Serve until terminate(), SIGTERM or SIGINT."""
        if self._running:
            raise SQMError("this Worker is already running")
        self._running = True
        self._stop.clear()
        self._hb_stop.clear()
        self._bye_sent = False
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
        sock, monitor = self._connect(ctx)
        hb.start()
        log.info("worker %s serving queue %s at %s", self.id, self.queue, self.endpoint)
        last_heard = time.monotonic()
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
                        last_heard = now
                        if self._on_frames(sock, frames):
                            self._hello(sock)
                        if now < next_chores:
                            continue
                    next_chores = now + chore_s
                    if monitor.poll(0):
                        self._drain_monitor(monitor, sock)
                    if now - last_heard > self.liveness * max(self.heartbeat,
                                                              self._broker_heartbeat):
                        reconnect = True
                        break
                    self._pool.expire(now)
                if reconnect:
                    log.info("worker %s: sqm silent, reconnecting to %s", self.id, self.endpoint)
                    monitor.close(0)
                    sock.close(0)
                    sock, monitor = self._connect(ctx)
                    last_heard = time.monotonic()
            self._leave(sock)
        finally:
            self._stop.set()
            self._hb_stop.set()
            hb.join(timeout=self.heartbeat * 2)
            sock.disable_monitor()
            monitor.close(0)
            sock.close(linger=1000)
            self._pool.close()
            if self._shared_ctx is None:
                ctx.term()
            restore()
            self._running = False
            log.info("worker %s stopped after %d task(s)", self.id, self.tasks_done)

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

    def _connect(self, ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        sock = make_socket(ctx, zmq.DEALER, routing_id=b"W" + self.id.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self._hello(sock)
        self._was_disconnected = False
        return sock, monitor

    def _hello(self, sock: zmq.Socket) -> None:
        info = {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "slots": self.prefetch,
            "heartbeat": self.heartbeat,
            "methods": sorted(self._callbacks),
            "version": protocol.SIGNATURE.decode(),
        }
        sock.send_multipart([SIGNATURE, HELLO, protocol.encode_json(info)], zmq.NOBLOCK)

    def _drain_monitor(self, monitor: zmq.Socket, sock: zmq.Socket) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._was_disconnected = True
            elif event == zmq.EVENT_CONNECTED and self._was_disconnected:
                # sqm came back (restart): register again without waiting.
                self._was_disconnected = False
                self._hello(sock)

    def _on_frames(self, sock: zmq.Socket, frames: list[bytes]) -> bool:
        """Handle one message from sqm. True if sqm asked us to register again."""
        if len(frames) < 2 or frames[0] != SIGNATURE:
            return False
        cmd = frames[1]
        if cmd == DISPATCH and len(frames) == protocol.SUBMIT_FRAMES:
            self._handle(sock, frames)
        elif cmd == BYE:
            return True  # sqm restarted or is stopping: say hello again
        elif cmd == HEARTBEAT:
            if len(frames) == 3 and frames[2].isdigit():
                self._broker_heartbeat = max(0.001, int(frames[2]) / 1000)
        else:
            log.debug("worker %s: ignoring command %r", self.id, cmd)
        return False

    def _send_bye(self, sock: zmq.Socket) -> bool:
        """Send BYE once per run; False if it cannot be sent."""
        if self._bye_sent:
            return True
        try:
            sock.send_multipart([SIGNATURE, BYE], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        self._bye_sent = True
        return True

    def _leave(self, sock: zmq.Socket) -> None:
        """Tell sqm we go; finish whatever it dispatched before it acknowledged."""
        if not self._send_bye(sock):
            return
        deadline = time.monotonic() + self.heartbeat * self.liveness
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                return  # sqm is gone: nothing more can arrive
            frames = recv_frames(sock, 0)
            if len(frames) < 2 or frames[0] != SIGNATURE:
                continue
            if frames[1] == DISPATCH and len(frames) == protocol.SUBMIT_FRAMES:
                self._handle(sock, frames)
            elif frames[1] == BYE:
                return

    def _handle(self, sock: zmq.Socket, frames: list[bytes]) -> None:
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
            self.busy_s += time.monotonic() - started
            if self._stop.is_set():
                # Say BYE before DONE, or sqm would refill the slot DONE frees.
                self._send_bye(sock)
            try:
                send_frames(sock, [SIGNATURE, DONE if ok else DONE_FAILED, msg_id])
            except zmq.ZMQError:
                pass

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

    # ------------------------------------------------------------ heartbeats

    def _heartbeat_loop(self, ctx: zmq.Context) -> None:
        """Own socket, own thread: keeps beating while a callback runs."""
        sock = make_socket(ctx, zmq.DEALER, linger_ms=0)
        sock.connect(self.endpoint)
        frames = [SIGNATURE, HEARTBEAT, self.id.encode()]
        try:
            while not self._hb_stop.wait(self.heartbeat):
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            sock.close(0)
