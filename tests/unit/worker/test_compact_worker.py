"""A worker speaks compact (docs/PROTOCOL.md, "Compact messages") only where the
other end says it reads it: DONE to a broker whose BATCHES names ``r``, RESULT
to a mailbox whose envelope has FLAG_COMPACT_REPLY; it reads both DISPATCH forms."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from sqm.protocol import (
    BATCHES,
    BYE,
    COMPACT_DONE,
    COMPACT_RESULT,
    COMPACT_SUBMIT,
    DISPATCH,
    DONE,
    FLAG_COMPACT_REPLY,
    GIVE_BACK,
    HEARTBEAT,
    HELLO,
    RESULT,
    SIGNATURE,
    pack_envelope,
    unpack_ids,
)
from worker import Worker

pytestmark = pytest.mark.timeout(30)


def start(tmp_path: Path, **options: Any) -> tuple[
        zmq.Context, zmq.Socket, zmq.Socket, bytes, Worker, threading.Thread]:
    """A stand-in sqm (ROUTER), a mailbox (DEALER) and a running Worker serving ``add``."""
    ctx = zmq.Context()
    broker, mailbox = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (broker, mailbox):
        sock.linger = 0
    endpoint = f"ipc://{tmp_path}/sqm.sock"
    mailbox_addr = f"ipc://{tmp_path}/mailbox.sock".encode()
    broker.bind(endpoint)
    mailbox.bind(mailbox_addr.decode())
    w = Worker("q", endpoint=endpoint, heartbeat=5.0,
               callbacks={"add": lambda _w, _o, p: p + 1}, **options)
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    return ctx, broker, mailbox, mailbox_addr, w, thread


def next_from(broker: zmq.Socket, reads: bytes, deadline: float,
              what: str) -> tuple[bytes, list[bytes], bool]:
    """The worker's next message, with sqm's part of its registering done: BYE to
    its rights check, BATCHES (``reads``) and a HEARTBEAT to its HELLO (then True)."""
    while True:
        assert time.monotonic() < deadline, what
        if not broker.poll(50):
            continue
        rid, *frames = broker.recv_multipart()
        cmd = frames[1] if len(frames) > 1 and frames[0] == SIGNATURE else b""
        if cmd == HEARTBEAT and len(frames) == 2:  # the rights check before serving
            broker.send_multipart([rid, SIGNATURE, BYE])
            continue
        if cmd == HELLO:
            broker.send_multipart([rid, SIGNATURE, BATCHES, reads])
            broker.send_multipart([rid, SIGNATURE, HEARTBEAT, b"5000", b"60000"])
        return rid, frames, cmd == HELLO


def stop(w: Worker, thread: threading.Thread, broker: zmq.Socket) -> None:
    """Stop the worker, answering its BYE as sqm would, and close the broker's socket."""
    w.terminate()
    deadline = time.monotonic() + 10
    while thread.is_alive() and time.monotonic() < deadline:
        if broker.poll(50):
            rid, *frames = broker.recv_multipart()
            if frames[1:2] == [BYE]:
                broker.send_multipart([rid, SIGNATURE, BYE])
    thread.join(10)
    broker.close(0)


@pytest.mark.parametrize(("reads", "compact_dispatch", "flags", "want_done", "want_result"), [
    (GIVE_BACK, False, 0, "classic", "classic"),  # an older sqm and an older Sender
    (GIVE_BACK + b"r", True, FLAG_COMPACT_REPLY, "compact", "compact"),  # all of this version
    (GIVE_BACK + b"r", True, 0, "compact", "classic"),  # an older Sender's envelope
    (GIVE_BACK, False, FLAG_COMPACT_REPLY, "classic", "compact"),  # an older sqm, a new Sender
], ids=["old-old", "new-new", "old-sender", "old-sqm"])
def test_the_worker_answers_in_the_form_each_end_reads(
        tmp_path: Path, reads: bytes, compact_dispatch: bool, flags: int,
        want_done: str, want_result: str) -> None:
    ctx, broker, mailbox, mailbox_addr, w, thread = start(tmp_path)
    done: list[list[bytes]] = []
    try:
        deadline = time.monotonic() + 20
        sent = False
        while not done:
            rid, frames, hello = next_from(broker, reads, deadline, "no DONE came")
            cmd = frames[1] if len(frames) > 1 and frames[0] == SIGNATURE else b""
            if hello and not sent:
                env = pack_envelope(flags, 0, 1, 0.0, b"m:1", mailbox_addr, b"add", b"json")
                if compact_dispatch:
                    broker.send_multipart([rid, COMPACT_SUBMIT + env + b"41"])
                else:
                    broker.send_multipart([rid, SIGNATURE, DISPATCH, env, b"41"])
                sent = True
            elif frames[:1] == [SIGNATURE] and cmd == DONE or frames[0].startswith(COMPACT_DONE):
                done.append(frames)
        assert mailbox.poll(5000), "no reply came"
        reply = mailbox.recv_multipart()
    finally:
        stop(w, thread, broker)
        mailbox.close(0)
        ctx.term()
    if want_done == "compact":
        assert done == [[COMPACT_DONE + b"\x03m:1"]]
    else:
        assert done == [[SIGNATURE, DONE, b"m:1"]]
    if want_result == "compact":
        assert reply == [COMPACT_RESULT + b"\x03m:1" + b"42"]
    else:
        assert reply == [SIGNATURE, RESULT, b"m:1", b"42"]



def test_a_compact_dispatch_of_several_runs_each_in_order(tmp_path: Path) -> None:
    """sqm's compact DISPATCH of k messages is k ``SQM1s`` frames in one message:
    the plain runner reads each frame as one message and runs it in place."""
    ctx, broker, mailbox, mailbox_addr, w, thread = start(tmp_path, prefetch=4)
    ended: list[bytes] = []
    try:
        deadline = time.monotonic() + 20
        while len(ended) < 3:
            rid, frames, hello = next_from(broker, GIVE_BACK + b"r", deadline, f"DONEs: {ended}")
            if hello:
                broker.send_multipart([rid, *(
                    COMPACT_SUBMIT + pack_envelope(FLAG_COMPACT_REPLY, 0, 1, 0.0, b"m:%d" % i,
                                                   mailbox_addr, b"add", b"json") + b"%d" % n
                    for i, n in ((1, 41), (2, 9), (3, 99)))])
            elif frames[0].startswith(COMPACT_DONE):
                ended += unpack_ids(frames[0][len(COMPACT_DONE):])
        replies = []
        while len(replies) < 3:
            assert mailbox.poll(5000), f"replies so far: {replies}"
            replies += mailbox.recv_multipart()
    finally:
        stop(w, thread, broker)
        mailbox.close(0)
        ctx.term()
    assert sorted(ended) == [b"m:1", b"m:2", b"m:3"]
    assert replies == [COMPACT_RESULT + b"\x03m:1" + b"42", COMPACT_RESULT + b"\x03m:2" + b"10",
                       COMPACT_RESULT + b"\x03m:3" + b"100"]
