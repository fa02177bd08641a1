"""Broker input: frames in, typed commands out (the readers table of h11, for sqm).

Each reader takes the frames of one message (after the routing id) and
returns what the command says, or raises :class:`Malformed` with the reason
the broker logs and tells the sender. Frame shapes, envelopes, JSON bodies
and mailbox addresses are checked here and nowhere else; the server
(:mod:`sqm.broker.server`) only acts on what a reader returns.

SUBMIT keeps its fast path: :class:`SubmitReader` returns the core's
:class:`~sqm.core.Message` itself, built from the frames as received (the
command frame becomes DISPATCH so a dispatch forwards the list untouched),
with no intermediate object.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import zmq

from .core import Message
from .protocol import (
    ABILITIES,
    BYE,
    CANCEL,
    COMPACT_HEAD,
    CONTROL,
    CREDIT,
    DISPATCH,
    DONE,
    DONE_FAILED,
    EXTRA,
    FLAG_EXTRA,
    FLAG_ONEWAY,
    FORWARD,
    HEAD,
    HEARTBEAT,
    HELLO,
    MAX_ID,
    NACK,
    RETRY,
    SIGNATURE,
    STATUS,
    SUBMIT,
    SUBMIT_FRAMES,
    MailboxPolicy,
    read_compact,
    read_head,
)

MAX_JSON = 64 * 1024  # the largest JSON body (hello, report, control) sqm decodes
MAX_MAILBOX_CACHE = 100_000  # senders whose last mailbox is remembered as allowed

#: Every command a peer may send sqm, by its wire byte (for plugins and tests).
COMMANDS: dict[bytes, str] = {
    SUBMIT: "submit",
    STATUS: "status",
    CONTROL: "control",
    HELLO: "hello",
    DONE: "done",
    DONE_FAILED: "done-failed",
    HEARTBEAT: "heartbeat",
    BYE: "bye",
    NACK: "nack",
    CREDIT: "credit",
    ABILITIES: "abilities",
    FORWARD: "forward",
    RETRY: "retry",
    CANCEL: "cancel",
}


class Malformed(Exception):
    """The input cannot be acted on; ``reason`` says why (logged, counted, told)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Beat(NamedTuple):
    """A heartbeat: from a worker's socket, or naming the worker (its heartbeat thread)."""

    wid: str | None  # None: [SIG, H] on the worker's own connection
    report: dict[str, Any] | None  # its self-report (rss, nice, busy_s...), if any
    bad_report: bool  # a report frame came but was not a JSON object


def check_signature(frames: list[bytes]) -> bytes:
    """The command byte of an sqm message; Malformed without the signature frame."""
    if len(frames) < 2 or frames[0] != SIGNATURE:
        raise Malformed("missing sqm signature frame")
    return frames[1]


