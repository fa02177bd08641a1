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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from . import __version__, procinfo, protocol
from .config import QueueSettings
from .core import Bye, Dispatch, Ended, Fail, Heartbeat, Message, OutboxEntry, QueueCore, Stop
from .errors import ConfigError
from .journal import Journal
from .protocol import (
    ACCEPTED,
    BYE,
    CONTROL,
    CREDIT,
    DISPATCH,
    DONE,
    DONE_FAILED,
    ERROR,
    HEAD,
    HEARTBEAT,
    HELLO,
    NACK,
    SIGNATURE,
    STATUS,
    STOP,
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
# ACCEPTED notices are batched per sender: one [SIG, K, packed ids] message
# per ACK_BATCH accepted messages, or as soon as sqm has nothing to read for
# ACK_IDLE_MS (and after every journal commit). One send per message would
# cost ~10 µs of broker CPU per message, a twentieth of W2's throughput.
ACK_BATCH = 32
ACK_IDLE_MS = 2


@dataclass
class BrokerOptions:
    heartbeat: float = 1.0
    liveness: int = 3
    max_pending: int = 100_000
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE
    max_deliveries: int | None = None


CONTROL_COMMANDS = ("status", "workers", "drain", "resume", "purge", "stop-worker", "shutdown")


class QueueServer:
    """One queue: its settings, its core and its bound ROUTER socket."""

    def __init__(
        self,
        ctx: zmq.Context,
        settings: QueueSettings,
        opts: BrokerOptions,
        now: float,
        *,
        journal: Journal | None = None,
        on_shutdown: Callable[[], None] | None = None,
    ):
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
        self.journal = journal
        self._acks: dict[bytes, list[bytes]] = {}  # origin -> ids accepted, not yet told
        self.acks_pending = 0
        self._on_shutdown = on_shutdown
        if journal is not None:
            self.core.track_ends = True
            self._recover(now)

    def _recover(self, now: float) -> None:
        """Queue again what the journal holds: accepted before a restart, never ended."""
        rows = self.journal.load(self.name)
        for row in rows:
            try:
                flags, retries, priority, deadline, id_end, mailbox_end, method_end = read_head(
                    row.envelope
                )
            except ValueError:
                self.journal.remove(self.name, row.id)
                continue
            self.core.restore(
                now,
                Message(
                    row.id,
                    row.origin,
                    [SIGNATURE, DISPATCH, row.envelope, row.payload],
                    size=len(row.payload),
                    oneway=bool(flags & protocol.FLAG_ONEWAY),
                    retries=retries,
                    priority=priority,
                    deadline=deadline,
                    method=row.envelope[mailbox_end:method_end],
                ),
            )
        self.journal.commit()
        if rows:
            log.info("queue %s: recovered %d message(s) from journal %s",
                     self.name, len(rows), self.journal.path)

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
                flags, retries, priority, deadline, id_end, mailbox_end, method_end = read_head(env)
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
            mid = env[HEAD:id_end]
            oneway = flags & protocol.FLAG_ONEWAY
            accepted = self.core.submit(
                now,
                Message(
                    mid,
                    rid,
                    frames,
                    size=len(frames[3]),
                    oneway=bool(oneway),
                    retries=retries,
                    priority=priority,
                    deadline=deadline,
                    method=env[mailbox_end:method_end],
                ),
            )
            if accepted:
                if self.journal is not None:
                    self.journal.add(self.name, mid, rid, env, frames[3])
                if not oneway:
                    ids = self._acks.get(rid)
                    if ids is None:
                        self._acks[rid] = [mid]
                    else:
                        ids.append(mid)
                    self.acks_pending += 1
                    if self.acks_pending >= ACK_BATCH and self.journal is None:
                        self.send_acks()
        elif cmd == DONE or cmd == DONE_FAILED:
            if n != 3:
                self._malformed(rid, frames, "done needs 3 frames")
            elif not self.core.done(now, rid, frames[2], cmd == DONE):
                self._reregister(rid)
        elif cmd == HEARTBEAT:
            if n == 3:  # from a worker's heartbeat thread, naming the worker
                self.core.seen_id(now, frames[2].decode("utf-8", "replace"))
            elif n == 4:  # ... with its self-report (rss, nice, busy_s, ...)
                wid = frames[2].decode("utf-8", "replace")
                report = self._decode_json(frames[3])
                if report is None:
                    self.core.seen_id(now, wid)
                    self._malformed(rid, frames, "heartbeat report is not a JSON object")
                else:
                    report["at"] = now
                    self.core.report(now, wid, report)
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
        elif cmd == NACK:
            if n != 3:
                self._malformed(rid, frames, "nack needs 3 frames")
            elif not self.core.nack(now, rid, frames[2]):
                self._reregister(rid)
        elif cmd == CREDIT:
            try:
                slots = int(frames[2]) if n == 3 else -1
            except ValueError:
                slots = -1
            if slots < 0:
                self._malformed(rid, frames, "credit needs 3 frames, the last a count")
            elif not self.core.credit(now, rid, slots):
                self._reregister(rid)
        elif cmd == STATUS:
            self._send(rid, [SIGNATURE, STATUS, json.dumps(self.status(now)).encode()])
        elif cmd == CONTROL:
            request = self._decode_json(frames[2]) if n == 3 else None
            if request is None:
                self._malformed(rid, frames, "control needs 3 frames, the last a JSON object")
                return
            reply = self.control(now, request)
            self._send(rid, [SIGNATURE, CONTROL, json.dumps(reply).encode()])
            if reply.get("shutdown") and self._on_shutdown is not None:
                self._on_shutdown()
        else:
            self._malformed(rid, frames, f"unknown command {cmd[:8]!r}")

    def control(self, now: float, request: dict[str, Any]) -> dict[str, Any]:
        """An operator's command (``sqm drain|resume|purge|stop-worker|shutdown|workers``).

        Answered at once, whatever is pending: admin traffic never waits
        behind the queue. Every call is logged at info: operators want a trail.
        """
        cmd = request.get("cmd")
        core = self.core
        if cmd not in CONTROL_COMMANDS:
            return {"ok": False, "error": f"unknown control command {cmd!r}; "
                    f"expected one of {', '.join(CONTROL_COMMANDS)}"}
        if cmd == "status":
            return {"ok": True, "status": self.status(now)}
        if cmd == "workers":
            return {"ok": True, "workers": core.status(now)["workers"]}
        log.info("queue %s: operator asked to %s %s", self.name, cmd, request.get("id") or "")
        if cmd == "drain":
            core.drain()
            return {"ok": True, "pending": core.pending}
        if cmd == "resume":
            held = core.pending
            core.resume(now)
            return {"ok": True, "pending": held}
        if cmd == "purge":
            return {"ok": True, "purged": core.purge(now)}
        if cmd == "stop-worker":
            wid = str(request.get("id", ""))
            if not core.stop_worker(wid):
                known = ", ".join(w.id for w in core.workers.values()) or "none"
                return {"ok": False, "error": f"no worker {wid!r} on queue {self.name!r} "
                        f"(workers: {known})"}
            return {"ok": True, "id": wid}
        return {"ok": True, "shutdown": True}  # "shutdown"

    @staticmethod
    def _decode_json(raw: bytes) -> dict[str, Any] | None:
        if len(raw) > 64 * 1024:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    @classmethod
    def _decode_info(cls, frames: list[bytes]) -> dict[str, Any] | None:
        return cls._decode_json(frames[2]) if len(frames) == 3 else None

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
        if out:
            self._send_outbox(now, out)
        journal = self.journal
        if journal is not None and journal.dirty:
            # Accepted means journaled: acknowledge only after the commit.
            journal.commit()
            if self.acks_pending:
                self.send_acks()

    def send_acks(self) -> None:
        """Tell each sender which of its messages sqm has accepted (one message each)."""
        for rid, ids in self._acks.items():
            self._send(rid, [SIGNATURE, ACCEPTED, protocol.pack_ids(ids)])
        self._acks.clear()
        self.acks_pending = 0

    def _send_outbox(self, now: float, out: list[OutboxEntry]) -> None:
        core = self.core
        sock = self.sock
        i = 0
        while i < len(out):  # the core may append while we send (unreachable workers)
            entry = out[i]
            i += 1
            kind = type(entry)
            if kind is Dispatch:
                rid, msg = entry
                try:
                    send_more(sock, rid)
                except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not keeping up)
                    core.unreachable(now, rid, msg)
                    continue
                send_frames(sock, msg.frames)
            elif kind is Fail:
                msg, error, text = entry
                detail = b'{"deliveries":%d}' % msg.deliveries
                self._send(
                    msg.origin, [SIGNATURE, ERROR, msg.id, error.encode(), text.encode(), detail]
                )
            elif kind is Ended:
                if self.journal is not None:
                    self.journal.remove(self.name, entry[0].id)
            elif kind is Heartbeat:
                self._send(entry[0], self._heartbeat_frames)
            elif kind is Bye:
                self._send(entry[0], [SIGNATURE, BYE])
            elif kind is Stop:
                self._send(entry[0], [SIGNATURE, STOP])
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
            broker={
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": __version__,
                "rss_bytes": procinfo.rss_bytes(),
                "nice": procinfo.nice(),
            },
            journal=None
            if self.journal is None
            else {"path": self.journal.path, "written_total": self.journal.written_total,
                  "commits_total": self.journal.commits_total},
        )
        return data


