"""Garbage on the broker's socket: raw ZeroMQ peers sending whatever they like.

sqm must survive all of it, count every malformed message, tell a SUBMIT's
originator (when the message id can be read) why it was refused, and never
let a worker near a mailbox address the deployment does not allow.

A STATUS request sent after the garbage on the same DEALER serves as a
fence: sqm handles one peer's messages in order, so when its answer arrives
every earlier reply has arrived too, and no fixed wait is needed.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from sender import Sender
from sqm import protocol
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(60)

SIG = b"SQM1"
SUBMIT = b"S"
STATUS = b"?"
ERROR = b"E"
EIGHT_MB = 8 * 1024 * 1024


def envelope(mid: bytes, mailbox: bytes, *, method: bytes = b"record", ser: bytes = b"json",
             tail: bytes = b"") -> bytes:
    """An envelope packed without validation (so tests can make bad ones)."""
    head = protocol.ENVELOPE_HEAD.pack(0, 0, 1, 0.0, len(mid), len(mailbox) % 65536,
                                       len(method) % 65536, len(ser) % 256)
    return head + mid + mailbox + method + ser + tail


def submit_frames(mid: bytes, mailbox: bytes, *, method: bytes = b"record",
                  ser: bytes = b"json", tail: bytes = b"",
                  body: bytes = b'{"evil": true}') -> list[bytes]:
    return [SIG, SUBMIT, envelope(mid, mailbox, method=method, ser=ser, tail=tail), body]


def raw_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = 5000
    sock.connect(endpoint)
    return sock


def recv(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "no answer from sqm"
    return sock.recv_multipart()


def fence(sock: zmq.Socket) -> tuple[list[list[bytes]], dict[str, Any]]:
    """Ask for status; return every reply that came before it, and the status."""
    sock.send_multipart([SIG, STATUS])
    before = []
    while True:
        frames = recv(sock)
        if frames[:2] == [SIG, STATUS]:
            return before, json.loads(frames[2])
        before.append(frames)


def records(log: Path) -> list[Any]:
    return [e["payload"] for e in read_log(log) if e["kind"] == "record"]


def refused_mailboxes(rundir: Path) -> list[bytes]:
    return [
        b"ipc:///etc/evil.sock",                    # outside the allowed directories
        f"ipc://{rundir}/sub/evil.sock".encode(),   # a subdirectory is not the directory
        f"ipc://{rundir}/../evil.sock".encode(),    # not normalised
        f"ipc://{rundir}/./evil.sock".encode(),
        b"ipc://relative.sock",
        b"tcp://8.8.8.8:1",                         # not the sender's own host
        b"tcp://localhost:1",                       # names need DNS: refused
        b"tcp://127.0.0.1",                         # no port
        b"tcp://127.0.0.1:0",
        b"tcp://127.0.0.1:99999",
        b"inproc://x",
        b"pgm://eth0;239.192.1.1:5555",
        b"udp://127.0.0.1:5",
        b"",
        b"ipc:///tmp/\xff\xfe.sock",                # not ASCII
        b"ipc:///" + b"a" * 400,                    # too long
    ]


def test_garbage_is_counted_answered_and_survived(cluster, rundir):
    rng = random.Random(1234)
    broker = cluster.serve("gq", heartbeat=0.2)
    worker = cluster.worker("gq", heartbeat=0.2)
    endpoint = f"ipc://{rundir}/gq.sock"
    ctx = zmq.Context()
    sock = raw_dealer(ctx, endpoint)
    try:
        unanswered: list[list[bytes]] = []   # malformed, but no id to answer to
        answered: dict[bytes, list[bytes]] = {}  # malformed SUBMITs: id -> frames

        # Frames that are not sqm at all.
        for size in (1, 3, 4, 5, 64, 1000, 65536):
            unanswered.append([rng.randbytes(size)])
        unanswered.append([b""])
        unanswered.append([b"", b""])
        unanswered.append([b""] * 7)
        unanswered.append([b"x" + rng.randbytes(3)] + [rng.randbytes(rng.randrange(0, 40))
                                                        for _ in range(599)])
        unanswered.append([rng.randbytes(EIGHT_MB)])
        for _ in range(50):
            frames = [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(2, 11))]
            if frames[0] == SIG:
                frames[0] = b"nope"
            unanswered.append(frames)
        # The signature, then nonsense.
        unanswered.append([SIG])
        unanswered.append([SIG, b"Z"])
        unanswered.append([SIG, b"ZZZZZZZZZZZZ", b"x"])
        unanswered.append([SIG, b""])
        unanswered.append([SIG, b"\x00" * 1000, b"y", b"z"])
        unanswered.append([b"sqm1"] + submit_frames(b"lower-1", b"ipc:///x")[1:])
        unanswered.append([SIG, SUBMIT])                        # too short to name an id
        unanswered.append([SIG, b"W", b"not json"])             # hello
        unanswered.append([SIG, b"W", b"[1, 2]"])
        unanswered.append([SIG, b"W"])
        unanswered.append([SIG, b"W", b"{}", b"extra"])
        unanswered.append([SIG, b"R"])                          # done naming no id

        good_mailbox = f"ipc://{rundir}/mbox-nobody.sock".encode()
        # SUBMITs with the wrong number of frames.
        answered[b"f3"] = submit_frames(b"f3", good_mailbox)[:3]
        answered[b"f5"] = submit_frames(b"f5", good_mailbox) + [b"extra"]
        answered[b"f500"] = submit_frames(b"f500", good_mailbox) + [b"."] * 496
        # SUBMITs whose envelope is too short to name an id: dropped, counted.
        unanswered.append([SIG, SUBMIT, b"", b"{}"])
        unanswered.append([SIG, SUBMIT, b"abc", b"{}"])
        unanswered.append([SIG, SUBMIT, envelope(b"x" * 50, b"")[:30], b"{}"])
        # SUBMITs with a bad envelope that still names its id.
        answered[b"tail"] = submit_frames(b"tail", good_mailbox, tail=b"!")
        answered[b"tail-8mb"] = submit_frames(b"tail-8mb", good_mailbox,
                                              tail=rng.randbytes(EIGHT_MB))
        answered[b"body-8mb"] = submit_frames(b"body-8mb", good_mailbox, method=b"",
                                              body=rng.randbytes(EIGHT_MB))
        answered[b"nomethod"] = submit_frames(b"nomethod", good_mailbox, method=b"")
        answered[b"noser"] = submit_frames(b"noser", good_mailbox, ser=b"")
        answered[b"longmethod"] = submit_frames(b"longmethod", good_mailbox, method=b"m" * 300)
        answered[b"longser"] = submit_frames(b"longser", good_mailbox, ser=b"s" * 100)
        # Well-formed SUBMITs of a real method whose mailbox must be refused.
        refused = refused_mailboxes(rundir)
        for i, mailbox in enumerate(refused):
            mid = b"mbox-%d" % i
            answered[mid] = submit_frames(mid, mailbox, body=b'{"evil": %d}' % i)

        messages = unanswered + list(answered.values())
        rng.shuffle(messages)
        for frames in messages:
            sock.send_multipart(frames)
        replies, st = fence(sock)

        assert broker.popen.poll() is None, broker.stderr
        assert st["malformed_total"] == len(messages)
        by_id = {}
        for frames in replies:
            assert frames[:2] == [SIG, ERROR], frames[:3]
            assert frames[3] == b"Malformed", frames
            assert len(frames) >= 5 and frames[4], "an error reply must say why"
            assert frames[2] not in by_id, f"two replies for {frames[2]!r}"
            by_id[frames[2]] = frames[4].decode()
        assert set(by_id) == set(answered)
        assert "4 frames" in by_id[b"f3"] and "got 3" in by_id[b"f3"]
        assert "got 500" in by_id[b"f500"]
        assert by_id[b"tail"] == "invalid submit envelope"
        for i, mailbox in enumerate(refused):
            reason = by_id[b"mbox-%d" % i]
            if len(mailbox) > protocol.MAX_MAILBOX:  # refused by the envelope's length limit
                assert reason == "invalid submit envelope", (mailbox, reason)
            else:
                assert reason.startswith("mailbox refused"), (mailbox, reason)

        # A REQ peer (empty delimiter frame first) and an incompatible PUSH peer.
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(endpoint)
        req.send_multipart([SIG, STATUS])
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(endpoint)
        push.send_multipart(submit_frames(b"push-1", b"ipc:///etc/evil.sock"))
        expected = len(messages) + 1
        st = wait_for(
            lambda: (lambda s: s if s["malformed_total"] >= expected else None)(
                cluster.status("gq")),
            5, "the REQ peer's message to be counted",
        )
        assert st["malformed_total"] == expected
        req.close()
        push.close()

        # The same raw peer can still do real work, with a mailbox of its own.
        mbox = ctx.socket(zmq.DEALER)
        mbox.linger = 0
        mbox_addr = f"ipc://{rundir}/mbox-raw.sock"
        mbox.bind(mbox_addr)
        sock.send_multipart(submit_frames(b"raw-ok", mbox_addr.encode(), method=b"add",
                                          body=b'{"a": 1, "b": 2}'))
        # No ACK asked for (FLAG_ACK clear): the worker sends one only with a
        # heartbeat that finds the callback still running (4th frame: its beat, ms).
        ack = [SIG, b"A", b"raw-ok", b"200"]
        while (frames := recv(mbox)) == ack:
            pass
        assert frames == [SIG, b"Y", b"raw-ok", b"3"]
        mbox.close()

        with Sender("gq") as s:
            assert s.rpc("record", {"legit": 1}, timeout=5) == {
                "payload": {"legit": 1}, "pid": worker.pid}
            assert s.rpc("add", {"a": 2, "b": 2}, timeout=5) == 4
    finally:
        ctx.destroy(linger=0)  # closes every socket, even those a failed assertion left open

    st = cluster.status("gq")
    assert st["malformed_total"] == expected
    assert st["workers_current"] == 1
    assert st["assigned_total"] == 3  # raw-ok and the two rpcs: nothing malformed got through
    assert records(cluster.log) == [{"legit": 1}]  # no worker ever handled a refused SUBMIT
    assert "refusing mailbox" not in worker.stderr  # ... nor was even handed one
    assert broker.popen.poll() is None
    assert "Traceback" not in broker.stderr
    assert "Traceback" not in worker.stderr


def test_garbage_flood_does_not_starve_real_traffic(cluster, rundir):
    """Thousands of malformed messages from one peer while a Sender does rpcs."""
    broker = cluster.serve("fq", heartbeat=0.2)
    cluster.worker("fq", heartbeat=0.2)
    ctx = zmq.Context()
    flood = raw_dealer(ctx, f"ipc://{rundir}/fq.sock")
    sent = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def flooder() -> None:
        nonlocal sent
        rng = random.Random(99)
        try:
            while not stop.is_set() and sent < 20_000:
                kind = sent % 4
                if kind == 0:
                    frames = [rng.randbytes(rng.randrange(1, 300))]
                elif kind == 1:
                    frames = [SIG, rng.randbytes(1) + b"?"]
                elif kind == 2:
                    frames = submit_frames(b"fl-%d" % sent, b"ipc:///etc/evil.sock")
                else:
                    frames = submit_frames(b"fl-%d" % sent, b"ipc:///x")[:3]
                flood.send_multipart(frames)
                sent += 1
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=flooder, daemon=True)
    thread.start()
    try:
        with Sender("fq") as s:
            for i in range(30):
                assert s.rpc("add", {"a": i, "b": 1}, timeout=5) == i + 1
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and not errors, errors
    assert sent > 0
    # Nobody reads the flood's error replies: sqm must drop them, not block on them.
    st = wait_for(
        lambda: (lambda s: s if s["malformed_total"] >= sent else None)(cluster.status("fq")),
        10, f"all {sent} malformed messages to be counted",
    )
    flood.close(0)
    ctx.term()
    assert st["malformed_total"] == sent
    assert st["assigned_total"] == 30 and st["failed_total"] == 0
    assert broker.popen.poll() is None
    assert "Traceback" not in broker.stderr
    assert records(cluster.log) == []
    assert os.path.exists(f"{rundir}/fq.sock")
