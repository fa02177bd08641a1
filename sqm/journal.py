"""The durable journal (``sqm serve --journal FILE``).

sqm records every accepted message (its envelope and payload frames, as
received: nothing is decoded) before it acknowledges it to the sender, and
records its end when it has ended (done, or failed back). After a crash, what
is left is exactly the accepted-but-unfinished messages; a restarted sqm
queues them again in their original order.

Messages live in an append-only log beside FILE, ``FILE-messages``
(:mod:`sqm.journal_log`): the broker collects the records of everything it
handled since the last flush and appends them with one ``write()``, then
sends the ACCEPTED acknowledgements. A message accepted and ended within the
same batch costs nothing. A completed ``write()`` survives a crash of sqm
(SIGKILL, OOM), which is what the journal promises; ``fsync=True``
(``--journal-fsync``) also survives a power cut at the cost of one
``fdatasync`` per batch.

FILE itself is a SQLite database that keeps the dead letters
(:mod:`sqm.deadletters`), written on failures only. A journal written by an
older sqm (messages as SQLite rows) is migrated into the log when opened.

One sqm at a time may use a journal file: an exclusive ``flock`` on
``FILE.lock`` says so, and a second sqm gets a clear error.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from typing import TYPE_CHECKING, NamedTuple

from . import protocol
from .core import Message
from .errors import ConfigError
from .journal_log import Key, LogFormatError, MessageLog, add_record, end_record
from .plugins import Plugin

if TYPE_CHECKING:
    from .broker.server import QueueServer

log = logging.getLogger("sqm.broker")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    queue    TEXT NOT NULL,
    id       BLOB NOT NULL,
    origin   BLOB NOT NULL,
    envelope BLOB NOT NULL,
    payload  BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (queue, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    queue     TEXT NOT NULL,
    id        BLOB NOT NULL,
    origin    BLOB NOT NULL,
    envelope  BLOB NOT NULL,
    payload   BLOB NOT NULL,
    reason    TEXT NOT NULL,
    attempts  INTEGER NOT NULL,
    failed_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_by_id ON dead_letters (queue, id);
"""

#: A dead letter's row: queue, id, origin, envelope, payload, reason, attempts, failed_at.
DeadRow = tuple[str, bytes, bytes, bytes, bytes, str, int, float]


class Recovered(NamedTuple):
    """A journaled message that had not ended when sqm stopped."""

    id: bytes
    origin: bytes
    envelope: bytes
    payload: bytes