def decode_json(raw: bytes) -> dict[str, Any] | None:
    """A JSON object of at most :data:`MAX_JSON` bytes, or None."""
    if len(raw) > MAX_JSON:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class SubmitReader:
    """Reads SUBMIT into a :class:`Message`, checking its envelope and mailbox.

    It remembers each sender's last allowed mailbox, so the policy check
    (an address parse) runs once per sender rather than once per message.
    """

    def __init__(self, policy: MailboxPolicy) -> None:
        self.policy = policy
        self._mailbox_ok: dict[bytes, bytes] = {}  # sender rid -> last allowed mailbox

    def read(self, rid_frame: zmq.Frame, rid: bytes, frames: list[bytes]) -> Message:
        """The message ``frames`` submit; Malformed if the frames, envelope or mailbox are not right."""
        n = len(frames)
        if n != SUBMIT_FRAMES:
            raise Malformed(f"submit needs {SUBMIT_FRAMES} frames, got {n}")
        env = frames[2]
        try:
            flags, retries, priority, deadline, id_end, mailbox_end, method_end = read_head(env)
        except ValueError:
            raise Malformed("invalid submit envelope") from None
        mailbox = env[id_end:mailbox_end]
        if self._mailbox_ok.get(rid) != mailbox:  # checked here: a call less per message
            self._allow(rid_frame, rid, mailbox)
        frames[1] = DISPATCH  # forwarded as is: only the command changes
        msg = Message(
            env[HEAD:id_end],
            rid,
            frames,
            size=len(frames[3]),
            oneway=bool(flags & FLAG_ONEWAY),
            retries=retries,
            priority=priority,
            deadline=deadline,
            method=env[mailbox_end:method_end],
        )
        if flags & FLAG_EXTRA:
            self._read_extra(msg, env)
        return msg

    def read_compact(self, rid_frame: zmq.Frame, rid: bytes, frames: list[bytes]) -> Message:
        """:meth:`read` for a compact SUBMIT, ``[SQM1s + envelope + payload]``.

        The frame is kept as it came (``frames``, one frame): it is the
        compact DISPATCH as it stands.
        """
        frame = frames[0]
        try:
            (flags, retries, priority, deadline, id_end, mailbox_end, method_end,
             end) = read_compact(frame)
        except ValueError:
            raise Malformed("invalid submit envelope") from None
        mailbox = frame[id_end:mailbox_end]
        if self._mailbox_ok.get(rid) != mailbox:
            self._allow(rid_frame, rid, mailbox)
        msg = Message(
            frame[COMPACT_HEAD + HEAD:id_end],
            rid,
            frames,
            size=len(frame) - end,
            oneway=bool(flags & FLAG_ONEWAY),
            retries=retries,
            priority=priority,
            deadline=deadline,
            method=frame[mailbox_end:method_end],
        )
        if flags & FLAG_EXTRA:
            self._read_extra(msg, frame[:end])
        return msg

    @staticmethod
    def _read_extra(msg: Message, env: bytes) -> None:
        """The envelope's EXTRA tail (scheduled, time-limited, retried) onto ``msg``."""
        not_before, time_limit, attempts = EXTRA.unpack_from(env, len(env) - EXTRA.size)
        if not (0.0 <= not_before < 1e11 and 0.0 <= time_limit < 1e9):
            raise Malformed("not_before or time_limit out of range")
        msg.not_before = not_before
        msg.time_limit = time_limit
        msg.attempts = attempts

    def _allow(self, rid_frame: zmq.Frame, rid: bytes, mailbox: bytes) -> None:
        """Malformed unless the policy allows ``mailbox`` (remembered for ``rid`` once it does)."""
        reason = self._check_mailbox(rid_frame, rid, mailbox)
        if reason:
            raise Malformed(f"mailbox refused: {reason}")

    def _check_mailbox(self, rid_frame: zmq.Frame, rid: bytes, mailbox: bytes) -> str | None:
        try:
            addr = mailbox.decode("ascii")
        except UnicodeDecodeError:
            return "mailbox is not ASCII"
        try:
            peer = rid_frame.get("Peer-Address")
        except zmq.ZMQError:
            peer = None
        reason = self.policy.check(addr, peer if isinstance(peer, str) else None)
        if reason is None:
            if len(self._mailbox_ok) > MAX_MAILBOX_CACHE:
                self._mailbox_ok.clear()
            self._mailbox_ok[rid] = mailbox
        return reason


def read_message_id(frames: list[bytes], what: str) -> bytes:
    """DONE, DONE_FAILED and NACK: ``[SIG, cmd, id]``."""
    if len(frames) != 3:
        raise Malformed(f"{what} needs 3 frames")
    return frames[2]


def read_message_ids(frames: list[bytes], what: str) -> list[bytes]:
    """A batched DONE / DONE_FAILED: ``[SIG, cmd, id, id, ...]`` (at least one id)."""
    if len(frames) < 3:
        raise Malformed(f"{what} needs at least 3 frames")
    return frames[2:]


