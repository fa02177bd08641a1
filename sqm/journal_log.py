"""The journal's message store: an append-only log file (``FILE-messages``).

Why a log and not SQLite rows: the broker commits once per input batch, and
under pipelined load a batch holds one or two messages, so a SQLite
transaction per batch (B-tree pages, an index, the WAL) was most of the
journal's cost. Appending records to a file costs one ``write()`` per batch
(plus one ``fdatasync`` with ``fsync=True``), like Kafka's or NATS
JetStream's segment files.

Format: an 8-byte magic, then records. A record is ``<body length u32>
<crc32 of body u32> <body>``; a body is ``b"A"`` (accepted: queue, id,
origin, envelope, payload, each length-prefixed) or ``b"E"`` (ended: queue,
id, a tombstone). Replay applies them in order; what is left is the live
set, in the order of acceptance (a re-add moves a message to the end, as
SQLite's ``INSERT OR REPLACE`` did).

A crash in the middle of a write leaves a torn last record: replay stops at
the first record that is short or fails its CRC, logs what it ignored, and
truncates the file there so that new records follow good ones. Such a
record was never acknowledged (the ACCEPTED notice goes out after the
write returns), so nothing acknowledged is lost.

Compaction: when the file is big and ended records dominate, the live set
(held in memory: the same bytes objects the broker holds) is written to
``FILE-messages.tmp`` and renamed over the log.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterable, Iterator

log = logging.getLogger("sqm.broker")

MAGIC = b"SQMLOG1\n"
_HEAD = struct.Struct("<II")  # body length, crc32(body)
_ADD = struct.Struct("<cHHHII")  # b"A", len queue, len id, len origin, len envelope, len payload
_END = struct.Struct("<cHH")  # b"E", len queue, len id
#: Don't compact below this size: a small file costs nothing to keep.
COMPACT_MIN = 4 << 20

#: A live message: (origin, envelope, payload, its record's size in the file).
Live = tuple[bytes, bytes, bytes, int]
Key = tuple[str, bytes]


class LogFormatError(Exception):
    """The file is not a message log (another format, or another program's file)."""


def add_record(qname: bytes, mid: bytes, origin: bytes, envelope: bytes, payload: bytes,
               out: list[bytes]) -> int:
    """Append an "accepted" record's parts to ``out``; return its size (the payload is not copied)."""
    prefix = b"".join((_ADD.pack(b"A", len(qname), len(mid), len(origin), len(envelope),
                                 len(payload)), qname, mid, origin, envelope))
    size = len(prefix) + len(payload)
    out += (_HEAD.pack(size, zlib.crc32(payload, zlib.crc32(prefix))), prefix, payload)
    return 8 + size


def end_record(qname: bytes, mid: bytes) -> bytes:
    """An "ended" record (tombstone) for message ``mid`` of queue ``qname``."""
    body = _END.pack(b"E", len(qname), len(mid)) + qname + mid
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def replay(data: bytes) -> tuple[dict[Key, Live], int]:
    """The live set of a log's bytes, and how many bytes are good (a torn tail is not)."""
    if not data:
        return {}, 0
    if not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            return {}, 0  # torn while writing the magic: an empty log
        raise LogFormatError("not an sqm message log")
    live: dict[Key, Live] = {}
    view = memoryview(data)
    pos, end = len(MAGIC), len(data)
    while pos + 8 <= end:
        size, crc = _HEAD.unpack_from(data, pos)
        body_at = pos + 8
        if body_at + size > end or zlib.crc32(view[body_at:body_at + size]) != crc:
            break
        kind = data[body_at:body_at + 1]
        try:
            if kind == b"A":
                _, lq, li, lo, le, lp = _ADD.unpack_from(data, body_at)
                at = body_at + _ADD.size
                if _ADD.size + lq + li + lo + le + lp != size:
                    break
                queue = data[at:at + lq].decode()
                at += lq
                mid = data[at:at + li]
                at += li
                origin = data[at:at + lo]
                at += lo
                envelope = data[at:at + le]
                at += le
                key = (queue, mid)
                live.pop(key, None)  # a re-add moves it to the end
                live[key] = (origin, envelope, data[at:at + lp], 8 + size)
            elif kind == b"E":
                _, lq, li = _END.unpack_from(data, body_at)
                if _END.size + lq + li != size:
                    break
                at = body_at + _END.size
                live.pop((data[at:at + lq].decode(), data[at + lq:at + lq + li]), None)
            else:
                break
        except (struct.error, UnicodeDecodeError):
            break
        pos = body_at + size
    return live, pos


def read_live(path: str) -> dict[Key, Live]:
    """The live set of the log at ``path`` (read-only: for tools and tests)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    return replay(data)[0]


class MessageLog:
    """The live messages of one journal, kept in an append-only file.

    :meth:`append` writes one batch of records with one ``write()``; the
    caller keeps the batching (:class:`sqm.journal.Journal`).
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        live, good = replay(data)  # LogFormatError: the caller names the file
        try:
            os.unlink(path + ".tmp")  # a compaction cut short by a crash: the log is intact
        except FileNotFoundError:
            pass
        self.live = live
        self.live_bytes = sum(v[3] for v in live.values())
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        if good < len(data):
            log.warning("journal %s: ignored %d byte(s) of a torn record at offset %d "
                        "(a write cut short by a crash; never acknowledged)",
                        path, len(data) - good, good)
            os.ftruncate(self.fd, good)
        if good == 0:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, MAGIC)
            good = len(MAGIC)
            self._sync()
        self.size = good
        self.compactions = 0

    def _sync(self) -> None:
        if self.fsync:
            os.fdatasync(self.fd)

    def append(self, data: bytes) -> None:
        """Write ``data`` (whole records) at the end; on an error, leave no torn record."""
        if not data:
            return
        fd = self.fd
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.write(fd, view[done:])
            self._sync()
        except OSError:
            try:
                os.ftruncate(fd, self.size)
            except OSError:
                pass
            raise
        self.size += len(data)

    def should_compact(self) -> bool:
        """Big, and mostly ended records."""
        return self.size > COMPACT_MIN and self.size > 2 * self.live_bytes

    def compact(self) -> None:
        """Rewrite the file with exactly the live set, in order (write, then rename over)."""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            size = len(MAGIC)
            os.write(fd, MAGIC)
            for chunk in _chunks(self.live.items()):
                view = memoryview(chunk)
                done = 0
                while done < len(chunk):
                    done += os.write(fd, view[done:])
                size += len(chunk)
            if self.fsync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        if self.fsync:
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = size
        self.live_bytes = size - len(MAGIC)
        self.compactions += 1

    def close(self) -> None:
        os.close(self.fd)


def _chunks(items: Iterable[tuple[Key, Live]], limit: int = 1 << 20) -> Iterator[bytes]:
    """The live records, encoded, in chunks of about ``limit`` bytes."""
    out: list[bytes] = []
    size = 0
    names: dict[str, bytes] = {}
    for (queue, mid), (origin, envelope, payload, _) in items:
        qname = names.get(queue)
        if qname is None:
            qname = names[queue] = queue.encode()
        size += add_record(qname, mid, origin, envelope, payload, out)
        if size >= limit:
            yield b"".join(out)
            out, size = [], 0
    if out:
        yield b"".join(out)
