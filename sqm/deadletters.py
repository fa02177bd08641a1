"""Dead letters (``sqm serve --dead-letters N``): what failed without a worker's answer, kept.

Every accepted message that sqm itself fails back to its caller (WorkerLost
after its retries or ``--max-deliveries``, Expired, and the later time
limit and retry outcomes) is kept here with its envelope and payload as
received, the reason (the error type the caller got), its attempts and the
caller's connection, so an operator can look at it (``sqm dead list``),
run it again (``sqm dead replay``) or drop it (``sqm dead purge``).

Not dead letters: a worker's own error reply (the worker answered), and
what the caller or an operator chose to end (``Cancelled``, ``Purged``) or
sqm's stop (``BrokerShutdown``: kept by the journal instead, or failed back
at once). Refusals at submit were never accepted and never come here.

The list is bounded per queue (oldest dropped first) and, with
``--journal``, kept in the journal's ``dead_letters`` table across
restarts. All of it runs on failures only: the hot path never sees it
(the plugin uses :meth:`~sqm.plugins.Plugin.failed_back`, not ``ended``).
Nothing here decodes a payload.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import protocol
from .core import Message
from .plugins import ControlHandler, Plugin

if TYPE_CHECKING:
    from .broker.server import QueueServer
    from .journal import Journal

log = logging.getLogger("sqm.broker")

DEFAULT_LIMIT = 10_000

#: Failure outcomes that are not dead letters: chosen by someone (the caller,
#: an operator) or sqm's own stop. Every other error type sqm fails an
#: accepted message back with is one (new ones included, e.g. TimeLimitExceeded).
NOT_DEAD = frozenset({"Cancelled", "Purged", "BrokerShutdown"})

_DEADLINE = struct.Struct("!d")
DEADLINE_OFFSET = 4  # flags, retries, priority, pad, then the deadline (protocol.ENVELOPE_HEAD)


@dataclass
class DeadLetter:
    """One message that ended in failure without a worker's answer."""

    id: bytes
    origin: bytes  # the caller's connection (routing id) when it was submitted
    envelope: bytes  # as received
    payload: bytes  # as received, never decoded
    reason: str  # the error type the caller got
    attempts: int  # deliveries to a worker
    failed_at: float  # unix time

    def describe(self, payloads: bool = True) -> dict[str, Any]:
        """The JSON object ``sqm dead list --json`` prints."""
        try:
            head = protocol.decode_envelope(self.envelope)
            method, serializer, mailbox = head.method, head.serializer, head.mailbox
            oneway = head.oneway
        except ValueError:  # journaled by an older sqm, or damaged: show what we can
            method = serializer = mailbox = b""
            oneway = False
        out: dict[str, Any] = {
            "id": show(self.id),
            "method": method.decode("utf-8", "replace"),
            "reason": self.reason,
            "attempts": self.attempts,
            "failed_at": self.failed_at,
            "serializer": serializer.decode("utf-8", "replace"),
            "size": len(self.payload),
            "mailbox": mailbox.decode("utf-8", "replace"),
            "oneway": oneway,
        }
        if payloads:
            out["payload"] = base64.b64encode(self.payload).decode("ascii")
        return out


def show(mid: bytes) -> str:
    """A message id as operators type it (Sender ids are ASCII)."""
    return mid.decode("utf-8", "backslashreplace")


@dataclass
class QueueLetters:
    """One queue's dead letters, oldest first, keyed by message id."""

    entries: dict[bytes, DeadLetter] = field(default_factory=dict)
    total: int = 0  # dead-lettered since start (dropped and purged ones included)


