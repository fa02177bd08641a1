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

One sqm at a time may use a journal file: an exclusive ``flock`` on
``FILE.lock`` says so, and a second sqm gets a clear error.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from typing import NamedTuple

from .errors import ConfigError

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
"""


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
        self.written_total = 0
        self.commits_total = 0

    def add(self, queue: str, mid: bytes, origin: bytes, envelope: bytes, payload: bytes) -> None:
        """Record an accepted message at the next :meth:`commit`."""
        self._adds.append((queue, mid, origin, envelope, payload))

    def remove(self, queue: str, mid: bytes) -> None:
        """Forget an ended message at the next :meth:`commit`."""
        self._removes.append((queue, mid))

    @property
    def dirty(self) -> bool:
        return bool(self._adds or self._removes)

    def commit(self) -> None:
        """Write what was added and removed since the last commit, in one transaction."""
        adds, removes = self._adds, self._removes
        if not adds and not removes:
            return
        self._adds, self._removes = [], []
        db = self.db
        db.execute("BEGIN")
        try:
            if adds:
                db.executemany(
                    "INSERT OR IGNORE INTO messages (queue, id, origin, envelope, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    adds,
                )
            if removes:
                db.executemany("DELETE FROM messages WHERE queue = ? AND id = ?", removes)
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
        return self.db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.db.close()
            self._lock.close()
