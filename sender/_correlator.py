"""The part of a sender that does not do I/O: ids, envelopes, correlation.

:class:`Sender` and :class:`AsyncSender` are thin façades over this one
object: they move frames between sockets and :meth:`Correlator.feed`, and
wait in their own style (poll vs. asyncio) for :meth:`Correlator.take`.
Callbacks are never run here: :meth:`feed` queues them in ``calls`` and the
façade runs them (see ``_hooks.run_calls``) where the caller expects them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import time
from collections import deque
from time import monotonic
from typing import Any

import zmq

from sqm import protocol, serializers
from sqm.config import QueueSettings, mailbox_dir
from sqm.errors import (
    BROKER_ERRORS,
    ConfigError,
    MessageTooLarge,
    RemoteError,
    SerializerError,
    SQMError,
    WorkerLost,
)
from sqm.protocol import (
    ACCEPTED,
    ACK,
    COMPACT_RESULT,
    ERROR,
    FLAG_ACK,
    FLAG_COMPACT_REPLY,
    FLAG_ONEWAY,
    PROGRESS,
    RESULT,
    SIGNATURE,
    SUBMIT,
    classic_result,
    pack_envelope,
    unpack_ids,
)
from sqm.sockets import local_address_towards
from sqm.zmqfast import recv_message

OK = 0
FAILED = 1
#: The flags of a message whose caller wants the ACK at once (its mailbox reads
#: compact replies, as every message's of this Sender).
ACK_COMPACT = FLAG_ACK | FLAG_COMPACT_REPLY

#: What sqm answers to a SUBMIT whose id it already holds. A re-sent copy
#: (see _links.py) can meet its original: that means "sqm has it", not an error.
ID_IN_USE = "message id already in use"


class Outcome:
    """What came back for one message: a result (still encoded) or an error."""

    __slots__ = ("kind", "data", "etype", "emsg", "trace", "from_broker")

    def __init__(self, kind: int, data: bytes = b"", etype: str = "",
                 emsg: str = "", trace: str = "", from_broker: bool = False) -> None:
        self.kind = kind
        self.data = data
        self.etype = etype
        self.emsg = emsg
        self.trace = trace
        self.from_broker = from_broker


class Correlator:
    """Tracks outstanding message ids and the replies that arrive for them."""

    def __init__(
        self,
        settings: QueueSettings,
        *,
        serializer: str,
        allow_pickle: bool,
        max_message_size: int,
    ) -> None:
        self.settings = settings
        self.serializer = serializers.get(serializer, allow_pickle=allow_pickle)
        self.sertag = serializer.encode("ascii")
        self.allow_pickle = allow_pickle
        self.max_message_size = max_message_size
        self.prefix = secrets.token_hex(8)
        self.routing_id = b"S" + bytes.fromhex(self.prefix)
        self._counter = 0
        self.outstanding: dict[str, float | None] = {}  # id -> receive deadline (monotonic)
        self.started: set[str] = set()  # a worker sent ACK
        self.accepted: set[str] = set()  # sqm sent ACCEPTED
        # id -> (SUBMIT frames, link, link epoch): what to re-send if its broker
        # goes away before a worker took it. Dropped at ACK or completion.
        self.sent: dict[str, tuple[list[bytes], Any, int]] = {}
        # id -> [SUBMIT frames, link, last ACK (monotonic), worker's beat (s)]:
        # started messages whose worker repeats its ACK each beat. If their
        # broker goes away and the ACKs stop, the worker died too (see _links.py).
        self.running: dict[str, list[Any]] = {}
        self._beats: dict[bytes, float] = {}  # ACK's 4th frame -> seconds (see _beat)
        #: Ids a stopping broker failed back (BrokerShutdown) before any worker
        #: took them: the links re-send them through another live broker.
        self.stopping: list[tuple[str, Any]] = []  # (id, its ``sent`` entry then)
        self.brokers = 1  # how many brokers the links talk to (set by them)
        self.hooks: dict[str, Any] = {}  # id -> Hooks / BatchSink, only for ids that have them
        self.consuming = 0  # outstanding ids whose outcome goes to hooks, not to receive()
        self.calls: deque[tuple[Any, tuple[Any, ...]]] = deque()  # callbacks due, in order
        self.callback_errors = 0
        self.ready: dict[str, Outcome] = {}  # insertion order = arrival order
        self.mailbox = b""
        self.dropped = 0  # late, duplicate or foreign replies (never ACCEPTED notices)

    # ------------------------------------------------------------ mailbox

    def mailbox_bind_address(self) -> str:
        """Where this sender's mailbox listens, derived from the queue's endpoint."""
        s = self.settings
        configured = s.get("mailbox_bind")
        if configured:
            return str(configured)
        if s.endpoint.startswith("inproc://"):  # an in-process broker on a shared context
            return f"inproc://sqm-mbox-{self.prefix}"
        if s.endpoint.startswith("ipc://"):
            directory = mailbox_dir(s)
            if directory is None:
                where = " and ".join(dict.fromkeys(d for d in (s.ipc_dir, s.rundir) if d))
                raise ConfigError(
                    f"no room for this sender's ipc mailbox: a socket file in {where} "
                    "would pass the kernel's 107-byte path limit; "
                    "set SQM_RUNDIR to a shorter directory"
                )
            os.makedirs(directory, mode=0o700, exist_ok=True)
            return "ipc://" + os.path.join(directory, f"mbox-{self.prefix}.sock")
        local = self._mailbox_ip()
        return f"tcp://[{local}]:*" if ":" in local else f"tcp://{local}:*"

    def _mailbox_ip(self) -> str:
        """The local IP every broker's workers can reach: the one routed
        towards each tcp endpoint, non-loopback first (a broker listed by
        loopback is on this host and its workers reach that address too).

        Raises SQMError at once, not a Timeout later, when brokers need
        different addresses or none falls inside ``mailbox_networks``.
        """
        s = self.settings
        hosts = [ep[len("tcp://"):].rpartition(":")[0].strip("[]")
                 for ep in s.endpoints if ep.startswith("tcp://")]
        found = list(dict.fromkeys(local_address_towards(h) for h in hosts))
        networks = s.get("mailbox_networks")
        if networks:
            try:
                allowed = [ipaddress.ip_network(str(n), strict=False) for n in networks]
            except ValueError as exc:
                raise ConfigError(f"mailbox_networks: {exc}") from None
            inside = [a for a in found if any(ipaddress.ip_address(a) in n for n in allowed)]
            if not inside:
                raise SQMError(
                    f"this sender's mailbox would be on {' or '.join(found)}, outside "
                    f"mailbox_networks {[str(n) for n in allowed]}: workers would refuse it; "
                    "set mailbox_bind to an address inside them")
            found = inside
        outside = [a for a in found if not ipaddress.ip_address(a).is_loopback]
        if len(outside) > 1:
            raise SQMError(
                f"the brokers of queue {s.queue!r} are reached from different local "
                f"addresses ({', '.join(outside)}): one mailbox cannot serve them all; "
                "set mailbox_bind to an address every broker's workers reach")
        return (outside or found)[0]

    def set_mailbox(self, bound: str) -> None:
        self.mailbox = bound.encode("ascii")

    # ------------------------------------------------------------ outgoing

    def next_id(self) -> str:
        self._counter += 1
        return f"{self.prefix}:{self._counter}"

    def encode_submit(
        self,
        method: str,
        payload: Any,
        *,
        oneway: bool,
        timeout: float | None,
        retries: int,
        priority: str = "normal",
        ttl: float | None = None,
        not_before: float = 0.0,
        time_limit: float = 0.0,
        ack: bool = False,
    ) -> tuple[str, list[bytes]]:
        """Build the SUBMIT frames and start tracking the id (unless oneway).

        The envelope's deadline is the smaller of ``timeout`` and ``ttl``;
        only ``timeout`` bounds how long a receive waits for the reply.
        ``ack``: the worker acknowledges the start at once (FLAG_ACK), not
        only at its next heartbeat.
        """
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string")
        if not isinstance(retries, int) or not 0 <= retries <= 255:
            raise ValueError("retries must be an int between 0 and 255")
        try:
            prio = protocol.PRIORITIES[priority]
        except KeyError:
            raise ValueError("priority must be 'high', 'normal' or 'low'") from None
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        expires = timeout
        if ttl is not None:
            if ttl <= 0:
                raise ValueError("ttl must be positive")
            expires = ttl if timeout is None else min(timeout, ttl)
        try:
            body = self.serializer.dumps(payload)
        except Exception as exc:
            raise serializers.SerializerError(
                f"cannot encode payload with {self.serializer.name}: {exc}"
            ) from exc
        if len(body) > self.max_message_size:
            raise MessageTooLarge(
                f"encoded payload is {len(body)} bytes; the limit is {self.max_message_size}"
            )
        method_b = method.encode("utf-8")
        if len(method_b) > protocol.MAX_METHOD:
            raise ValueError("method name too long")
        mid = self.next_id()
        env = pack_envelope(
            FLAG_ONEWAY if oneway else ACK_COMPACT if ack else FLAG_COMPACT_REPLY,
            retries,
            prio,
            time.time() + expires if expires else 0.0,
            mid.encode(),
            self.mailbox,
            method_b,
            self.sertag,
            not_before=not_before,
            time_limit=time_limit,
        )
        frames = [SIGNATURE, SUBMIT, env, body]
        if not oneway:
            self.outstanding[mid] = time.monotonic() + timeout if timeout else None
        return mid, frames

    # ------------------------------------------------------------ incoming

    def feed(self, frames: list[bytes], from_broker: bool) -> str | None:
        """Take one incoming message; return its id if it made a reply ready for receive()."""
        if len(frames) == 1 and not from_broker and frames[0].startswith(COMPACT_RESULT):
            frames = classic_result(frames[0])
        if len(frames) < 3 or frames[0] != SIGNATURE:
            self.dropped += 1
            return None
        kind = frames[1]
        if kind == ACCEPTED:
            # [SIG, K, packed ids]: sqm batches them; often after the reply
            # itself, so never counted as "dropped".
            if from_broker:
                outstanding = self.outstanding
                for raw in unpack_ids(frames[2]):
                    mid = raw.decode("ascii", "replace")
                    if mid in outstanding:
                        self.accepted.add(mid)
            return None
        try:
            mid = frames[2].decode("ascii")
        except UnicodeDecodeError:
            self.dropped += 1
            return None
        if mid not in self.outstanding:
            self.dropped += 1  # late (timed out), duplicate, oneway, or foreign
            return None
        if kind == RESULT and len(frames) == 4 and not from_broker:
            outcome = Outcome(OK, data=frames[3])
        elif kind == ERROR and len(frames) >= 5:
            emsg = frames[4].decode("utf-8", "replace")
            if from_broker and emsg == ID_IN_USE and frames[3] == b"Malformed":
                self.accepted.add(mid)  # a re-sent copy met its original: sqm has it
                return None
            if (from_broker and self.brokers > 1 and frames[3] == b"BrokerShutdown"
                    and mid in self.sent):
                self.stopping.append((mid, self.sent[mid]))  # never started: safe elsewhere
                return None
            outcome = Outcome(
                FAILED,
                etype=frames[3].decode("utf-8", "replace"),
                emsg=emsg,
                trace=frames[5].decode("utf-8", "replace") if len(frames) > 5 else "",
                from_broker=from_broker,
            )
        elif kind == ACK and not from_broker:
            if mid not in self.started:
                self.started.add(mid)
                sent = self.sent.pop(mid, None)  # a worker has it: no broker needs it again
                if sent is not None and len(frames) == 4:  # its worker will repeat it
                    # _watch_worker inlined, the beat parsed once per value: every
                    # ACK of a worker with a heartbeat comes here.
                    interval = self._beats.get(frames[3])
                    if interval is None:
                        interval = self._beat(frames[3])
                    if interval:
                        self.running[mid] = [sent[0], sent[1], monotonic(), interval]
                if self.hooks:
                    hooks = self.hooks.get(mid)
                    if hooks is not None:
                        hooks.started(self, mid)
            elif self.running:
                running = self.running.get(mid)
                if running is not None:
                    running[2] = monotonic()
            return None
        elif kind == PROGRESS and not from_broker and len(frames) == 5:
            hooks = self.hooks.get(mid) if self.hooks else None
            if hooks is not None:
                try:
                    done, total = int(frames[3]), int(frames[4])
                except ValueError:
                    self.dropped += 1
                    return None
                hooks.status(self, mid, done, total)
            return None
        else:
            self.dropped += 1
            return None
        # _end() inlined: one call less on every reply.
        del self.outstanding[mid]
        self.started.discard(mid)
        self.accepted.discard(mid)
        self.sent.pop(mid, None)
        if self.running:
            self.running.pop(mid, None)
        if self.hooks:
            hooks = self.hooks.pop(mid, None)
            if hooks is not None and hooks.consumes:
                self.consuming -= 1
                hooks.finish(self, mid, outcome)
                return None
        self.ready[mid] = outcome
        return mid

    def _end(self, mid: str, outcome: Outcome) -> str | None:
        """``mid`` ended with ``outcome``: to its hooks, or ready for receive()."""
        del self.outstanding[mid]
        self.started.discard(mid)
        self.accepted.discard(mid)
        self.sent.pop(mid, None)
        if self.running:
            self.running.pop(mid, None)
        if self.hooks:
            hooks = self.hooks.pop(mid, None)
            if hooks is not None and hooks.consumes:
                self.consuming -= 1
                hooks.finish(self, mid, outcome)
                return None
        self.ready[mid] = outcome
        return mid

    def _beat(self, beat: bytes) -> float:
        """A worker's heartbeat (ACK's 4th frame, ms) in seconds; 0 if it is not one.

        Remembered per value (workers of a queue share a few), so feed() does
        not parse it again on every ACK.
        """
        try:
            interval = max(0.0, int(beat) / 1000)
        except ValueError:
            interval = 0.0
        if len(self._beats) >= 64:  # foreign garbage must not grow it without bound
            self._beats.clear()
        self._beats[beat] = interval
        return interval

    def slowest_beat(self) -> float:
        """The longest heartbeat (s) a worker's ACK has named so far (0: none yet)."""
        return max(self._beats.values(), default=0.0)

    def silent_workers(self, now: float, gone: Any) -> list[str]:
        """Started messages whose broker is ``gone(link)`` and whose worker has
        not repeated its ACK for 3 of its beats: it died with the broker."""
        return [mid for mid, (_, link, last, beat) in self.running.items()
                if now - last > 3 * beat and gone(link)]

    def lose(self, mid: str, why: str, etype: str = "WorkerLost") -> str | None:
        """Fail ``mid`` with ``etype`` here (its broker is gone, so nobody else
        will); returns ``mid`` if it became ready for receive()."""
        if mid not in self.outstanding:
            self.running.pop(mid, None)
            return None
        return self._end(mid, Outcome(FAILED, etype=etype, emsg=why, from_broker=True))

    def cancel(self, mid: str) -> bool:
        """End ``mid`` here with ``Cancelled`` (see Sender.cancel); False if it
        has ended (its outcome arrived) or is unknown. A reply arriving later is dropped."""
        if mid not in self.outstanding:
            return False
        self._end(mid, Outcome(FAILED, etype="Cancelled", emsg="cancelled by its sender",
                               from_broker=True))
        return True

    def watch(self, mid: str, hooks: Any) -> None:
        """Route ``mid``'s acknowledgement, progress and (if it consumes) outcome to ``hooks``."""
        self.hooks[mid] = hooks
        if hooks.consumes:
            self.consuming += 1

    def take(self, mid: str | None) -> Outcome | None:
        """The outcome for ``mid`` (or the oldest one, when None), if it has arrived."""
        if mid is None:
            if not self.ready:
                return None
            mid = next(iter(self.ready))
        return self.ready.pop(mid, None)

    def receivable(self) -> bool:
        """True while receive() without an id has something to wait for."""
        return bool(self.ready) or len(self.outstanding) > self.consuming

    def check_waitable(self, mid: str | None) -> None:
        if mid is None:
            if not self.receivable():
                raise SQMError(
                    "nothing to receive: no message is outstanding"
                    + (" (those with on_complete/on_fail go to their callbacks)"
                       if self.consuming else "")
                )
        elif mid not in self.ready and mid not in self.outstanding:
            raise SQMError(f"unknown message id {mid!r} (already received, oneway, or not ours)")
        elif mid in self.hooks and self.hooks[mid].consumes:
            raise SQMError(f"message {mid!r} goes to its on_complete/on_fail callbacks, "
                           "not to receive(); use poll()")

    def forget(self, mid: str) -> None:
        """Stop waiting for ``mid``: a reply arriving later is dropped."""
        self.outstanding.pop(mid, None)
        self.started.discard(mid)
        self.accepted.discard(mid)
        self.sent.pop(mid, None)
        self.running.pop(mid, None)
        self.ready.pop(mid, None)
        if self.hooks:
            hooks = self.hooks.pop(mid, None)
            if hooks is not None and hooks.consumes:
                self.consuming -= 1

    def deadline_for(self, mid: str | None, timeout: float | None, default: float | None) -> float:
        """Monotonic deadline for a wait: explicit timeout, else the message's, else default."""
        if timeout is not None:
            return time.monotonic() + timeout
        if mid is not None:
            own = self.outstanding.get(mid)
            if own is not None:
                return own
        if default is None:
            return float("inf")
        return time.monotonic() + default

    def result(self, outcome: Outcome) -> Any:
        """Decode a result, or raise the error it carries."""
        if outcome.kind == OK:
            # Workers answer in the serializer of the message: this sender's.
            try:
                return self.serializer.loads(outcome.data)
            except Exception as exc:
                raise SerializerError(
                    f"cannot decode the reply with {self.serializer.name}: {exc}"
                ) from exc
        if outcome.from_broker:
            if outcome.etype == "WorkerLost":
                try:
                    deliveries = int(json.loads(outcome.trace or "{}").get("deliveries", 1))
                except (ValueError, AttributeError):
                    deliveries = 1
                raise WorkerLost(outcome.emsg, deliveries=deliveries)
            cls = BROKER_ERRORS.get(outcome.etype)
            if cls is not None:
                raise cls(outcome.emsg)
        raise RemoteError(outcome.etype, outcome.emsg, outcome.trace)


NO_TIMING = (0.0, 0.0)  # (not_before, time_limit) of a message due now, with no limit


def timing(delay: float | None, not_before: float | None,
           time_limit: float | None) -> tuple[float, float]:
    """``(not_before, time_limit)`` for the envelope from submit's arguments (checked)."""
    if delay is not None and not_before is not None:
        raise ValueError("give delay or not_before, not both")
    due = 0.0
    if delay is not None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        due = time.time() + delay if delay else 0.0
    elif not_before is not None:
        if not 0 <= not_before < 1e11:
            raise ValueError("not_before must be a unix time in seconds")
        due = float(not_before)
    limit = 0.0
    if time_limit is not None:
        if not 0 < time_limit < 1e9:
            raise ValueError("time_limit must be positive")
        limit = float(time_limit)
    return due, limit


def read_all(sock: zmq.Socket, core: Correlator, from_broker: bool) -> int:
    """Feed every message waiting on ``sock`` to ``core`` without blocking; how many."""
    feed = core.feed
    n = 0
    while True:
        try:
            frames = recv_message(sock)
        except zmq.Again:
            return n
        n += 1
        feed(frames, from_broker)