class DeadLetterPlugin(Plugin):
    """Keeps the dead letters of every queue it serves; ``limit`` per queue (0: count only).

    With ``journal``, each change is written in the journal's next commit
    (the JournalPlugin's, at the end of the batch) and :meth:`recover`
    reloads them at start.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT, journal: Journal | None = None) -> None:
        if limit < 0:
            raise ValueError("the dead-letter limit cannot be negative")
        self.limit = limit
        self.journal = journal
        self.queues: dict[str, QueueLetters] = {}

    def letters(self, server: QueueServer) -> QueueLetters:
        found = self.queues.get(server.name)
        if found is None:
            found = self.queues[server.name] = QueueLetters()
        return found

    # -------------------------------------------------------------- hooks

    def recover(self, server: QueueServer, now: float) -> None:
        """Reload the journaled dead letters (the bound applies: oldest dropped)."""
        letters = self.letters(server)
        if self.journal is None:
            return
        for _queue, mid, origin, env, payload, reason, attempts, failed_at in (
            self.journal.load_dead(server.name)
        ):
            letters.entries[mid] = DeadLetter(mid, origin, env, payload, reason, attempts,
                                              failed_at)
        self._trim(server.name, letters)
        if letters.entries:
            log.info("queue %s: %d dead letter(s) from journal %s",
                     server.name, len(letters.entries), self.journal.path)

    def failed_back(self, server: QueueServer, msg: Message, error: str) -> None:
        if error in NOT_DEAD:
            return
        letters = self.letters(server)
        letters.total += 1
        env, payload = protocol.message_parts(msg.frames)
        dead = DeadLetter(msg.id, msg.origin, env, payload, error, msg.deliveries, time.time())
        entries = letters.entries
        entries.pop(msg.id, None)  # the same id again (replayed, failed again): newest wins
        entries[msg.id] = dead
        if self.journal is not None:
            self.journal.add_dead((server.name, dead.id, dead.origin, dead.envelope,
                                   dead.payload, dead.reason, dead.attempts, dead.failed_at))
        self._trim(server.name, letters)

    def status(self, server: QueueServer, data: dict[str, Any]) -> None:
        letters = self.letters(server)
        data["dead_letters"] = len(letters.entries)
        data["dead_total"] = letters.total
        data["dead_letters_limit"] = self.limit

    def control_commands(self) -> dict[str, ControlHandler]:
        return {"dead-list": self.dead_list, "dead-replay": self.dead_replay,
                "dead-purge": self.dead_purge}

    # -------------------------------------------------------------- commands

    def dead_list(self, server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
        """``{"cmd": "dead-list", "payloads": true}``: the dead letters, oldest first."""
        payloads = request.get("payloads", True) is not False
        entries = self.letters(server).entries
        return {"ok": True, "dead": [d.describe(payloads) for d in entries.values()]}

    def dead_replay(self, server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
        """``{"cmd": "dead-replay", "ids": [...]}`` or ``"all": true``: submit them again.

        Each goes back to its original caller (same id, same mailbox) when
        that caller's connection to sqm is still there, else it runs
        oneway (its caller is gone: nobody would read a reply). A replay
        carries no deadline (the old one has usually passed). One that sqm
        refuses now (queue full, no worker for its method...) stays here.
        """
        letters = self.letters(server)
        entries = letters.entries
        ids = request.get("ids")
        if request.get("all"):
            chosen = list(entries)
            missing: list[str] = []
        elif isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids):
            by_name = {show(mid): mid for mid in entries}
            chosen = [by_name[i] for i in ids if i in by_name]
            missing = [i for i in ids if i not in by_name]
        else:
            return {"ok": False, "error": "dead-replay needs \"ids\" (a list of message ids) "
                    "or \"all\": true"}
        replayed: list[dict[str, str]] = []
        refused: list[dict[str, str]] = []
        for mid in chosen:
            dead = entries[mid]
            to_caller = not dead.envelope[0] & protocol.FLAG_ONEWAY and server.reachable(
                dead.origin, [mid])
            msg = replay_message(dead, oneway=not to_caller)
            if msg is None:
                refused.append({"id": show(mid), "error": "Malformed"})
                continue
            outbox = server.core.outbox
            before = len(outbox)
            if not server.resubmit(now, msg):
                refusal = outbox[before] if len(outbox) > before else None
                error = getattr(refusal, "error", "refused")
                del outbox[before:]  # its caller gave up on it long ago: tell it nothing
                refused.append({"id": show(mid), "error": str(error)})
                continue
            del entries[mid]
            if self.journal is not None:
                self.journal.remove_dead(server.name, mid)
            replayed.append({"id": show(mid), "to": "caller" if to_caller else "oneway"})
        return {"ok": True, "replayed": replayed, "refused": refused, "missing": missing}

    def dead_purge(self, server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
        """``{"cmd": "dead-purge"}``: forget every dead letter of the queue."""
        letters = self.letters(server)
        n = len(letters.entries)
        letters.entries.clear()
        if self.journal is not None:
            self.journal.purge_dead(server.name)
        return {"ok": True, "purged": n}

    # -------------------------------------------------------------- helpers

    def _trim(self, queue: str, letters: QueueLetters) -> None:
        entries = letters.entries
        while len(entries) > self.limit:
            oldest = next(iter(entries))
            del entries[oldest]
            if self.journal is not None:
                self.journal.remove_dead(queue, oldest)


def replay_message(dead: DeadLetter, *, oneway: bool) -> Message | None:
    """A fresh :class:`Message` for ``dead``: its envelope with no deadline (and the
    oneway flag set when ``oneway``), its payload untouched. None if the envelope is bad."""
    env = dead.envelope
    try:
        flags, retries, priority, _deadline, _ie, mailbox_end, method_end = protocol.read_head(env)
    except ValueError:
        return None
    if oneway:
        flags |= protocol.FLAG_ONEWAY
    env = (bytes((flags,)) + env[1:DEADLINE_OFFSET] + _DEADLINE.pack(0.0)
           + env[DEADLINE_OFFSET + _DEADLINE.size:])
    return Message(
        dead.id,
        dead.origin,
        [protocol.SIGNATURE, protocol.DISPATCH, env, dead.payload],
        size=len(dead.payload),
        oneway=bool(flags & protocol.FLAG_ONEWAY),
        retries=retries,
        priority=priority,
        deadline=0.0,
        method=env[mailbox_end:method_end],
    )
