"""One queue's I/O: its ROUTER socket, the input handlers table and the outbox sender.

Everything that decides lives in :mod:`sqm.core`; frames are read by
:mod:`sqm.wire`. This module only maps each command to a core call, turns
the core's outbox into frames and runs the plugins' hooks (:mod:`sqm.plugins`)
where they belong. It never decodes a payload. Per message it does no
logging and, with no plugin registered, no work beyond reading the envelope.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq

from .. import __version__, procinfo, protocol
from ..config import QueueSettings
from ..core import (
    FINISHED,
    Bye,
    Cancel,
    Dispatch,
    Ended,
    Fail,
    Heartbeat,
    Message,
    OutboxEntry,
    QueueCore,
    Reclaim,
    Stop,
    Watch,
)
from ..errors import ConfigError
from ..liveness import REPORT_EVERY, can_watch, keep_alive
from ..plugins import ControlHandler, Hooks
from ..protocol import (
    ABILITIES,
    ACCEPTED,
    BATCHES,
    BATCHES_READS,
    BYE,
    CANCEL,
    COMPACT_COMMANDS,
    COMPACT_DONE,
    COMPACT_DONE_FAILED,
    COMPACT_HEAD,
    COMPACT_SUBMIT,
    CONTROL,
    CREDIT,
    DISPATCH,
    DONE,
    DONE_FAILED,
    ERROR,
    FEATURES,
    FORWARD,
    GIVE_BACK,
    HEARTBEAT,
    HELLO,
    MAX_SUBMIT_BATCH,
    NACK,
    PACKED_BEATS,
    RETRY,
    SIGNATURE,
    STATUS,
    STOP,
    SUBMIT,
    SUBMIT_FRAMES,
    MailboxPolicy,
    compact_parts,
    envelope_id,
    message_parts,
)
from ..security.keys import KeyPair
from ..sockets import DEFAULT_IPC_MODE, ensure_ipc_dir, ipc_listener_alive, make_socket
from ..wire import (
    Malformed,
    SubmitReader,
    read_abilities,
    read_control,
    read_credit,
    read_forward,
    read_given_back,
    read_hello,
    read_message_id,
    read_message_ids,
    read_retry,
)
from ..zmqfast import NOBLOCK, readable, recv_frame, recv_rest, send_frames, send_more
from .control import CONTROL as BUILTIN_CONTROL
from .control import READ_ONLY
from .watch import Connections, handed_over, source_fd

log = logging.getLogger("sqm.broker")

BATCH = 256  # messages read from one socket per wake-up, at most
# ACCEPTED notices are batched per sender: one [SIG, K, packed ids] message
# when ACK_BATCH of its messages await one and at least half of those are
# still held, for its first message (the features it lists), as soon as sqm
# has nothing to read for ACK_IDLE_MS, and at a tick for messages accepted
# before the previous tick (after every journal commit instead, in journal
# mode). Ids whose messages have ended are left out: their replies say more.
# One send per message would cost ~10 µs of broker CPU per message, and a
# wake-up per rpc for each of many waiting sequential Senders (W9: 35 % of
# their throughput).
ACK_BATCH = 32
#: Connections told their first ACCEPTED, remembered at most this many.
ACK_TOLD_MAX = 65_536
ACK_IDLE_MS = 2

#: Outbox entries addressed to a worker (their first field is its routing id):
#: that worker's gathered dispatches go before them (_send_outbox).
def classic(frames: list[bytes]) -> list[bytes]:
    """A compact SUBMIT ``[frame]`` as the 4-frame DISPATCH an older worker reads."""
    env, payload = compact_parts(frames[0])
    return [SIGNATURE, DISPATCH, env, payload]


OK_BYTE = COMPACT_DONE[4]  # the command byte of a compact DONE that succeeded
_TO_WORKER = frozenset({Cancel, Bye, Stop, Heartbeat, Watch})

#: An input handler: ``(routing-id frame, frames after it, now)``; raises Malformed.
Handler = Callable[[zmq.Frame, list[bytes], float], None]


@dataclass
class BrokerOptions:
    heartbeat: float = 1.0
    liveness: int = 3
    max_pending: int = 100_000
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE
    max_deliveries: int | None = None
    #: The broker's CURVE key pair: every endpoint is then a CURVE server
    #: (vetted by the ZAP handler a SecurityPlugin starts). None: plain.
    curve_server: KeyPair | None = None
    #: Mode of an ipc socket file (owner-only unless ``--ipc-mode`` widens it).
    ipc_mode: int = DEFAULT_IPC_MODE
    #: ``sqm serve --hold-unknown``: a message whose method no worker serves
    #: waits for one (until its deadline) instead of failing as UnknownMethod.
    hold_unknown: bool = False
    #: A watched idle worker reports every this many heartbeats (sqm.liveness).
    report_every: float = REPORT_EVERY


class QueueServer:
    """One queue: its settings, its core, its bound ROUTER socket and the plugins' hooks."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        settings: QueueSettings,
        opts: BrokerOptions,
        now: float,
        *,
        hooks: Hooks | None = None,
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
            hold_unknown=opts.hold_unknown,
            report_every=opts.report_every,
        )
        self.policy = MailboxPolicy.for_settings(settings)
        reader = SubmitReader(self.policy)
        self.read_submit = reader.read
        self.read_compact = reader.read_compact
        self.max_frame = opts.max_message_size + 64 * 1024
        self.bind = settings.bind
        if ipc_listener_alive(self.bind):
            raise ConfigError(f"queue {self.name!r} is already served at {self.bind}")
        ensure_ipc_dir(self.bind)
        # Secured: no routing-id handover, or an admitted peer could present
        # a worker's routing id and take its DISPATCHes.
        self.sock = make_socket(ctx, zmq.ROUTER, linger_ms=1000, curve_server=opts.curve_server,
                                router_handover=opts.curve_server is None)
        #: Worker connections are watched (their closing is their death) rather
        #: than heartbeated where that notices a dead peer as soon (sqm.liveness).
        self.watching = can_watch(self.bind, opts.heartbeat)
        if self.watching:
            keep_alive(self.sock, opts.heartbeat, opts.liveness)
        # Monitored before it binds: every connection's ACCEPTED is seen.
        self.connections = Connections(self.sock)
        try:
            self.sock.bind(self.bind)
            if self.bind.startswith("ipc://"):
                os.chmod(self.bind[len("ipc://"):], opts.ipc_mode)
        except (zmq.ZMQError, OSError) as exc:
            self.connections.close()
            self.sock.close(0)
            raise ConfigError(f"cannot bind {self.bind} for queue {self.name!r}: {exc}") from None
        self.sent_dropped = 0
        self.batches_sent = 0  # DISPATCHes that carried several messages
        self.batched = 0  # ... and the messages they carried
        # Heartbeats carry our interval (ms) so workers judge our silence by it.
        self._heartbeat_ms = b"%d" % int(opts.heartbeat * 1000)
        self._heartbeat_frames = [SIGNATURE, HEARTBEAT, self._heartbeat_ms]
        # origin -> ids accepted since the last tick, not yet told; then the same
        # for the tick before (sent at the next tick, those still held).
        self._acks: dict[bytes, list[bytes]] = {}
        self._acks_aged: dict[bytes, list[bytes]] = {}
        self._told: set[bytes] = set()  # origins sent an ACCEPTED (its features)
        self._acks_due = False  # a sender's first, or ACK_BATCH of one sender's
        self.acks_pending = 0  # ids in both
        self._streaming = False  # handle_burst's last look found more queued
        self._on_shutdown = on_shutdown
        #: When each unknown connection was last asked to re-register (BYE):
        #: at most once per heartbeat, however much it had queued meanwhile.
        self._asked: dict[bytes, float] = {}
        self._ask_every = opts.heartbeat

        self.hooks = hooks = hooks or Hooks()
        # ACCEPTED goes out only after the before_acks hooks (e.g. a journal
        # commit): at the end of each batch, never from the idle/tick paths.
        self.acks_after_hooks = bool(hooks.before_acks)
        self.core.track_ends = bool(hooks.ended)
        # read once per SUBMIT / per flush: one attribute lookup each
        self._accepted_hooks = hooks.accepted
        self._before_acks = hooks.before_acks
        self.control_table: dict[str, ControlHandler] = {**BUILTIN_CONTROL, **hooks.control}
        self.handlers: dict[bytes, Handler] = {
            SUBMIT: self._on_submit,
            DONE: self._on_done,
            DONE_FAILED: self._on_done_failed,
            HEARTBEAT: self._on_heartbeat,
            HELLO: self._on_hello,
            BYE: self._on_bye,
            NACK: self._on_nack,
            CREDIT: self._on_credit,
            GIVE_BACK: self._on_give_back,
            ABILITIES: self._on_abilities,
            FORWARD: self._on_forward,
            RETRY: self._on_retry,
            CANCEL: self._on_cancel,
            STATUS: self._on_status,
            CONTROL: self._on_control,
        }
        #: Compact messages (one frame, docs/PROTOCOL.md), by their first 5 bytes.
        self.compact_handlers: dict[bytes, Handler] = {
            COMPACT_SUBMIT: self._on_compact_submit,
            COMPACT_DONE: self._on_compact_done,
            COMPACT_DONE_FAILED: self._on_compact_done,
        }
        # The admit checks cost nothing unless a plugin (security) asks for them.
        self._route: Handler = self._handle_admitted if hooks.admit else self.handle
        for recover in hooks.recover:
            recover(self, now)

    # -------------------------------------------------------------- input

    def read_batch(self, now: float) -> None:
        """Handle up to BATCH waiting messages, then send the core's outbox."""
        sock = self.sock
        for _ in range(BATCH):
            try:
                rid_frame = recv_frame(sock)
            except zmq.Again:
                break
            self.handle_one(rid_frame, now)
        self.flush(now)

    def handle_burst(self, first: zmq.Frame, now: float) -> None:
        """Handle the message that starts with ``first`` and, while that leaves
        something to send, what else is queued (up to BATCH); then flush.

        One worker's dispatches of the burst then go as one DISPATCH: at 32
        workers this cut the workers' CPU per task by 40 % (BENCHMARKS.md).
        Whether more is queued costs a look at the socket's events (~2.5 µs
        hot, ~10 in W1 where sqm wakes cold; a failing NOBLOCK recv costs ~7),
        paid only when there is something to send: a wake-up that sends
        nothing (a DONE) returns to the blocking recv, which reads what is
        queued at no extra cost. When the last look found nothing queued (a
        lone rpc), the dispatch goes before the look, not after it.
        """
        self.handle_one(first, now)
        if not self.core.outbox:
            self.flush(now)
            return
        if not self._streaming:
            self.flush(now)  # off W1's critical path: the look below
        sock = self.sock
        self._streaming = readable(sock)
        if self._streaming:
            self.handle_one(recv_frame(sock, NOBLOCK), now)
            outbox = self.core.outbox
            n = 2
            while outbox and n < BATCH and readable(sock):
                self.handle_one(recv_frame(sock, NOBLOCK), now)
                n += 1
        self.flush(now)

    def handle_one(self, rid_frame: zmq.Frame, now: float) -> None:
        """Read the rest of the message that starts with ``rid_frame`` and handle it."""
        frames = recv_rest(self.sock, rid_frame)
        try:
            self._route(rid_frame, frames, now)
        except Exception:  # a bug must not stop sqm: count, log, carry on
            self.core.malformed_total += 1
            log.exception("queue %s: failed to handle a message", self.name)

    def handle(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """Dispatch one input to its command's handler (see :attr:`handlers`)."""
        if len(frames) < 2 or frames[0] != SIGNATURE:
            compact = self.compact_handlers.get(frames[0][:COMPACT_HEAD]) if frames else None
            if compact is None:
                self._malformed(rid_frame.bytes, frames, "missing sqm signature frame")
                return
            try:
                compact(rid_frame, frames, now)
            except Malformed as exc:
                self._malformed(rid_frame.bytes, frames, exc.reason)
            return
        handler = self.handlers.get(frames[1])
        if handler is None:
            self._malformed(rid_frame.bytes, frames, f"unknown command {frames[1][:8]!r}")
            return
        try:
            handler(rid_frame, frames, now)
        except Malformed as exc:
            self._malformed(rid_frame.bytes, frames, exc.reason)

    def _handle_admitted(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """:meth:`handle` behind the plugins' ``admit`` checks (installed only with such a plugin)."""
        cmd = frames[1] if len(frames) >= 2 else None
        if frames and frames[0] != SIGNATURE:
            cmd = COMPACT_COMMANDS.get(frames[0][:COMPACT_HEAD])  # as its classic form
        if cmd is not None:
            for admit in self.hooks.admit:
                if not admit(self, rid_frame, cmd):
                    return
        self.handle(rid_frame, frames, now)

    def _on_submit(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        if len(frames) != SUBMIT_FRAMES:
            self._on_submits(rid_frame, frames, now)
            return
        self._take(self.read_submit(rid_frame, rid_frame.bytes, frames), now)

    def _take(self, msg: Message, now: float) -> None:
        """Queue a message read from a SUBMIT; its ACCEPTED goes out with the next ones."""
        if self.core.submit(now, msg):
            if self._accepted_hooks:
                for accepted in self._accepted_hooks:
                    accepted(self, msg)
            if not msg.oneway:
                rid = msg.origin
                ids = self._acks.get(rid)
                if ids is None:
                    self._acks[rid] = [msg.id]
                    if rid not in self._told:
                        self._acks_due = True
                else:
                    ids.append(msg.id)
                    if len(ids) >= ACK_BATCH:
                        self._batch_full(ids)
                self.acks_pending += 1  # sent by flush(), after the dispatches

    def _batch_full(self, ids: list[bytes]) -> None:
        """ACK_BATCH of one sender's messages await an ACCEPTED: due if at least
        half of them are still held; else the ended ones are dropped and the
        rest wait (a sequential Sender's: the idle moment or a tick tells them).

        A Sender reads these notices when it looks at its broker sockets (every
        20 ms while it waits): one every 32 rpcs cost a sequential Sender ~100
        µs in the rpc where it read it (W1's p99), for a message its reply
        was about to end anyway.
        """
        holds = self.core.holds
        held = [msg_id for msg_id in ids if holds(msg_id)]
        if len(held) >= ACK_BATCH // 2:
            self._acks_due = True
            return
        self.acks_pending -= len(ids) - len(held)
        ids[:] = held

    def _on_compact_submit(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """Compact SUBMIT: one ``SQM1s`` frame per message (several: a batch)."""
        if len(frames) == 1:
            self._take(self.read_compact(rid_frame, rid_frame.bytes, frames), now)
            return
        if len(frames) > MAX_SUBMIT_BATCH:
            raise Malformed(f"a compact submit carries at most {MAX_SUBMIT_BATCH} messages; "
                            f"got {len(frames)}")
        rid = rid_frame.bytes
        for frame in frames:
            one = [frame]
            try:
                if not frame.startswith(COMPACT_SUBMIT):
                    raise Malformed("a compact submit batch mixes other frames")
                self._take(self.read_compact(rid_frame, rid, one), now)
            except Malformed as exc:
                self._malformed(rid, one, exc.reason)

    def _on_compact_done(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """Compact DONE: ``SQM1r`` / ``SQM1f`` + packed ids."""
        if len(frames) != 1:
            raise Malformed(f"compact done needs 1 frame, got {len(frames)}")
        frame = frames[0]
        ok = frame[4] == OK_BYTE
        rid = rid_frame.bytes
        if len(frame) > COMPACT_HEAD + 1 and frame[COMPACT_HEAD] == len(frame) - COMPACT_HEAD - 1:
            if not self.core.done(now, rid, frame[COMPACT_HEAD + 1:], ok):  # one id
                self._reregister(rid)
            return
        ids = protocol.unpack_ids(frame[COMPACT_HEAD:])
        if not ids or not all(ids):
            raise Malformed("compact done needs at least one message id")
        if not self.core.done_many(now, rid, ids, ok):
            self._reregister(rid)

    def _on_submits(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """A batched SUBMIT: ``[SIG, S, env1, payload1, env2, payload2, ...]``.

        Each message is taken (or refused) on its own, as if it had come alone:
        a malformed one is answered and dropped, the others go on.
        """
        n = len(frames)
        if n < SUBMIT_FRAMES or n % 2 or n > 2 + 2 * MAX_SUBMIT_BATCH:
            raise Malformed(f"submit needs 4 frames, or an even number up to "
                            f"{2 + 2 * MAX_SUBMIT_BATCH} for a batch; got {n}")
        for i in range(2, n, 2):
            one = [SIGNATURE, SUBMIT, frames[i], frames[i + 1]]
            try:
                self._on_submit(rid_frame, one, now)
            except Malformed as exc:
                self._malformed(rid_frame.bytes, one, exc.reason)

    def _on_done(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """DONE ``[SIG, R, id, ...]``: one slot freed per id (a worker's batch of ends)."""
        if len(frames) == 3:
            if not self.core.done(now, rid_frame.bytes, frames[2], True):
                self._reregister(rid_frame.bytes)
        else:
            self._done_many(rid_frame.bytes, frames, now, True)

    def _on_done_failed(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        if len(frames) == 3:
            if not self.core.done(now, rid_frame.bytes, frames[2], False):
                self._reregister(rid_frame.bytes)
        else:
            self._done_many(rid_frame.bytes, frames, now, False)

    def _done_many(self, rid: bytes, frames: list[bytes], now: float, ok: bool) -> None:
        if not self.core.done_many(now, rid, read_message_ids(frames, "done"), ok):
            self._reregister(rid)

    def _on_heartbeat(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        # Every worker beats every interval: this runs ~1,000 times a second
        # for 1,000 workers, so no JSON parse here (a status decodes the report).
        n = len(frames)
        # The connection these come from is the process's heartbeat thread's: a
        # Reclaim for those workers goes there (their runners are in callbacks).
        if n == 3:  # [SIG, H, wid]: a bare beat from a worker's heartbeat thread
            self.core.seen_id(now, frames[2].decode("utf-8", "replace"), rid_frame.bytes)
        elif n == 4:
            if frames[2]:  # [SIG, H, wid, report]
                self.core.report(now, frames[2].decode("utf-8", "replace"), frames[3],
                                 rid_frame.bytes)
            else:  # [SIG, H, "", packed wids]: every worker of one process (worker.beats)
                self.core.seen_ids(now, [w.decode("utf-8", "replace")
                                         for w in protocol.unpack_ids(frames[3])],
                                   rid_frame.bytes)
        elif not self.core.seen(now, rid_frame.bytes):
            self._reregister(rid_frame.bytes)

    def _on_hello(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        info = read_hello(frames)
        rid = rid_frame.bytes
        if handed_over(rid):
            # Left over from a connection this worker has replaced: registering it would
            # leave a second, dead registration of the same worker (sqm.broker.watch).
            log.debug("queue %s: HELLO of %s on a replaced connection ignored", self.name,
                      info.get("id"))
            return
        fd = source_fd(rid_frame)
        # Every disconnect that happened before this HELLO is known after this
        # (sqm.broker.watch): the binding below cannot be stale.
        self.check_connections(now)
        if fd >= 0 and not self.connections.is_open(fd):
            # Its connection closed after it sent this: detached (it says HELLO again
            # on its next connection).
            self._connection_closed(now, rid)
            return
        w = self.core.hello(now, rid, info, watchable=self.watching and fd >= 0)
        if fd >= 0:
            self.connections.bind(rid, fd)
        if info.get("batch") is True:
            # Before the dispatches this HELLO may bring: its DONEs may name several ids.
            self._send(rid, [SIGNATURE, BATCHES, BATCHES_READS])
        log.info(
            "queue %s: worker %s registered (host %s pid %s, %d slot(s)%s)",
            self.name, w.id, info.get("host"), info.get("pid"), w.slots,
            ", connection watched" if w.watched else "",
        )

    def log_expired(self) -> None:
        """Say which workers sqm just removed as dead, once each (their messages fail
        or are retried: an operator needs the why, e.g. a host too loaded to beat)."""
        for wid, silent_s, held, silent in self.core.expired:
            log.info("queue %s: worker %s dropped: %s for %.1f s (held %d message(s))",
                     self.name, wid, "silent" if silent
                     else "its connection closed and it did not come back", silent_s, held)
        self.core.expired.clear()

    def check_connections(self, now: float) -> None:
        """Detach the workers whose connection closed (read from the socket monitor)."""
        for rid in self.connections.closed():
            self._connection_closed(now, rid)

    def _connection_closed(self, now: float, rid: bytes) -> None:
        w = self.core.workers.get(rid)
        if w is None:
            return
        log.info("queue %s: worker %s connection closed%s: no new work until it is back",
                 self.name, w.id,
                 f" while it held {len(w.in_flight)} message(s)" if w.in_flight else "")
        self.core.gone(now, rid)

    def _on_bye(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        rid = rid_frame.bytes
        if rid in self.core.workers:
            log.info("queue %s: worker %s left", self.name, self.core.workers[rid].id)
        self.core.bye(now, rid)

    def _on_nack(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        if not self.core.nack(now, rid_frame.bytes, read_message_id(frames, "nack")):
            self._reregister(rid_frame.bytes)

    def _on_credit(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        if not self.core.credit(now, rid_frame.bytes, read_credit(frames)):
            self._reregister(rid_frame.bytes)

    def _on_give_back(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        if not self.core.give_back(now, rid_frame.bytes, read_given_back(frames)):
            self._reregister(rid_frame.bytes)

    def _on_abilities(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        if not self.core.abilities(now, rid_frame.bytes, read_abilities(frames)):
            self._reregister(rid_frame.bytes)

    def _on_forward(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """A worker hands the message it holds on: same id, originator, mailbox and deadline."""
        fwd = read_forward(frames)
        rid = rid_frame.bytes
        w = self.core.workers.get(rid)
        held = w.in_flight.get(fwd.id) if w is not None else None
        if held is None:
            raise Malformed("forward of a message this worker does not hold")
        if held.frames is not None and len(held.frames) in (1, SUBMIT_FRAMES):
            env = message_parts(held.frames)[0]
            _f, _r, _p, deadline, id_end, mailbox_end, _m = protocol.read_head(env)
            if (env[id_end:mailbox_end] != fwd.mailbox or deadline != fwd.deadline
                    or held.oneway != bool(fwd.flags & protocol.FLAG_ONEWAY)):
                raise Malformed("forward changes the mailbox, deadline or oneway flag")
        msg = self.core.forward(now, rid, fwd.id, frames, method=fwd.method,
                                size=len(frames[3]), priority=held.priority)
        if msg is not None and msg.state != FINISHED and self._accepted_hooks:
            for accepted in self._accepted_hooks:
                accepted(self, msg)

    def _on_retry(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """A worker's callback raised Retry: reschedule (one more attempt) or give up."""
        req = read_retry(frames)
        rid = rid_frame.bytes
        if rid not in self.core.workers:
            self._reregister(rid)
            return
        msg = self.core.retry(now, rid, req.id, req.delay, req.max_retries, req.error)
        if msg is None or msg.state == FINISHED or msg.frames is None:
            return
        # The attempts and due time travel in the envelope (the next worker
        # reads them; the journal keeps the rewritten row for a restart).
        env, payload = message_parts(msg.frames)  # a compact one goes on in 4 frames
        msg.frames = [SIGNATURE, DISPATCH, protocol.with_retry(env, msg.not_before, msg.attempts),
                      payload]
        for accepted in self._accepted_hooks:
            accepted(self, msg)

    def _on_cancel(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        """A sender cancels one of its own messages: ``[SIG, Z, id]``."""
        self.core.cancel(now, read_message_id(frames, "cancel"), rid_frame.bytes)

    def _on_status(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        self._send(rid_frame.bytes, [SIGNATURE, STATUS, json.dumps(self.status(now)).encode()])

    def _on_control(self, rid_frame: zmq.Frame, frames: list[bytes], now: float) -> None:
        request = read_control(frames)
        reply = self.control(now, request, rid_frame)
        self._send(rid_frame.bytes, [SIGNATURE, CONTROL, json.dumps(reply).encode()])
        if reply.get("shutdown") and self._on_shutdown is not None:
            self._on_shutdown()

    def control(
        self, now: float, request: dict[str, Any], peer: zmq.Frame | None = None
    ) -> dict[str, Any]:
        """An operator's command, run from :attr:`control_table`.

        Answered at once, whatever is pending: admin traffic never waits
        behind the queue. Every command that changes something is logged at
        info: operators want a trail.
        """
        cmd = request.get("cmd")
        handler = self.control_table.get(cmd) if isinstance(cmd, str) else None
        if handler is None or not isinstance(cmd, str):
            return {"ok": False, "error": f"unknown control command {cmd!r}; "
                    f"expected one of {', '.join(self.control_table)}"}
        if peer is not None:
            for admit in self.hooks.admit_control:
                if not admit(self, peer, cmd):
                    return {"ok": False, "error_type": "AuthError",
                            "error": f"control command {cmd!r} not allowed: it needs an admin key"}
        if cmd not in READ_ONLY:
            log.info("queue %s: operator asked to %s %s", self.name, cmd, request.get("id") or "")
        return handler(self, now, request)

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
        msg_id = b""
        if len(frames) >= 3 and frames[0] == SIGNATURE and frames[1] == SUBMIT:
            msg_id = envelope_id(frames[2])
        elif len(frames) == 1 and frames[0].startswith(COMPACT_SUBMIT):
            msg_id = envelope_id(frames[0][COMPACT_HEAD:])
        if msg_id:
            self._send(rid, [SIGNATURE, ERROR, msg_id, b"Malformed", why.encode(), b"{}"])

    def send_error(self, rid: bytes, msg_id: bytes, error: bytes, text: str) -> None:
        """``ERROR`` to one peer (e.g. AuthError for a refused command)."""
        self._send(rid, [SIGNATURE, ERROR, msg_id, error, text.encode(), b"{}"])

    def _reregister(self, rid: bytes) -> None:
        """An unknown worker talks to us (we restarted): ask it to say hello.

        Once per heartbeat: the DONEs and beats it queued while we were away
        arrive together, and each BYE would draw one more HELLO.
        """
        now = time.monotonic()
        asked = self._asked
        if now - asked.get(rid, -self._ask_every) < self._ask_every:
            return
        if len(asked) >= 10_000:
            asked.clear()
        asked[rid] = now
        self._send(rid, [SIGNATURE, BYE])

    # -------------------------------------------------------------- output

    def flush(self, now: float) -> None:
        """Send the core's outbox; with before_acks hooks, run them, then the acks."""
        out = self.core.outbox
        if out:
            self._send_outbox(now, out)
        before = self._before_acks
        if before:
            for hook in before:
                hook(self)  # e.g. the journal commits: accepted means journaled
            if self.acks_pending:
                self.send_acks()
        elif self._acks_due:
            # After the dispatches, not between a SUBMIT and its DISPATCH: every
            # 32nd rpc paid for the ACCEPTED before its message went on (W1's p99).
            self.send_acks()

    def send_acks(self) -> None:
        """Tell each sender which of its messages sqm holds (one message each)."""
        aged, acks = self._acks_aged, self._acks
        if aged:
            for rid, ids in acks.items():
                older = aged.get(rid)
                if older is None:
                    aged[rid] = ids
                else:
                    older.extend(ids)
            acks.clear()
            acks = aged
        self._send_acks(acks)
        self.acks_pending = 0
        self._acks_due = False

    def age_acks(self) -> None:
        """At a tick: tell senders about the messages accepted before the last
        tick that sqm still holds; the newer ones wait for the next tick.

        A sequential Sender's message usually ends within a tick, and its
        reply says more than an ACCEPTED would; one still held a tick later
        is worth telling (its Sender then waits for sqm's verdict past its
        deadline, docs/GUARANTEES.md).
        """
        if self._acks_aged:
            self._send_acks(self._acks_aged)
        self._acks_aged, self._acks = self._acks, self._acks_aged
        self.acks_pending = sum(map(len, self._acks_aged.values()))

    def _send_acks(self, acks: dict[bytes, list[bytes]]) -> None:
        """Send ``acks``' ids that sqm still holds, then empty it."""
        holds = self.core.holds
        told = self._told
        if len(told) > ACK_TOLD_MAX:
            told.clear()  # those senders may get one more early ACCEPTED: harmless
        for rid, ids in acks.items():
            held = [msg_id for msg_id in ids if holds(msg_id)]
            if held:
                self._send(rid, [SIGNATURE, ACCEPTED, protocol.pack_ids(held), FEATURES])
                told.add(rid)
        acks.clear()

    def _send_outbox(self, now: float, out: list[OutboxEntry]) -> None:
        """Send the outbox in order; a batching worker's dispatches of this flush as one DISPATCH.

        A worker that batches (HELLO ``batch``, more than one slot) has its
        dispatches gathered (in order) and sent when the outbox is through,
        or before anything else for it (CANCEL, BYE...), so each worker sees
        its commands in the core's order. Its k messages then cost one send
        instead of k (and one read on its side). Any other dispatch goes at
        once, exactly as before batching.
        """
        core = self.core
        sock = self.sock
        workers = core.workers
        groups: dict[bytes, list[Message]] | None = None
        i = 0
        while True:
            # also sees what the core appends meanwhile (unreachable workers)
            while i < len(out):
                entry = out[i]
                i += 1
                if type(entry) is Dispatch:
                    rid, msg = entry
                    w = workers.get(rid)
                    # (the outbox's last entry goes at once unless gathered ones for
                    # its worker go first: a lone dispatch pays nothing for batching)
                    if (w is not None and w.batch and i < len(out)
                            or groups and rid in groups):
                        if groups is None:
                            groups = {rid: [msg]}
                        elif rid in groups:
                            groups[rid].append(msg)
                        else:
                            groups[rid] = [msg]
                        continue
                    try:
                        send_more(sock, rid)
                    except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not keeping up)
                        core.unreachable(now, rid, msg)
                        continue
                    frames = msg.frames
                    if len(frames) == 1 and (w is None or not w.compact):
                        frames = classic(frames)  # a compact SUBMIT to an older worker
                    send_frames(sock, frames)
                    continue
                if groups and type(entry) in _TO_WORKER:
                    rid = cast(bytes, entry[0])  # these all start with the worker's rid
                    held = groups.pop(rid, None)  # its dispatches go first, as ordered
                    if held is not None:
                        self._dispatch(now, rid, held)
                self._send_entry(core, entry)
            if not groups:
                break
            ready, groups = groups, None
            for rid, msgs in ready.items():
                self._dispatch(now, rid, msgs)
        out.clear()

    def _dispatch(self, now: float, rid: bytes, msgs: list[Message]) -> None:
        """Send ``msgs`` to worker ``rid`` in one DISPATCH (one message: the 4-frame form).

        A send that fails puts every message back (``core.unreachable``), as for one.
        """
        w = self.core.workers.get(rid)
        compact = w is not None and w.compact
        if len(msgs) == 1:
            frames = msgs[0].frames
            if len(frames) == 1 and not compact:
                frames = classic(frames)
        elif compact and all(len(msg.frames) == 1 for msg in msgs):
            frames = [msg.frames[0] for msg in msgs]  # compact SUBMITs, as received
        else:
            frames = [SIGNATURE, DISPATCH]
            for msg in msgs:
                # envelope and payload, as received: never decoded
                frames += message_parts(msg.frames)
        try:
            send_more(self.sock, rid)
        except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not keeping up)
            for msg in msgs:
                self.core.unreachable(now, rid, msg)
            return
        send_frames(self.sock, frames)
        if len(msgs) > 1:
            self.batches_sent += 1
            self.batched += len(msgs)

    def _send_entry(self, core: QueueCore, entry: OutboxEntry) -> None:
        """Send one outbox entry other than a dispatch."""
        if type(entry) is Fail:
            msg, error, text = entry
            detail = b'{"deliveries":%d}' % msg.deliveries
            self._send(
                msg.origin, [SIGNATURE, ERROR, msg.id, error.encode(), text.encode(), detail]
            )
            if msg.seq and self.hooks.failed_back:  # seq: admitted (refusals have none)
                self._failed_back(msg, error)
        elif type(entry) is Ended:
            for ended in self.hooks.ended:
                try:
                    ended(self, entry.msg, entry.outcome)
                except Exception:  # a plugin's bug must not stop sqm: count, log, carry on
                    core.malformed_total += 1
                    log.exception("queue %s: plugin hook ended() failed", self.name)
        elif type(entry) is Heartbeat:
            self._send(entry.rid, self._heartbeat_frames)
        elif type(entry) is Watch:
            # A heartbeat with a 4th frame: sqm watches the connection and
            # heartbeats no more; report at least this often (ms).
            w = core.workers.get(entry.rid)
            if w is not None:  # else it is gone already: nothing to tell
                answer = [SIGNATURE, HEARTBEAT, self._heartbeat_ms,
                          b"%d" % int(w.report_s * 1000)]
                if w.info.get("packed_beats") is True:  # it asked: we read packed beats
                    answer.append(PACKED_BEATS)
                self._send(entry.rid, answer)
        elif type(entry) is Bye:
            self._send(entry.rid, [SIGNATURE, BYE])
        elif type(entry) is Stop:
            self._send(entry.rid, [SIGNATURE, STOP])
        elif type(entry) is Cancel:
            self._send(entry.rid, [SIGNATURE, CANCEL, entry.msg.id])
        elif type(entry) is Reclaim:
            self._send(entry.rid, [SIGNATURE, GIVE_BACK, entry.wid.encode()])

    def _failed_back(self, msg: Message, error: str) -> None:
        for hook in self.hooks.failed_back:
            try:
                hook(self, msg, error)
            except Exception:  # a plugin's bug must not stop sqm: count, log, carry on
                self.core.malformed_total += 1
                log.exception("queue %s: plugin hook failed_back() failed", self.name)

    def reachable(self, rid: bytes, ids: list[bytes]) -> bool:
        """Tell peer ``rid`` that sqm holds ``ids`` (ACCEPTED); False when it is not connected.

        The one way to learn whether a caller is still connected: a ROUTER
        refuses to send to a routing id it no longer has.
        """
        try:
            send_more(self.sock, rid)
        except zmq.ZMQError:
            return False
        send_frames(self.sock, [SIGNATURE, ACCEPTED, protocol.pack_ids(ids), FEATURES])
        return True

    def resubmit(self, now: float, msg: Message) -> bool:
        """Admit ``msg`` as if it had just been received (a replayed dead letter).

        The accepted hooks run as for a SUBMIT (the journal records it);
        True when the core accepted it, else its refusal is in the outbox.
        """
        if not self.core.submit(now, msg):
            return False
        for accepted in self._accepted_hooks:
            accepted(self, msg)
        return True

    def _send(self, rid: bytes, frames: list[bytes]) -> None:
        try:
            send_more(self.sock, rid)
        except zmq.ZMQError:
            self.sent_dropped += 1  # peer gone or not keeping up: nothing to wait for
            return
        send_frames(self.sock, frames)

    def status(self, now: float) -> dict[str, Any]:
        """The core's figures plus the server's (endpoint, broker process) and the plugins'."""
        data = self.core.status(now)
        data.update(
            send_dropped_total=self.sent_dropped,
            dispatch_batches_total=self.batches_sent,
            dispatch_batched_total=self.batched,
            endpoint=self.settings.endpoint,
            broker={
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": __version__,
                "rss_bytes": procinfo.rss_bytes(),
                "nice": procinfo.nice(),
            },
            journal=None,  # part of the status contract; the JournalPlugin fills it in
            denied_total=0,  # the SecurityPlugin counts refused inputs
            dead_letters=0,  # the DeadLetterPlugin fills these two in
            dead_total=0,
        )
        for hook in self.hooks.status:
            hook(self, data)
        return data

    def close(self) -> None:
        """Close the socket, then let the plugins release what they hold for this queue."""
        self.connections.close()
        self.sock.close(linger=1000)
        for closing in self.hooks.closing:
            closing(self)