class Broker:
    """Serves one or more queues from one thread until :meth:`stop` or a signal.

    ``opts`` is one BrokerOptions for every queue, or a list with one per
    queue (in the order of ``settings``). With a ``journal``, accepted
    messages survive a crash of sqm (see :mod:`sqm.journal`).
    """

    def __init__(
        self,
        settings: list[QueueSettings],
        opts: BrokerOptions | list[BrokerOptions] | None = None,
        *,
        journal: Journal | None = None,
    ) -> None:
        per_queue = opts if isinstance(opts, list) else [opts or BrokerOptions()] * len(settings)
        if len(per_queue) != len(settings):
            raise ValueError("one BrokerOptions per queue")
        self.opts = per_queue[0] if per_queue else BrokerOptions()
        self.journal = journal
        self.ctx = zmq.Context()
        self.queues: list[QueueServer] = []
        now = time.time()
        try:
            for s, o in zip(settings, per_queue, strict=True):
                self.queues.append(
                    QueueServer(self.ctx, s, o, now, journal=journal, on_shutdown=self.stop)
                )
        except Exception:
            self.close()
            raise
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._snapshot: dict[str, dict[str, Any]] = {}
        self._snapshot_at = 0.0
        self.snapshot_every = 0.0  # seconds; 0 = nobody reads snapshots (no --metrics-port)

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

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The latest status of every queue, safe to read from another thread.

        The loop refreshes it every ``snapshot_every`` seconds (on its tick),
        so HTTP scrapes never touch the core and cost the hot path nothing.
        """
        return self._snapshot

    def _refresh_snapshot(self, now: float) -> None:
        if self.snapshot_every and now - self._snapshot_at >= self.snapshot_every:
            self._snapshot_at = now
            self._snapshot = {q.name: q.status(now) for q in self.queues}

    def run(self) -> None:
        """Serve until stopped; on the way out fail pending messages back and say bye.

        With a journal, pending messages are kept for the next start instead
        of being failed back: their senders keep waiting.
        """
        for q in self.queues:
            log.info("queue %s: serving at %s%s", q.name, q.bind,
                     f" (journal {self.journal.path})" if self.journal else "")
        self._refresh_snapshot(time.time())
        if len(self.queues) == 1 and self.journal is None:
            self._run_one(self.queues[0])
        else:
            self._run_many()
        now = time.time()
        for q in self.queues:
            q.core.shutdown(now, fail_pending=self.journal is None)
            q.flush(now)
            log.info("queue %s: stopped", q.name)
        self.close()

    def _tick(self, now: float) -> None:
        for q in self.queues:
            q.core.tick(now)
            q.flush(now)
            if q.acks_pending and q.journal is None:
                q.send_acks()
        self._refresh_snapshot(now)

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
                wait_ms = max(1, int((next_tick - now) * 1000))
                if q.acks_pending:
                    wait_ms = min(wait_ms, ACK_IDLE_MS)
                set_option(sock, RCVTIMEO, wait_ms)
                try:
                    first = recv_frame(sock, 0)
                except zmq.Again:
                    first = None
                    if q.acks_pending:
                        q.send_acks()  # nothing to read: a good moment to tell senders
                now = time.time()
                if first is not None:
                    # One message per wake-up: the next blocking recv returns at
                    # once if more are queued, without a failing NOBLOCK recv.
                    q.handle_one(first, now)
                    q.flush(now)
            if now >= next_tick:
                self._tick(now)
                next_tick = now + tick_every

    def _run_many(self) -> None:
        """Several queues, or a journal: poll the sockets (and the signal wake-up
        pipe) and handle a batch per wake-up, so one journal commit covers many
        messages."""
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
                    if q.acks_pending:
                        q.send_acks()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + tick_every

    def close(self) -> None:
        for q in self.queues:
            q.sock.close(linger=1000)
        self.queues = []
        self.ctx.term()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
