"""The part of a sender that does not do I/O: ids, envelopes, correlation.

:class:`Sender` and :class:`AsyncSender` are thin façades over this one
object: they move frames between sockets and :meth:`Correlator.feed`, and
wait in their own style (poll vs. asyncio) for :meth:`Correlator.take`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

import zmq

from sqm import protocol, serializers
from sqm.config import QueueSettings
from sqm.errors import BROKER_ERRORS, MessageTooLarge, RemoteError, SQMError, WorkerLost
from sqm.protocol import (
    ACK,
    ERROR,
    FLAG_ONEWAY,
    PROGRESS,
    RESULT,
    SIGNATURE,
    SUBMIT,
    pack_envelope,
)
from sqm.sockets import local_address_towards
from sqm.zmqfast import recv_frames

OK = 0
FAILED = 1


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
        self.started: set[str] = set()
        self.ready: dict[str, Outcome] = {}  # insertion order = arrival order
        self.mailbox = b""
        self.dropped = 0  # late, duplicate or foreign replies

    # ------------------------------------------------------------ mailbox

    def mailbox_bind_address(self) -> str:
        """Where this sender's mailbox listens, derived from the queue's endpoint."""
        s = self.settings
        configured = s.get("mailbox_bind")
        if configured:
            return str(configured)
        if s.endpoint.startswith("ipc://"):
            directory = s.ipc_dir or s.rundir
            path = os.path.join(directory, f"mbox-{self.prefix}.sock")
            if len(path) > 100:
                path = os.path.join(s.rundir, f"mbox-{self.prefix}.sock")
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            return "ipc://" + path
        host = s.endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
        local = local_address_towards(host)
        return f"tcp://[{local}]:*" if ":" in local else f"tcp://{local}:*"

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
    ) -> tuple[str, list[bytes]]:
        """Build the SUBMIT frames and start tracking the id (unless oneway)."""
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
            FLAG_ONEWAY if oneway else 0,
            retries,
            prio,
            time.time() + timeout if timeout else 0.0,
            mid.encode(),
            self.mailbox,
            method_b,
            self.sertag,
        )
        frames = [SIGNATURE, SUBMIT, env, body]
        if not oneway:
            self.outstanding[mid] = time.monotonic() + timeout if timeout else None
        return mid, frames

    # ------------------------------------------------------------ incoming

    def feed(self, frames: list[bytes], from_broker: bool) -> str | None:
        """Take one incoming message; return its id if it completed an outstanding one."""
        if len(frames) < 3 or frames[0] != SIGNATURE:
            self.dropped += 1
            return None
        kind = frames[1]
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
            outcome = Outcome(
                FAILED,
                etype=frames[3].decode("utf-8", "replace"),
                emsg=frames[4].decode("utf-8", "replace"),
                trace=frames[5].decode("utf-8", "replace") if len(frames) > 5 else "",
                from_broker=from_broker,
            )
        elif kind == ACK and not from_broker:
            self.started.add(mid)
            return None
        elif kind == PROGRESS and not from_broker:
            return None
        else:
            self.dropped += 1
            return None
        del self.outstanding[mid]
        self.started.discard(mid)
        self.ready[mid] = outcome
        return mid

    def take(self, mid: str | None) -> Outcome | None:
        """The outcome for ``mid`` (or the oldest one, when None), if it has arrived."""
        if mid is None:
            if not self.ready:
                return None
            mid = next(iter(self.ready))
        return self.ready.pop(mid, None)

    def check_waitable(self, mid: str | None) -> None:
        if mid is None:
            if not self.ready and not self.outstanding:
                raise SQMError("nothing to receive: no message is outstanding")
        elif mid not in self.ready and mid not in self.outstanding:
            raise SQMError(f"unknown message id {mid!r} (already received, oneway, or not ours)")

    def forget(self, mid: str) -> None:
        """Stop waiting for ``mid``: a reply arriving later is dropped."""
        self.outstanding.pop(mid, None)
        self.started.discard(mid)
        self.ready.pop(mid, None)

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
            return self.serializer.loads(outcome.data)
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


def drain(sock: zmq.Socket, core: Correlator, from_broker: bool) -> None:
    """Feed every message waiting on ``sock`` to ``core`` without blocking."""
    feed = core.feed
    while True:
        try:
            frames = recv_frames(sock)
        except zmq.Again:
            return
        feed(frames, from_broker)
