"""The sqm wire protocol: frame layouts, constants and validation.

See docs/PROTOCOL.md for the prose version. Every message starts with the
signature frame ``SQM1`` (protocol version 1) and a one-byte command, but
for the compact forms of the four messages of every rpc (one frame each,
``SQM1`` + a lower-case command letter + body) between peers that say they
read them. The broker only ever reads envelopes; a payload is forwarded
untouched and never decoded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
from typing import Any

SIGNATURE = b"SQM1"

#: Messages sqm may hand a Worker at once by default (its ``prefetch``). Above 1,
#: messages flow in batches (one DISPATCH, one DONE for several); what waits
#: behind a callback that runs long goes back to sqm for another worker
#: (worker.reclaim), so a slow message does not hold the others up.
#: Chosen from W2, W3 and W8 (BENCHMARKS.md, "Prefetch that gives work back").
DEFAULT_PREFETCH = 16
#: Prefetch reclaim: a worker that holds messages beyond what it runs at once
#: and ends none for this long (s) is asked to give back the ones waiting
#: behind its callback; a worker gives back only from a callback that has run
#: at least RECLAIM_MIN_RUN_S (a younger one says it moves: it keeps them).
RECLAIM_AFTER_S = 0.003
RECLAIM_MIN_RUN_S = 0.001

# client (Sender) -> broker
SUBMIT = b"S"
STATUS = b"?"
CONTROL = b"!"  # admin request/reply: [SIG, !, json] both ways
# broker -> client
ACCEPTED = b"K"  # [SIG, K, packed ids, features]: sqm took these messages (journaled, with --journal)
#: ACCEPTED's 4th frame: what this sqm takes besides the basics, one letter
#: each. ``B``: SUBMIT may carry several messages (a Sender batches only
#: towards such a broker). ``C``: it reads the compact messages below (a
#: Sender sends compact SUBMITs only to such a broker; for a worker, BATCHES
#: names the compact DONE's command byte ``r``).
FEATURE_BATCH = b"B"
FEATURE_COMPACT = b"C"
FEATURES = FEATURE_BATCH + FEATURE_COMPACT
# worker -> broker
HELLO = b"W"
DONE = b"R"
DONE_FAILED = b"F"  # DONE carries its outcome in the command byte
HEARTBEAT = b"H"  # [SIG, H] | [SIG, H, wid] | [SIG, H, wid, json self-report] | [SIG, H, "", packed wids]
#: The 5th frame of sqm's HELLO answer ``[SIG, H, interval-ms, report-ms, PACKED_BEATS]``
#: to a worker whose HELLO asked (``"packed_beats": true``): this sqm reads the
#: packed beat ``[SIG, H, "", pack_ids(worker ids)]`` (one per process and broker).
PACKED_BEATS = b"packed-beats"
BYE = b"X"
NACK = b"N"  # [SIG, N, id]: "I am full, give it to someone else"; parks one slot
CREDIT = b"C"  # [SIG, C, n]: n parked slots are free again
#: [SIG, G, id, id, ...] (zero ids or more): "my callback runs long: these never
#: started, give them to someone else, and park them and my free slots until
#: CREDIT" (prefetch reclaim). Sent only to a broker whose BATCHES names it.
GIVE_BACK = b"G"
ABILITIES = b"M"  # [SIG, M, json {"methods": [...]}]: the methods it serves from now on
FORWARD = b"V"  # [SIG, V, envelope, payload]: hand the message it holds on (worker.forward)
RETRY = b"T"  # [SIG, T, id, delay_ms, max_retries, json {"type","message"}]: run it again later
# client (Sender) -> broker, and broker -> worker
CANCEL = b"Z"  # [SIG, Z, id]: the sender cancels its message; sqm tells the worker running it
# broker -> worker
DISPATCH = b"D"
STOP = b"Q"  # [SIG, Q]: finish the message in hand and exit (sqm stop-worker)
# [SIG, L, commands]: the answer to a HELLO with "batch": this broker reads
# multi-id DONEs (and may send multi-message DISPATCHes); the 3rd frame lists
# the worker commands it reads besides the basics (GIVE_BACK). An older
# worker ignores it; an older broker sends [SIG, L] alone.
BATCHES = b"L"
# broker -> client, and worker -> mailbox
ERROR = b"E"
# worker -> mailbox
ACK = b"A"
PROGRESS = b"P"
RESULT = b"Y"

# A SUBMIT/DISPATCH message is [SIGNATURE, command, envelope, payload]: the
# envelope is one frame (fewer frames = less per-message work on every hop);
# the payload frame stays apart and is never decoded by sqm. A batched
# SUBMIT carries several: [SIGNATURE, S, env1, payload1, env2, payload2, ...].
SUBMIT_FRAMES = 4
#: The most messages a Sender puts in one SUBMIT.
MAX_SUBMIT_BATCH = 64
# A DISPATCH to a worker whose HELLO says ``"batch": true`` may carry several
# messages: [SIGNATURE, D, envelope1, payload1, envelope2, payload2, ...]
# (2 + 2k frames; k = 1 is the 4-frame form). DONE / DONE_FAILED to a broker
# that sent one may name several ids: [SIGNATURE, R, id1, id2, ...].


# Compact messages: the hot ones in one frame each, ``SIGNATURE + command +
# body`` (docs/PROTOCOL.md, "Compact messages"). Receiving costs about 1 µs
# per frame in Python (a frame object and its "more" flag) where one frame
# more in a message costs libzmq almost nothing, so the messages of every
# rpc (SUBMIT, DISPATCH, RESULT, DONE) travel as one frame where both ends
# know the form.
#: SUBMIT in one frame: ``SQM1s`` + envelope + payload. sqm forwards it to a
#: worker that reads compact messages unchanged: that is the compact DISPATCH
#: (one such frame per message, several in a batch).
COMPACT_SUBMIT = b"SQM1s"
#: RESULT in one frame: ``SQM1y`` + id length (1 byte) + id + payload. Sent
#: only for a message whose envelope has FLAG_COMPACT_REPLY.
COMPACT_RESULT = b"SQM1y"
#: DONE in one frame: ``SQM1r`` (ok) or ``SQM1f`` (failed) + the ids packed as
#: ACCEPTED packs them (:func:`pack_ids`).
COMPACT_DONE = b"SQM1r"
COMPACT_DONE_FAILED = b"SQM1f"
COMPACT_HEAD = len(COMPACT_SUBMIT)  # 5: where the envelope starts
#: BATCHES's 3rd frame from this sqm: the worker commands it reads besides the
#: basics, one byte each: GIVE_BACK, and the compact DONE (``r``, ``f``).
BATCHES_READS = GIVE_BACK + COMPACT_DONE[4:]
#: Each compact command as its classic command byte (what a role check reads).
COMPACT_COMMANDS = {COMPACT_SUBMIT: SUBMIT, COMPACT_DONE: DONE, COMPACT_DONE_FAILED: DONE_FAILED}
#: The largest payload sent in compact form: joining it to the envelope copies
#: it, which past this costs more than the frames it saves (libzmq sends big
#: frames without a copy).
COMPACT_MAX = 64 * 1024


def is_multi_dispatch(frames: list[bytes]) -> bool:
    """True for a DISPATCH of two or more messages (6, 8, ... frames)."""
    n = len(frames)
    return n > SUBMIT_FRAMES and not n & 1 and frames[1] == DISPATCH and frames[0] == SIGNATURE


def split_dispatch(frames: list[bytes]) -> list[list[bytes]]:
    """A multi-message DISPATCH as one 4-frame DISPATCH per message, in order."""
    head = frames[:2]
    return [head + frames[i:i + 2] for i in range(2, len(frames), 2)]


# Envelope: a fixed head, then message id, mailbox, method and serializer tag.
#   flags u8, retries u8, priority u8, hops u8, deadline f64 (unix s, 0 = none),
#   id_len u8, mailbox_len u16, method_len u16, serializer_len u8
# ``hops`` (once a pad byte, always 0 from senders): how many times workers
# handed the message on (FORWARD); sqm never reads it.
ENVELOPE_HEAD = struct.Struct("!BBBxdBHHB")
_HEAD_WITH_HOPS = struct.Struct("!BBBBdBHHB")
HEAD = ENVELOPE_HEAD.size  # 18
HOPS_OFFSET = 3  # where the hop count sits in the head
ID_LEN_OFFSET = 12  # where the id length byte sits in the head
FLAG_ONEWAY = 0x01
# The envelope ends with an EXTRA tail (after the serializer tag):
#   not_before f64 (unix s, 0 = now), time_limit f32 (s, 0 = none),
#   attempts u8 (Retry rounds done so far; sqm rewrites it on a retry)
FLAG_EXTRA = 0x02
# The caller wants to hear at once that a worker started the message (ACK):
# ``submit(ack=True)`` or ``on_start``. Without it the worker's first ACK
# comes with its next heartbeat, and only if the callback still runs then
# (one mailbox message less per message). sqm never reads it.
FLAG_ACK = 0x04
# The caller's mailbox reads RESULT in one frame (COMPACT_RESULT): set by
# Senders of this version, read only by workers (an older one answers in
# four frames, which the Sender reads too). sqm never reads it.
FLAG_COMPACT_REPLY = 0x08
EXTRA = struct.Struct("!dfB")
PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW = 0, 1, 2
PRIORITIES = {"high": PRIORITY_HIGH, "normal": PRIORITY_NORMAL, "low": PRIORITY_LOW}


MAX_ID = 128
MAX_MAILBOX = 256
MAX_METHOD = 256
MAX_SERIALIZER = 32
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


def pack_ids(ids: list[bytes]) -> bytes:
    """Message ids in one frame, each preceded by its length (1 byte; ids are ≤ 128)."""
    if len(ids) == 1:
        return bytes((len(ids[0]),)) + ids[0]
    return b"".join([bytes((len(i),)) + i for i in ids])


def unpack_ids(frame: bytes) -> list[bytes]:
    """The ids :func:`pack_ids` packed; a truncated tail is ignored."""
    ids = []
    pos, end = 0, len(frame)
    while pos < end:
        n = frame[pos]
        ids.append(frame[pos + 1 : pos + 1 + n])
        pos += 1 + n
    return ids


class Envelope:
    """A decoded envelope (what workers and tests need; sqm reads only the head)."""

    __slots__ = ("flags", "retries", "priority", "deadline", "id", "mailbox", "method",
                 "serializer", "hops", "not_before", "time_limit", "attempts")

    def __init__(self, flags: int, retries: int, priority: int, deadline: float, id: bytes,  # noqa: A002
                 mailbox: bytes, method: bytes, serializer: bytes, hops: int = 0) -> None:
        self.flags = flags
        self.retries = retries
        self.priority = priority
        self.deadline = deadline
        self.id = id
        self.mailbox = mailbox
        self.method = method
        self.serializer = serializer
        self.hops = hops
        self.not_before = 0.0
        self.time_limit = 0.0
        self.attempts = 0

    @property
    def oneway(self) -> bool:
        return bool(self.flags & FLAG_ONEWAY)


def pack_envelope(
    flags: int,
    retries: int,
    priority: int,
    deadline: float,
    msg_id: bytes,
    mailbox: bytes,
    method: bytes,
    serializer: bytes,
    hops: int = 0,
    *,
    not_before: float = 0.0,
    time_limit: float = 0.0,
    attempts: int = 0,
) -> bytes:
    """Pack an envelope without checks (callers have validated the fields).

    The EXTRA tail is added only when one of its fields is set, so plain
    messages keep the short envelope.
    """
    if not_before or time_limit or attempts:
        return pack_envelope(flags | FLAG_EXTRA, retries, priority, deadline, msg_id, mailbox,
                             method, serializer, hops) + EXTRA.pack(not_before, time_limit,
                                                                     attempts)
    if hops:
        head = _HEAD_WITH_HOPS.pack(flags, retries, priority, hops, deadline,
                                    len(msg_id), len(mailbox), len(method), len(serializer))
    else:
        head = ENVELOPE_HEAD.pack(flags, retries, priority, deadline,
                                  len(msg_id), len(mailbox), len(method), len(serializer))
    return head + msg_id + mailbox + method + serializer


def encode_envelope(
    msg_id: bytes,
    mailbox: bytes,
    method: bytes,
    serializer: bytes,
    *,
    oneway: bool = False,
    retries: int = 0,
    priority: int = PRIORITY_NORMAL,
    deadline: float | None = None,
) -> bytes:
    """Pack an envelope; raises ValueError for out-of-range fields."""
    if not 0 <= retries <= 255:
        raise ValueError("retries must be between 0 and 255")
    if not (0 < len(msg_id) <= MAX_ID and len(mailbox) <= MAX_MAILBOX
            and 0 < len(method) <= MAX_METHOD and 0 < len(serializer) <= MAX_SERIALIZER):
        raise ValueError("envelope field empty or too long")
    return pack_envelope(FLAG_ONEWAY if oneway else 0, retries, priority, deadline or 0.0,
                         msg_id, mailbox, method, serializer)


def read_head(env: bytes) -> tuple[int, int, int, float, int, int, int]:
    """Validate an envelope's lengths; return its head fields and the field ends.

    Returns (flags, retries, priority, deadline, id_end, mailbox_end,
    method_end); the id is ``env[HEAD:id_end]`` and so on. Raises ValueError
    when malformed. This is all sqm reads of a message.
    """
    try:
        flags, retries, priority, deadline, il, ml, mtl, sl = ENVELOPE_HEAD.unpack_from(env)
    except struct.error:
        raise ValueError("envelope too short") from None
    if len(env) != HEAD + il + ml + mtl + sl + (EXTRA.size if flags & FLAG_EXTRA else 0):
        raise ValueError("envelope lengths do not add up")
    if not il or not mtl or not sl or ml > MAX_MAILBOX or mtl > MAX_METHOD or sl > MAX_SERIALIZER:
        raise ValueError("envelope field empty or too long")
    id_end = HEAD + il
    mailbox_end = id_end + ml
    return flags, retries, priority, deadline, id_end, mailbox_end, mailbox_end + mtl


def read_compact(frame: bytes) -> tuple[int, int, int, float, int, int, int, int]:
    """:func:`read_head` for a compact SUBMIT frame (``SQM1s`` + envelope + payload).

    Returns (flags, retries, priority, deadline, id_end, mailbox_end,
    method_end, envelope_end), offsets into ``frame``: the id is
    ``frame[COMPACT_HEAD + HEAD:id_end]`` and the payload ``frame[envelope_end:]``.
    Raises ValueError when malformed.
    """
    try:
        flags, retries, priority, deadline, il, ml, mtl, sl = ENVELOPE_HEAD.unpack_from(
            frame, COMPACT_HEAD)
    except struct.error:
        raise ValueError("envelope too short") from None
    if not il or not mtl or not sl or ml > MAX_MAILBOX or mtl > MAX_METHOD or sl > MAX_SERIALIZER:
        raise ValueError("envelope field empty or too long")
    id_end = COMPACT_HEAD + HEAD + il
    mailbox_end = id_end + ml
    method_end = mailbox_end + mtl
    end = method_end + sl + (EXTRA.size if flags & FLAG_EXTRA else 0)
    if end > len(frame):
        raise ValueError("envelope lengths do not add up")
    return flags, retries, priority, deadline, id_end, mailbox_end, method_end, end


def compact_parts(frame: bytes) -> tuple[bytes, bytes]:
    """(envelope, payload) of a compact SUBMIT frame; ValueError when malformed."""
    end = read_compact(frame)[7]
    return frame[COMPACT_HEAD:end], frame[end:]


def message_parts(frames: list[bytes]) -> tuple[bytes, bytes]:
    """(envelope, payload) of a message sqm holds: ``[SIG, cmd, env, payload]``
    or ``[compact SUBMIT frame]`` (valid: sqm read it at its SUBMIT)."""
    if len(frames) == 1:
        return compact_parts(frames[0])
    return frames[2], frames[3]


def compact_dispatches(frames: list[bytes]) -> list[bytes] | None:
    """A compact DISPATCH (one ``SQM1s`` frame per message) as the classic one,
    ``[SIG, D, env1, payload1, ...]``; None when ``frames`` is not one.

    Workers read it so (the rest of a worker knows one form); a malformed
    message gets an empty envelope, which the worker refuses as for the
    classic form.
    """
    if not frames[0].startswith(COMPACT_SUBMIT):
        return None
    out = [SIGNATURE, DISPATCH]
    for frame in frames:
        try:
            if not frame.startswith(COMPACT_SUBMIT):
                raise ValueError("not a compact message")
            end = read_compact(frame)[7]
        except ValueError:
            out += (b"", b"")
            continue
        out += (frame[COMPACT_HEAD:end], frame[end:])
    return out


def compact_result(msg_id: bytes, body: bytes) -> bytes:
    """RESULT in one frame (COMPACT_RESULT)."""
    return COMPACT_RESULT + bytes((len(msg_id),)) + msg_id + body


def classic_result(frame: bytes) -> list[bytes]:
    """A compact RESULT as ``[SIG, RESULT, id, payload]`` (as is when too short to be one)."""
    if len(frame) < COMPACT_HEAD + 2:
        return [frame]
    end = COMPACT_HEAD + 1 + frame[COMPACT_HEAD]
    return [SIGNATURE, RESULT, frame[COMPACT_HEAD + 1:end], frame[end:]]


def envelope_id(env: bytes) -> bytes:
    """The message id of a (possibly malformed) envelope, or b"" if it has none."""
    if len(env) <= HEAD:
        return b""
    end = HEAD + env[ID_LEN_OFFSET]
    return env[HEAD:end] if end <= len(env) else b""


def decode_envelope(env: bytes) -> Envelope:
    """Unpack and validate an envelope; raises ValueError when malformed."""
    flags, retries, priority, deadline, a, b, c = read_head(env)
    return _envelope(env, 0, len(env), flags, retries, priority, deadline, a, b, c)


def decode_compact(frame: bytes) -> tuple[Envelope, int]:
    """A compact DISPATCH's envelope and where its payload starts; ValueError when malformed.

    What a worker reads of a one-message dispatch: the frame is validated
    and sliced once, not rebuilt as the classic frames first.
    """
    flags, retries, priority, deadline, a, b, c, end = read_compact(frame)
    return _envelope(frame, COMPACT_HEAD, end, flags, retries, priority, deadline, a, b, c), end


def _envelope(buf: bytes, start: int, end: int, flags: int, retries: int, priority: int,
              deadline: float, a: int, b: int, c: int) -> Envelope:
    """The Envelope of the validated envelope at ``buf[start:end]`` (field ends a, b, c)."""
    if not flags & FLAG_EXTRA:
        return Envelope(flags, retries, priority, deadline, buf[start + HEAD:a], buf[a:b],
                        buf[b:c], buf[c:end], buf[start + HOPS_OFFSET])
    tail = end - EXTRA.size
    e = Envelope(flags, retries, priority, deadline, buf[start + HEAD:a], buf[a:b], buf[b:c],
                 buf[c:tail], buf[start + HOPS_OFFSET])
    e.not_before, e.time_limit, e.attempts = EXTRA.unpack_from(buf, tail)
    return e


def read_extra(env: bytes) -> tuple[float, float, int]:
    """``(not_before, time_limit, attempts)`` of a valid envelope; zeros without the tail."""
    if not env[0] & FLAG_EXTRA:
        return 0.0, 0.0, 0
    not_before, time_limit, attempts = EXTRA.unpack_from(env, len(env) - EXTRA.size)
    return not_before, time_limit, attempts


def with_retry(env: bytes, not_before: float, attempts: int) -> bytes:
    """``env`` (valid) as a retry rewrites it: a new due time and attempts count
    (its time limit kept), adding the EXTRA tail if it had none."""
    attempts = min(attempts, 255)
    if env[0] & FLAG_EXTRA:
        _due, limit, _attempts = read_extra(env)
        return env[:-EXTRA.size] + EXTRA.pack(not_before, limit, attempts)
    return bytes((env[0] | FLAG_EXTRA,)) + env[1:] + EXTRA.pack(not_before, 0.0, attempts)


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(data: bytes) -> Any:
    return json.loads(data)


# --------------------------------------------------------------------------
# Mailbox addresses: where workers send replies. A sender names its own
# mailbox; workers only connect to addresses the deployment allows.
# --------------------------------------------------------------------------


#: A secured sender's mailbox field is ``ADDRESS KEY``: its address, one space
#: and the mailbox's z85 CURVE public key (docs/PROTOCOL.md, envelope).
MAILBOX_KEY_SEP = " "
MAILBOX_KEY_LEN = 40


def endpoint_is_local(endpoint: str) -> bool:
    """True for ipc endpoints and tcp endpoints on a loopback address or localhost."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_own_address(ip: str) -> bool:
    """True when ``ip`` is an address of this host (the kernel lets us bind it)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((ip, 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def parse_mailbox(addr: str) -> tuple[str, str, int]:
    """Split ``tcp://IP:PORT`` or ``ipc:///abs/path`` into (scheme, host-or-path, port).

    Raises ValueError on anything else: other transports, host names (no DNS
    lookups on the hot path), relative ipc paths, ``..`` tricks.
    """
    if addr.startswith("ipc://"):
        path = addr[6:]
        if not path.startswith("/") or "\x00" in path:
            raise ValueError("ipc mailbox must be an absolute path")
        norm = os.path.normpath(path)
        if norm != path:
            raise ValueError("ipc mailbox path must be normalised")
        return "ipc", path, 0
    if addr.startswith("tcp://"):
        rest = addr[6:]
        host, sep, port = rest.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError("tcp mailbox needs a numeric port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        ipaddress.ip_address(host)  # raises ValueError for names
        return "tcp", host, int(port)
    raise ValueError("mailbox must be tcp://IP:PORT or ipc:///path")


class MailboxPolicy:
    """Which mailbox addresses a deployment allows workers to connect to.

    - ``ipc``: the socket file must sit directly in one of ``ipc_dirs`` (by
      default the run directory and the directory of the queue's own ipc
      endpoint), so a sender cannot aim workers at arbitrary local sockets.
    - ``tcp``: the host must be an IP literal. If ``networks`` is given
      (config ``mailbox_networks``) it must fall inside one of them. The
      broker additionally requires it to equal the sender's own address as
      seen on its connection (see :meth:`check` ``peer``), so a sender can
      only make workers connect back to itself.
    - ``inproc``: allowed only when the queue itself is served ``inproc://``
      (``allow_inproc``: an in-process broker, :mod:`sqm.testing`), where
      sender, broker and workers share one process and one ZeroMQ context.
    """

    def __init__(
        self,
        ipc_dirs: list[str] | tuple[str, ...] = (),
        networks: Any = None,
        allow_loopback: bool = True,
        *,
        allow_inproc: bool = False,
    ) -> None:
        self.allow_inproc = allow_inproc
        self.ipc_dirs = tuple(sorted({os.path.abspath(d) for d in ipc_dirs if d}))
        self.allow_loopback = allow_loopback
        self.networks = (
            tuple(ipaddress.ip_network(n, strict=False) for n in networks)
            if networks
            else None
        )

    @classmethod
    def for_settings(cls, settings: Any) -> MailboxPolicy:
        dirs = [settings.rundir, settings.ipc_dir, *(settings.get("mailbox_dirs") or [])]
        return cls(
            dirs,
            settings.get("mailbox_networks"),
            # Any broker on this host may be handed a loopback mailbox by a
            # sender beside it (every broker counts, not only the first).
            any(endpoint_is_local(ep)
                for ep in getattr(settings, "endpoints", None) or (settings.endpoint,)),
            allow_inproc=settings.endpoint.startswith("inproc://"),
        )

    def check(self, addr: str, peer: str | None = None) -> str | None:
        """Return why ``addr`` is refused, or None when it is allowed.

        ``peer`` is the sender's connection address (ZeroMQ's Peer-Address
        property): an IP for tcp connections, something else for ipc.
        """
        if len(addr) > MAX_MAILBOX:
            return "mailbox address too long"
        addr, _, key = addr.partition(MAILBOX_KEY_SEP)
        if key and len(key) != MAILBOX_KEY_LEN:
            return "mailbox key is not a 40-character z85 CURVE key"
        if addr.startswith("inproc://"):
            if not self.allow_inproc:
                return "inproc mailbox on a queue not served in process"
            return None if len(addr) > len("inproc://") else "inproc mailbox needs a name"
        try:
            scheme, where, _port = parse_mailbox(addr)
        except ValueError as exc:
            return str(exc)
        if scheme == "ipc":
            if os.path.dirname(where) not in self.ipc_dirs:
                return "ipc mailbox outside the allowed directories"
            return None
        ip = ipaddress.ip_address(where)
        if ip.is_loopback and not self.allow_loopback:
            # The queue is reached over the network: a loopback mailbox would
            # point a remote worker at its own host's ports.
            return "loopback mailbox on a queue reached over the network"
        if self.networks is not None and not any(ip in n for n in self.networks):
            return "tcp mailbox outside mailbox_networks"
        if peer is not None:
            try:
                peer_ip = ipaddress.ip_address(peer)
            except ValueError:
                # Connected over ipc: only an ipc mailbox (checked above) is
                # allowed, or a local sender could aim workers at any local port.
                return "a sender connected over ipc must use an ipc mailbox"
            if peer_ip != ip and not (peer_ip.is_loopback and not ip.is_loopback
                                      and is_own_address(where)):
                # A sender beside the broker (loopback peer) may name this host's
                # network address, the one other brokers' workers reach.
                return "tcp mailbox host differs from the sender's own address"
        return None
