"""The broker's I/O: ROUTER sockets and a poll loop around :class:`QueueCore`.

Everything that decides lives in :mod:`sqm.core`; this module only turns
frames into core calls and the core's outbox into frames. It never decodes a
payload. Per message it does no logging and no work beyond reading the
envelope frames.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

import zmq

from . import __version__, protocol
from .config import QueueSettings
from .core import OUT_BYE, OUT_DISPATCH, OUT_FAIL, OUT_HEARTBEAT, Message, QueueCore
from .errors import ConfigError
from .protocol import (
    BYE,
    DISPATCH,
    DONE,
    DONE_FAILED,
    ERROR,
    HEAD,
    HEARTBEAT,
    HELLO,
    SIGNATURE,
    STATUS,
    SUBMIT,
    SUBMIT_FRAMES,
    MailboxPolicy,
    envelope_id,
    read_head,
)
from .sockets import ensure_ipc_dir, ipc_listener_alive, make_socket
from .zmqfast import RCVTIMEO, recv_frame, recv_rest, send_frames, send_more, set_option

log = logging.getLogger("sqm.broker")

BATCH = 256  # messages read from one socket per poll wake-up


@dataclass
class BrokerOptions:
    heartbeat: float = 1.0
    liveness: int = 3
    max_pending: int = 100_000
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE
    max_deliveries: int | None = None


class QueueServer:
    """One queue: its settings, its core and its bound ROUTER socket."""

    def __init__(self, ctx: zmq.Context, settings: QueueSettings, opts: BrokerOptions, now: float):
        self.settings = settings
        self.name = settings.queue
        self.core = QueueCore(
            settings.queue,
            now,
            heartbeat=opts.heartbeat,
            liveness=opts.liveness,
            max_pending=opts.max_pending,
            max_message_size=opts.max_message_size,
            max_deliveries=opts.max_deliveries,
        )
        self.policy = MailboxPolicy.for_settings(settings)
        self._mailbox_ok: dict[bytes, bytes] = {}  # sender rid -> last validated mailbox
        self.max_frame = opts.max_message_size + 64 * 1024
        self.bind = settings.bind
        if ipc_listener_alive(self.bind):
            raise ConfigError(f"queue {self.name!r} is already served at {self.bind}")
        ensure_ipc_dir(self.bind)
        self.sock = make_socket(ctx, zmq.ROUTER, linger_ms=1000)
        try:
            self.sock.bind(self.bind)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            raise ConfigError(f"cannot bind {self.bind} for queue {self.name!r}: {exc}") from None
        self.sent_dropped = 0
        # Heartbeats carry our interval (ms) so workers judge our silence by it.
        self._heartbeat_frames = [SIGNATURE, HEARTBEAT, b"%d" % int(opts.heartbeat * 1000)]

    # -------------------------------------------------------------- input

    def drain(self, now: float) -> None:
        """Handle up to BATCH waiting messages, then send the core's outbox."""
        sock = self.sock
        for _ in range(BATCH):
            try:
                rid_frame = recv_frame(sock)
            except zmq.Again:
                break
            self.handle_one(rid_frame, now)
        self.flush(now)

    def handle_one(self, rid_frame: zmq.Frame, now: float) -> None:
        """Read the rest of the message that starts with ``rid_frame`` and handle it."""
        frames = recv_rest(self.sock, rid_frame)
        try:
            self.handle(rid_frame, frames, now)
        except Exception:  # a bug must not stop sqm: count, log, carry on
            self.core.malformed_total += 1
            log.exception("queue %s: failed to handle a message", self.name)

    def handle(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        rid = rid_frame.bytes
        n = len(frames)
        if n < 2 or frames[0] != SIGNATURE:
            self._malformed(rid, frames, "missing sqm signature frame")
            return
        cmd = frames[1]
        if cmd == SUBMIT:
            if n != SUBMIT_FRAMES:
                self._malformed(rid, frames, f"submit needs {SUBMIT_FRAMES} frames, got {n}")
                return
            env = frames[2]
            try:
                flags, retries, priority, deadline, id_end, mailbox_end, _ = read_head(env)
            except ValueError:
                self._malformed(rid, frames, "invalid submit envelope")
                return
            mailbox = env[id_end:mailbox_end]
            if self._mailbox_ok.get(rid) != mailbox:
                reason = self._check_mailbox(rid_frame, mailbox)
                if reason:
                    self._malformed(rid, frames, f"mailbox refused: {reason}")
                    return
            frames[1] = DISPATCH  # forwarded as is: only the command changes
            self.core.submit(
                now,
                Message(
                    env[HEAD:id_end],
                    rid,
                    frames,
                    size=len(frames[3]),
                    oneway=bool(flags & protocol.FLAG_ONEWAY),
                    retries=retries,
                    priority=priority,
                    deadline=deadline,
                ),
            )
        elif cmd == DONE or cmd == DONE_FAILED:
            if n != 3:
                self._malformed(rid, frames, "done needs 3 frames")
            elif not self.core.done(now, rid, frames[2], cmd == DONE):
                self._reregister(rid)
        elif cmd == HEARTBEAT:
            if n == 3:  # from a worker's heartbeat thread, naming the worker
                self.core.seen_id(now, frames[2].decode("utf-8", "replace"))
            elif not self.core.seen(now, rid):
                self._reregister(rid)
        elif cmd == HELLO:
            info = self._decode_info(frames)
            if info is None:
                self._malformed(rid, frames, "hello needs a JSON object")
                return
            w = self.core.hello(now, rid, info)
            log.info(
                "queue %s: worker %s registered (host %s pid %s, %d slot(s))",
                self.name, w.id, info.get("host"), info.get("pid"), w.slots,
            )
        elif cmd == BYE:
            if rid in self.core.workers:
                log.info("queue %s: worker %s left", self.name, self.core.workers[rid].id)
            self.core.bye(now, rid)
        elif cmd == STATUS:
            self._send(rid, [SIGNATURE, STATUS, json.dumps(self.status(now)).encode()])
        else:
            self._malformed(rid, frames, f"unknown command {cmd[:8]!r}")

    @staticmethod
    def _decode_info(frames: list[bytes]) -> dict[str, Any] | None:
        if len(frames) != 3 or len(frames[2]) > 64 * 1024:
            return None
        try:
            info = json.loads(frames[2])
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _check_mailbox(self, rid_frame: zmq.Frame, mailbox: bytes) -> str | None:
        try:
            addr = mailbox.decode("ascii")
        except UnicodeDecodeError:
            return "mailbox is not ASCII"
        try:
            peer = rid_frame.get("Peer-Address")
        except zmq.ZMQError:
            peer = None
        reason = self.policy.check(addr, peer)
        if reason is None:
            if len(self._mailbox_ok) > 100_000:
                self._mailbox_ok.clear()
            self._mailbox_ok[rid_frame.bytes] = mailbox
        return reason

    def _malformed(self, rid: bytes, frames: list[bytes], why: str) -> None:
        """Count and drop; tell the originator when it can be identified."""
        self.core.malformed_total += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("queue %s: malformed input from %s: %s", self.name, rid.hex(), why)
        elif self.core.malformed_total in (1, 10, 100) or self.core.malformed_total % 1000 == 0:
            log.warning(
                "queue %s: dropped malformed input (%d so far): %s",
                self.name, self.core.malformed_total, why,
            )
        if len(frames) >= 3 and frames[0] == SIGNATURE and frames[1] == SUBMIT:
            msg_id = envelope_id(frames[2])
            if msg_id:
                self._send(rid, [SIGNATURE, ERROR, msg_id, b"Malformed", why.encode(), b"{}"])

    def _reregister(self, rid: bytes) -> None:
        """An unknown worker talks to us (we restarted): ask it to say hello."""
        self._send(rid, [SIGNATURE, BYE])

    # -------------------------------------------------------------- output

    def flush(self, now: float) -> None:
        core = self.core
        out = core.outbox
        if not out:
            return
        sock = self.sock
        i = 0
        while i < len(out):  # the core may append while we send (unreachable workers)
            entry = out[i]
            i += 1
            kind = entry[0]
            if kind == OUT_DISPATCH:
                rid = entry[1]
                msg = entry[2]
                try:
                    send_more(sock, rid)
                except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not keeping up)
                    core.unreachable(now, rid, msg)
                    continue
                send_frames(sock, msg.frames)
            elif kind == OUT_FAIL:
                msg = entry[1]
                detail = b'{"deliveries":%d}' % msg.deliveries
                self._send(
                    msg.origin,
                    [SIGNATURE, ERROR, msg.id, entry[2].encode(), entry[3].encode(), detail],
                )
            elif kind == OUT_HEARTBEAT:
                self._send(entry[1], self._heartbeat_frames)
            elif kind == OUT_BYE:
                self._send(entry[1], [SIGNATURE, BYE])
        out.clear()

    def _send(self, rid: bytes, frames: list[bytes]) -> None:
        try:
            send_more(self.sock, rid)
        except zmq.ZMQError:
            self.sent_dropped += 1  # peer gone or not keeping up: nothing to wait for
            return
        send_frames(self.sock, frames)

    def status(self, now: float) -> dict[str, Any]:
        data = self.core.status(now)
        data.update(
            send_dropped_total=self.sent_dropped,
            endpoint=self.settings.endpoint,
            broker={"host": socket.gethostname(), "pid": os.getpid(), "version": __version__},
        )
        return data