class Journal:
    """Accepted-but-unfinished messages of one or more queues: a log, plus SQLite for dead letters."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.log_path = self.path + "-messages"
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise ConfigError(f"journal directory {parent} does not exist")
        self._lock = open(self.path + ".lock", "a+")  # noqa: SIM115 - held for our lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ConfigError(f"journal {self.path} is in use by another sqm") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            self._lock.close()
            raise ConfigError(f"cannot use journal {self.path}: {exc}") from None
        try:
            self.log = MessageLog(self.log_path, fsync=fsync)
        except LogFormatError:
            self.db.close()
            self._lock.close()
            raise ConfigError(f"journal {self.log_path} is not an sqm message log") from None
        except OSError as exc:
            self.db.close()
            self._lock.close()
            raise ConfigError(f"cannot use journal {self.log_path}: {exc}") from None
        # This batch, in order: accepted (key, origin, envelope, payload) or ended (key, None...).
        self._ops: list[tuple[Key | None, bytes | None, bytes, bytes]] = []
        self._pending: dict[Key, int] = {}  # key -> index in _ops of its not-yet-written add
        self._names: dict[str, bytes] = {}
        # Dead-letter changes (failures only, never the hot path), in order.
        self._dead: list[tuple[str, tuple[object, ...]]] = []
        self._added = 0
        #: Accepted messages committed (an add ended in the same batch counts, unwritten).
        self.written_total = 0
        #: Of those, ended before their commit: no record written at all.
        self.cancelled_total = 0
        self.commits_total = 0
        self.closed = False
        self._migrate()

    def _migrate(self) -> None:
        """Move the messages an older sqm kept as SQLite rows into the log (then delete the rows).

        A crash between the two steps re-adds the same ids at the next start:
        the log keeps one of each.
        """
        rows = self.db.execute(
            "SELECT queue, id, origin, envelope, payload FROM messages ORDER BY seq"
        ).fetchall()
        if not rows:
            return
        for q, i, o, e, p in rows:
            self.add(str(q), bytes(i), bytes(o), bytes(e), bytes(p))
        fsync, self.log.fsync = self.log.fsync, True  # the rows are deleted next: be sure
        try:
            self.commit()
        finally:
            self.log.fsync = fsync
        self.db.execute("DELETE FROM messages")
        log.info("journal %s: moved %d message(s) from SQLite rows to %s",
                 self.path, len(rows), self.log_path)

    def add(self, queue: str, mid: bytes, origin: bytes, envelope: bytes, payload: bytes) -> None:
        """Record an accepted message at the next :meth:`commit` (the latest frames win)."""
        key = (queue, mid)
        ops = self._ops
        pending = self._pending
        earlier = pending.get(key)
        if earlier is not None:
            ops[earlier] = _CANCELLED
        pending[key] = len(ops)
        ops.append((key, origin, envelope, payload))
        self._added += 1

    def remove(self, queue: str, mid: bytes) -> None:
        """Forget an ended message at the next :meth:`commit` (free if it was not written yet)."""
        key = (queue, mid)
        index = self._pending.pop(key, None)
        if index is not None:
            self._ops[index] = _CANCELLED
            self.cancelled_total += 1
        if key in self.log.live:
            self._ops.append((key, None, b"", b""))

    def add_dead(self, row: DeadRow) -> None:
        """Keep a dead letter at the next :meth:`commit` (replacing one of the same id)."""
        self._dead.append((
            "INSERT OR REPLACE INTO dead_letters (queue, id, origin, envelope, payload, reason, "
            "attempts, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row))

    def remove_dead(self, queue: str, mid: bytes) -> None:
        """Forget a dead letter (replayed, or dropped by the bound) at the next :meth:`commit`."""
        self._dead.append(("DELETE FROM dead_letters WHERE queue = ? AND id = ?", (queue, mid)))

    def purge_dead(self, queue: str) -> None:
        """Forget every dead letter of ``queue`` at the next :meth:`commit`."""
        self._dead.append(("DELETE FROM dead_letters WHERE queue = ?", (queue,)))

    def load_dead(self, queue: str) -> list[DeadRow]:
        """The queue's dead letters, oldest first."""
        rows = self.db.execute(
            "SELECT queue, id, origin, envelope, payload, reason, attempts, failed_at "
            "FROM dead_letters WHERE queue = ? ORDER BY seq", (queue,)
        ).fetchall()
        return [(str(q), bytes(i), bytes(o), bytes(e), bytes(p), str(r), int(a), float(f))
                for q, i, o, e, p, r, a, f in rows]

    @property
    def dirty(self) -> bool:
        return bool(self._ops or self._dead)

    def commit(self) -> None:
        """Write what was accepted and ended since the last commit: one append to the log.

        Dead-letter changes go to SQLite first (failures only): a crash
        between the two keeps the message live (delivered again) rather
        than losing its dead letter.
        """
        if self._dead:
            dead, self._dead = self._dead, []
            db = self.db
            db.execute("BEGIN")
            try:
                for statement, params in dead:
                    db.execute(statement, params)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        ops = self._ops
        if not ops:
            return
        self._ops = []
        self._pending.clear()
        self.written_total += self._added
        self._added = 0
        mlog = self.log
        live = mlog.live
        names = self._names
        out: list[bytes] = []
        grown = 0
        for key, origin, envelope, payload in ops:
            if key is None:
                continue  # an add cancelled by its end (or by a newer add)
            queue, mid = key
            qname = names.get(queue)
            if qname is None:
                qname = names[queue] = queue.encode()
            old = live.pop(key, None)
            if old is not None:
                grown -= old[3]
            if origin is None:
                out.append(end_record(qname, mid))
            else:
                size = add_record(qname, mid, origin, envelope, payload, out)
                live[key] = (origin, envelope, payload, size)
                grown += size
        mlog.append(b"".join(out))
        mlog.live_bytes += grown
        self.commits_total += 1
        if mlog.should_compact():
            mlog.compact()

    def load(self, queue: str) -> list[Recovered]:
        """The queue's unfinished messages, oldest first."""
        return [Recovered(mid, o, e, p) for (q, mid), (o, e, p, _) in self.log.live.items()
                if q == queue]

    def count(self, queue: str) -> int:
        return sum(1 for q, _ in self.log.live if q == queue)

    def close(self) -> None:
        """Commit what is left and release the files (a second call does nothing)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.commit()
        finally:
            self.log.close()
            self.db.close()
            self._lock.close()


#: An add that needs no record (its message ended, or a newer add replaced it, in the same batch).
_CANCELLED: tuple[Key | None, bytes | None, bytes, bytes] = (None, None, b"", b"")


class JournalPlugin(Plugin):
    """The journal as a broker plugin: record on accept, forget on end, commit per batch.

    Accepted means journaled: ACCEPTED notices go out only after the batch's
    commit (:meth:`before_acks`), so the server reads input in batches.
    Pending messages are kept across a stop, and queued again at the next
    start (:meth:`recover`). The journal is closed when the last queue
    using it closes.
    """

    batching = True
    keeps_pending = True

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._serving: set[str] = set()

    def recover(self, server: QueueServer, now: float) -> None:
        """Queue again what the journal holds: accepted before a restart, never ended."""
        self._serving.add(server.name)
        journal = self.journal
        rows = journal.load(server.name)
        for row in rows:
            try:
                flags, retries, priority, deadline, id_end, mailbox_end, method_end = (
                    protocol.read_head(row.envelope)
                )
            except ValueError:
                journal.remove(server.name, row.id)
                continue
            not_before, time_limit, attempts = protocol.read_extra(row.envelope)
            server.core.restore(
                now,
                Message(
                    row.id,
                    row.origin,
                    [protocol.SIGNATURE, protocol.DISPATCH, row.envelope, row.payload],
                    size=len(row.payload),
                    oneway=bool(flags & protocol.FLAG_ONEWAY),
                    retries=retries,
                    priority=priority,
                    deadline=deadline,
                    method=row.envelope[mailbox_end:method_end],
                    not_before=not_before,
                    time_limit=time_limit,
                    attempts=attempts,
                ),
            )
        journal.commit()
        if rows:
            log.info("queue %s: recovered %d message(s) from journal %s",
                     server.name, len(rows), journal.path)

    def accepted(self, server: QueueServer, msg: Message) -> None:
        env, payload = protocol.message_parts(msg.frames)
        self.journal.add(server.name, msg.id, msg.origin, env, payload)

    def ended(self, server: QueueServer, msg: Message, outcome: str) -> None:
        self.journal.remove(server.name, msg.id)

    def before_acks(self, server: QueueServer) -> None:
        if self.journal.dirty:
            self.journal.commit()

    def status(self, server: QueueServer, data: dict[str, object]) -> None:
        journal = self.journal
        data["journal"] = {
            "path": journal.path,
            "written_total": journal.written_total,
            "commits_total": journal.commits_total,
            "log_bytes": journal.log.size,
            "compactions_total": journal.log.compactions,
        }

    def closing(self, server: QueueServer) -> None:
        self._serving.discard(server.name)
        if not self._serving:
            self.journal.close()
        else:
            self.journal.commit()