def read_given_back(frames: list[bytes]) -> list[bytes]:
    """GIVE_BACK: ``[SIG, G, id, ...]``, zero ids or more, each a message id."""
    ids = frames[2:]
    for msg_id in ids:
        if not 0 < len(msg_id) <= MAX_ID:
            raise Malformed(f"give-back ids must be 1 to {MAX_ID} bytes")
    return ids


def read_credit(frames: list[bytes]) -> int:
    """CREDIT: ``[SIG, C, n]``, n parked slots free again."""
    try:
        slots = int(frames[2]) if len(frames) == 3 else -1
    except ValueError:
        slots = -1
    if slots < 0:
        raise Malformed("credit needs 3 frames, the last a count")
    return slots


BARE_BEAT = Beat(None, None, False)


def read_heartbeat(frames: list[bytes]) -> Beat:
    """HEARTBEAT: ``[SIG, H]``, ``[SIG, H, wid]`` or ``[SIG, H, wid, json report]``."""
    n = len(frames)
    if n == 3:
        return Beat(frames[2].decode("utf-8", "replace"), None, False)
    if n == 4:
        report = decode_json(frames[3])
        return Beat(frames[2].decode("utf-8", "replace"), report, report is None)
    return BARE_BEAT


def read_hello(frames: list[bytes]) -> dict[str, Any]:
    """HELLO: ``[SIG, W, json info]``."""
    info = decode_json(frames[2]) if len(frames) == 3 else None
    if info is None:
        raise Malformed("hello needs a JSON object")
    return info


def read_abilities(frames: list[bytes]) -> dict[str, Any]:
    """ABILITIES: ``[SIG, M, json {"methods": [...]}]``."""
    info = decode_json(frames[2]) if len(frames) == 3 else None
    if info is None or not isinstance(info.get("methods"), list):
        raise Malformed("abilities needs a JSON object with a methods list")
    return info


class Forward(NamedTuple):
    """FORWARD: a worker hands the message it holds on to another method."""

    id: bytes
    mailbox: bytes
    method: bytes
    flags: int
    deadline: float


def read_forward(frames: list[bytes]) -> Forward:
    """FORWARD: ``[SIG, V, envelope, payload]``; the command frame becomes DISPATCH."""
    if len(frames) != SUBMIT_FRAMES:
        raise Malformed(f"forward needs {SUBMIT_FRAMES} frames, got {len(frames)}")
    env = frames[2]
    try:
        flags, _retries, _priority, deadline, id_end, mailbox_end, method_end = read_head(env)
    except ValueError:
        raise Malformed("invalid forward envelope") from None
    frames[1] = DISPATCH
    return Forward(env[HEAD:id_end], env[id_end:mailbox_end], env[mailbox_end:method_end],
                   flags, deadline)


class RetryRequest(NamedTuple):
    """RETRY: run the message again after ``delay`` s, unless ``max_retries`` are used up."""

    id: bytes
    delay: float
    max_retries: int
    error: str  # the last error, "Type: message"


def read_retry(frames: list[bytes]) -> RetryRequest:
    """RETRY: ``[SIG, T, id, delay_ms, max_retries, json {"type", "message"}]``."""
    if len(frames) != 6:
        raise Malformed("retry needs 6 frames")
    try:
        delay_ms, max_retries = int(frames[3]), int(frames[4])
    except ValueError:
        raise Malformed("retry delay and max_retries must be integers") from None
    if not (0 <= delay_ms <= 10**10 and 0 <= max_retries <= 255):
        raise Malformed("retry delay or max_retries out of range")
    body = decode_json(frames[5]) or {}
    error = f"{str(body.get('type', 'Error'))[:200]}: {str(body.get('message', ''))[:2000]}"
    return RetryRequest(frames[2], delay_ms / 1000.0, max_retries, error)


def read_control(frames: list[bytes]) -> dict[str, Any]:
    """CONTROL: ``[SIG, !, json request]``."""
    request = decode_json(frames[2]) if len(frames) == 3 else None
    if request is None:
        raise Malformed("control needs 3 frames, the last a JSON object")
    return request
