"""The journal's message log: replay order, torn records, compaction, migration, errors."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from sqm import journal_log
from sqm.errors import ConfigError
from sqm.journal import Journal, Recovered
from sqm.journal_log import MAGIC, MessageLog, read_live

pytestmark = pytest.mark.timeout(30)


def msg(i: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(id, origin, envelope, payload) of test message ``i``."""
    return b"id%d" % i, b"sender", b"env%d" % i, b"payload %d " % i * (i % 7 + 1)


def rec(i: int) -> Recovered:
    return Recovered(*msg(i))


def open_journal(path: Path, **kw: bool) -> Journal:
    return Journal(str(path), **kw)


def test_live_set_survives_a_reopen_in_acceptance_order(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "j")
    for i in range(10):
        j.add("q", *msg(i))
        if i % 3 == 0:
            j.commit()
    j.add("other", *msg(100))
    j.commit()
    for i in (2, 5, 9):
        j.remove("q", msg(i)[0])
    j.commit()
    j.close()
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == [rec(i) for i in range(10) if i not in (2, 5, 9)]
        assert j.load("other") == [rec(100)]
        assert j.count("q") == 7
    finally:
        j.close()


def test_a_message_ended_in_its_own_batch_writes_nothing(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "j")
    try:
        size = j.log.size
        j.add("q", *msg(1))
        j.remove("q", msg(1)[0])
        j.commit()
        assert j.log.size == size and j.cancelled_total == 1 and j.written_total == 1
        # ended in a later batch: a tombstone is written
        j.add("q", *msg(2))
        j.commit()
        j.remove("q", msg(2)[0])
        j.commit()
        assert j.log.size > size and read_live(j.log_path) == {}
    finally:
        j.close()


def test_the_latest_frames_win_and_move_the_message_last(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "j")
    mid, origin, _, payload = msg(1)
    j.add("q", mid, origin, b"first", payload)
    j.add("q", *msg(2))
    j.commit()
    j.add("q", mid, origin, b"retry", payload)  # a retry's rewritten envelope
    j.commit()
    j.close()
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == [rec(2), Recovered(mid, origin, b"retry", payload)]
    finally:
        j.close()


@pytest.mark.parametrize("cut", [1, 4, 8, 9, 20, -1])
def test_a_torn_last_record_is_ignored_and_the_log_goes_on(tmp_path: Path, cut: int) -> None:
    j = open_journal(tmp_path / "j")
    for i in range(3):
        j.add("q", *msg(i))
    j.commit()
    good = j.log.size
    j.add("q", *msg(3))
    j.commit()
    torn = j.log.size
    j.close()
    # a crash in the middle of the last write: only part of its record reached the file
    with open(tmp_path / "j-messages", "r+b") as f:
        f.truncate(good + cut if cut > 0 else torn + cut)
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == [rec(i) for i in range(3)]
        assert os.path.getsize(tmp_path / "j-messages") == good  # truncated to the good part
        j.add("q", *msg(4))
        j.commit()
    finally:
        j.close()
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == [rec(0), rec(1), rec(2), rec(4)]
    finally:
        j.close()


def test_a_damaged_last_record_fails_its_crc_and_is_ignored(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "j")
    j.add("q", *msg(0))
    j.commit()
    j.add("q", *msg(1))
    j.commit()
    j.close()
    path = tmp_path / "j-messages"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last payload byte (e.g. a page not written before a power cut)
    path.write_bytes(bytes(data))
    assert list(read_live(str(path))) == [("q", msg(0)[0])]
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == [rec(0)]
    finally:
        j.close()


def test_a_log_torn_inside_its_magic_is_an_empty_log(tmp_path: Path) -> None:
    (tmp_path / "j-messages").write_bytes(MAGIC[:3])
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == []
        j.add("q", *msg(0))
        j.commit()
    finally:
        j.close()
    assert list(read_live(str(tmp_path / "j-messages"))) == [("q", msg(0)[0])]


def test_compaction_keeps_exactly_the_live_set_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_log, "COMPACT_MIN", 4096)
    j = open_journal(tmp_path / "j")
    kept = [i for i in range(400) if i % 10 == 3]  # never ended
    for i in range(400):
        j.add("q", *msg(i))
        j.commit()
        if i >= 2 and i - 2 not in kept:
            j.remove("q", msg(i - 2)[0])  # ends two batches later, like pipelined work
            j.commit()
    live_now = j.load("q")
    assert j.log.compactions > 0
    assert j.log.size <= 2 * j.log.live_bytes + 4096 + 1024  # dead records do not pile up
    j.close()
    expected = [rec(i) for i in kept] + [rec(398), rec(399)]
    assert live_now == expected
    assert not (tmp_path / "j-messages.tmp").exists()
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == expected
        j.log.compact()  # now: nothing but the live records
        assert j.log.live_bytes == j.log.size - len(MAGIC)
    finally:
        j.close()
    assert list(read_live(str(tmp_path / "j-messages"))) == [("q", r.id) for r in expected]


def test_a_compaction_cut_short_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "j")
    j.add("q", *msg(0))
    j.commit()
    j.close()
    (tmp_path / "j-messages.tmp").write_bytes(MAGIC + b"half a rewrite")
    j = open_journal(tmp_path / "j")
    try:
        assert j.load("q") == [rec(0)]
        assert not (tmp_path / "j-messages.tmp").exists()
    finally:
        j.close()


def test_fsync_mode_writes_the_same_log(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "j", fsync=True)
    j.add("q", *msg(0))
    j.commit()
    j.close()
    assert list(read_live(str(tmp_path / "j-messages"))) == [("q", msg(0)[0])]


def test_messages_of_an_older_sqlite_journal_are_migrated_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, "
        "id BLOB NOT NULL, origin BLOB NOT NULL, envelope BLOB NOT NULL, payload BLOB NOT NULL);"
        "CREATE UNIQUE INDEX messages_by_id ON messages (queue, id);"
    )
    db.executemany("INSERT INTO messages (queue, id, origin, envelope, payload) "
                   "VALUES (?, ?, ?, ?, ?)", [("q", *msg(i)) for i in range(5)])
    db.commit()
    db.close()
    j = open_journal(path)
    try:
        assert j.load("q") == [rec(i) for i in range(5)]
        j.remove("q", msg(0)[0])
        j.commit()
    finally:
        j.close()
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM messages").fetchone()
    assert rows == (0,)
    j = open_journal(path)
    try:
        assert j.load("q") == [rec(i) for i in range(1, 5)]  # once, and the end kept
    finally:
        j.close()


def test_a_file_that_is_not_a_message_log_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "j-messages").write_bytes(b"something else entirely\n")
    with pytest.raises(ConfigError, match="j-messages is not an sqm message log"):
        open_journal(tmp_path / "j")
    # the lock was released: a correct journal opens
    (tmp_path / "j-messages").unlink()
    open_journal(tmp_path / "j").close()


def test_a_failed_write_leaves_no_torn_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = MessageLog(str(tmp_path / "m"))
    size = log.size
    out: list[bytes] = []
    journal_log.add_record(b"q", b"a", b"o", b"e", b"p", out)
    record = b"".join(out)
    real_write = os.write

    def half_then_fail(fd: int, data: memoryview | bytes) -> int:
        if len(data) == len(record):
            return real_write(fd, bytes(data[:5]))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(journal_log.os, "write", half_then_fail)
        with pytest.raises(OSError, match="No space"):
            log.append(record)
    assert os.path.getsize(tmp_path / "m") == size == log.size
    log.append(record)
    log.close()
    assert list(read_live(str(tmp_path / "m"))) == [("q", b"a")]