class Broker:
    """Serves one or more queues from one thread until :meth:`stop` or a signal."""

    def __init__(self, settings: list[QueueSettings], opts: BrokerOptions | None = None) -> None:
        self.opts = opts or BrokerOptions()
        self.ctx = zmq.Context()
        self.queues: list[QueueServer] = []
        now = time.time()
        try:
            for s in settings:
                self.queues.append(QueueServer(self.ctx, s, self.opts, now))
        except Exception:
            self.close()
            raise
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def stop(self, *_: Any) -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)

    def run(self) -> None:
        """Serve until stopped; on the way out fail pending messages back and say bye."""
        for q in self.queues:
            log.info("queue %s: serving at %s", q.name, q.bind)
        if len(self.queues) == 1:
            self._run_one(self.queues[0])
        else:
            self._run_many()
        now = time.time()
        for q in self.queues:
            q.core.shutdown(now)
            q.flush(now)
            log.info("queue %s: stopped", q.name)
        self.close()

    def _run_one(self, q: QueueServer) -> None:
        """One queue: block in recv until the next tick (fewest system calls).

        A signal interrupts the wait; the handler sets the stop flag, which
        is seen at the latest at the next tick.
        """
        sock = q.sock
        tick_every = max(0.01, self.opts.heartbeat / 4)
        next_tick = time.time() + tick_every
        while not self._stopping:
            now = time.time()
            if now < next_tick:
                set_option(sock, RCVTIMEO, max(1, int((next_tick - now) * 1000)))
                try:
                    first = recv_frame(sock, 0)
                except zmq.Again:
                    first = None
                now = time.time()
                if first is not None:
                    # One message per wake-up: the next blocking recv returns at
                    # once if more are queued, without a failing NOBLOCK recv.
                    q.handle_one(first, now)
                    q.flush(now)
            if now >= next_tick:
                q.core.tick(now)
                q.flush(now)
                next_tick = now + tick_every

    def _run_many(self) -> None:
        """Several queues: poll their sockets (and the signal wake-up pipe)."""
        poller = zmq.Poller()
        by_sock = {}
        for q in self.queues:
            poller.register(q.sock, zmq.POLLIN)
            by_sock[q.sock] = q
        poller.register(self._wake_r, zmq.POLLIN)
        tick_every = max(0.01, self.opts.heartbeat / 4)
        next_tick = time.time() + tick_every
        poll = poller.poll
        while not self._stopping:
            timeout = next_tick - time.time()
            events = poll(max(0, int(timeout * 1000) + 1)) if timeout > 0 else poll(0)
            now = time.time()
            for sock, _ in events:
                q = by_sock.get(sock)
                if q is not None:
                    q.drain(now)
            if now >= next_tick:
                for q in self.queues:
                    q.core.tick(now)
                    q.flush(now)
                next_tick = now + tick_every

    def close(self) -> None:
        for q in self.queues:
            q.sock.close(linger=1000)
        self.queues = []
        self.ctx.term()
