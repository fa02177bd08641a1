"""The durable journal (``sqm serve --journal FILE``): SQLite from the standard library.

sqm records every accepted message (its envelope and payload frames, as
received: nothing is decoded) before it acknowledges it to the sender, and
deletes it when it has ended (done, or failed back). After a crash, the
rows left are exactly the accepted-but-unfinished messages; a restarted sqm
queues them again in their original order.

Writes are batched: the broker collects the rows of everything it handled
since the last flush and commits them in one transaction, then sends the
ACCEPTED acknowledgements. WAL mode with ``synchronous=NORMAL`` makes a
commit durable against a crash of sqm (SIGKILL, OOM), which is what the
journal promises; ``fsync=True`` (``--journal-fsync``) also survives a
power cut at the cost of one fsync per batch.

The same file keeps the dead letters (:mod:`sqm.deadletters`) in a table
of their own, written in the same commits (on failures only).

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
    """Accepted-but-unfinished messages of one or more queues, in one SQLite file."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = os.path.abspath(path)
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
        self._adds: list[tuple[str, bytes, bytes, bytes, bytes]] = []
        self._removes: list[tuple[str, bytes]] = []
        # Dead-letter changes (failures only, never the hot path), in order.
        self._dead: list[tuple[str, tuple[object, ...]]] = []
        self.written_total = 0
        self.commits_total = 0
        self.closed = False

    def add(self, queue: str, mid: bytes, origin: bytes, envelope: bytes, payload: bytes) -> None:
        """Record an accepted message at the next :meth:`commit`."""
        self._adds.append((queue, mid, origin, envelope, payload))

    def remove(self, queue: str, mid: bytes) -> None:
        """Forget an ended message at the next :meth:`commit`."""
        self._removes.append((queue, mid))

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
        return bool(self._adds or self._removes or self._dead)

    def commit(self) -> None:
        """Write what was added and removed since the last commit, in one transaction."""
        adds, removes = self._adds, self._removes
        if not adds and not removes:
            if not self._dead:
                return
        self._adds, self._removes = [], []
        dead, self._dead = self._dead, []
        db = self.db
        db.execute("BEGIN")
        try:
            if adds:
                db.executemany(
                    "INSERT OR REPLACE INTO messages (queue, id, origin, envelope, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    adds,
                )
            if removes:
                db.executemany("DELETE FROM messages WHERE queue = ? AND id = ?", removes)
            for statement, params in dead:
                db.execute(statement, params)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self.written_total += len(adds)
        self.commits_total += 1

    def load(self, queue: str) -> list[Recovered]:
        """The queue's unfinished messages, oldest first."""
        rows = self.db.execute(
            "SELECT id, origin, envelope, payload FROM messages WHERE queue = ? ORDER BY seq",
            (queue,),
        ).fetchall()
        return [Recovered(bytes(a), bytes(b), bytes(c), bytes(d)) for a, b, c, d in rows]

    def count(self, queue: str) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        """Commit what is left and release the file (a second call does nothing)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.commit()
        finally:
            self.db.close()
            self._lock.close()


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
        frames = msg.frames
        self.journal.add(server.name, msg.id, msg.origin, frames[2], frames[3])

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
        }

    def closing(self, server: QueueServer) -> None:
        self._serving.discard(server.name)
        if not self._serving:
            self.journal.close()
        else:
            self.journal.commit()
