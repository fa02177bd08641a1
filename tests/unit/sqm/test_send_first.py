"""A lone message goes on before sqm accounts for it (QueueServer._send_first).

W1's sender waits on sqm's send of the DISPATCH, not on its bookkeeping:
when a wake-up's first message is a compact SUBMIT with a free slot for it
(core.pick), the server sends it and then makes its Message and accounts
for it (core.submitted). These tests drive a real QueueServer through
handle_burst, the one-queue loop's read, over inproc (a send is readable on
the other side once it returns, so each test knows what is queued), and
check that what the worker receives and what the core counts are those of
the usual path; the hypothesis machines (test_properties.py) check the core's
side against the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from sqm.broker.server import BrokerOptions, QueueServer
from sqm.config import resolve
from sqm.core import Message
from sqm.core.workers import DETACHED
from sqm.plugins import Hooks, Plugin
from sqm.protocol import (
    ACCEPTED,
    BATCHES,
    COMPACT_SUBMIT,
    DISPATCH,
    HELLO,
    SIGNATURE,
    encode_envelope,
    encode_json,
    pack_envelope,
    unpack_ids,
)
from sqm.zmqfast import recv_frame

pytestmark = pytest.mark.timeout(30)

MAILBOX = b"inproc://first-mailbox"


class Bench:
    """A QueueServer on inproc, its peers, and the loop's read (``wake_up``)."""

    def __init__(self, hooks: Hooks | None = None) -> None:
        self.ctx = zmq.Context()
        self.server = QueueServer(self.ctx, resolve("q", endpoint="inproc://first"),
                                  BrokerOptions(heartbeat=1.0), time.time(), hooks=hooks)
        self.socks: list[zmq.Socket] = []
        self.sender = self.peer(b"Ssender")

    def peer(self, rid: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        self.socks.append(sock)
        sock.routing_id = rid
        sock.linger = 0
        sock.connect("inproc://first")
        return sock

    def wake_up(self) -> None:
        """What the loop does when its blocking recv returns."""
        self.server.handle_burst(recv_frame(self.server.sock, zmq.NOBLOCK), time.time())

    def worker(self, rid: bytes, slots: int, *, compact: bool = True) -> zmq.Socket:
        sock = self.peer(rid)
        info: dict[str, Any] = {"id": rid.decode(), "slots": slots, "heartbeat": 1.0,
                                "batch": True, "compact": compact}
        sock.send_multipart([SIGNATURE, HELLO, encode_json(info)])
        self.wake_up()
        assert sock.recv_multipart()[:2] == [SIGNATURE, BATCHES]
        return sock

    def submit(self, mid: bytes, *, extra: bool = False) -> bytes:
        if extra:  # an envelope with the EXTRA tail (here: a time limit)
            env = pack_envelope(0, 0, 1, 0.0, mid, MAILBOX, b"work", b"json", time_limit=30.0)
        else:
            env = encode_envelope(mid, MAILBOX, b"work", b"json")
        frame = COMPACT_SUBMIT + env + b"{}"
        self.sender.send(frame)
        return frame

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.server.close()
        self.ctx.term()


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    try:
        yield b
    finally:
        b.close()


def counts(server: QueueServer) -> tuple[int, int, int, int]:
    core = server.core
    stats = core.methods[b"work"]
    return core.in_flight, core.assigned_total, stats.assigned, stats.wait.counts[0]


def test_a_lone_submit_goes_first_and_is_counted_as_any(bench: Bench) -> None:
    w = bench.worker(b"Wone", slots=4)
    frame = bench.submit(b"m1")
    bench.wake_up()
    assert w.recv_multipart() == [frame]  # the compact SUBMIT, as it came
    assert bench.server.sent_first == 1
    core = bench.server.core
    msg = core.workers[b"Wone"].in_flight[b"m1"]
    assert isinstance(msg, Message) and msg.origin == b"Ssender" and msg.frames == [frame]
    assert counts(bench.server) == (1, 1, 1, 1)
    assert core.workers[b"Wone"].free == 3
    # ... and the sender's first ACCEPTED goes as on the usual path.
    accepted = bench.sender.recv_multipart()
    assert accepted[:2] == [SIGNATURE, ACCEPTED] and unpack_ids(accepted[2]) == [b"m1"]


def test_the_usual_path_counts_the_same(bench: Bench) -> None:
    """The reference for the test above: the same message, through core.submit."""
    w = bench.worker(b"Wone", slots=4)
    frame = bench.submit(b"m1", extra=True)  # an EXTRA tail: never sent first
    bench.wake_up()
    assert w.recv_multipart() == [frame]
    assert bench.server.sent_first == 0
    assert counts(bench.server) == (1, 1, 1, 1)
    assert bench.server.core.workers[b"Wone"].free == 3


def test_a_burst_still_goes_as_one_dispatch_after_the_first(bench: Bench) -> None:
    """Only a wake-up's first message, after one that found nothing queued, goes
    first: the ones queued behind it are batched as before."""
    w = bench.worker(b"Wburst", slots=16)
    frames = [bench.submit(b"b%d" % i) for i in range(8)]
    bench.wake_up()
    assert w.recv_multipart() == frames[:1]
    assert w.recv_multipart() == frames[1:]  # one DISPATCH of seven compact frames
    assert not w.poll(50)
    assert bench.server.sent_first == 1
    more = [bench.submit(b"c%d" % i) for i in range(3)]
    bench.wake_up()  # the last look found more queued: this one is not sent first
    assert w.recv_multipart() == more
    assert bench.server.sent_first == 1


def test_an_older_worker_gets_it_in_four_frames(bench: Bench) -> None:
    w = bench.worker(b"Wold", slots=2, compact=False)
    frame = bench.submit(b"m1")
    bench.wake_up()
    got = w.recv_multipart()
    assert got[:2] == [SIGNATURE, DISPATCH] and COMPACT_SUBMIT + got[2] + got[3] == frame
    assert bench.server.sent_first == 1


def test_no_slot_and_a_refusal_take_the_usual_path(bench: Bench) -> None:
    bench.submit(b"m1")  # no worker yet: held, not sent
    bench.wake_up()
    assert bench.server.core.pending == 1 and bench.server.sent_first == 0
    w = bench.worker(b"Wlate", slots=1)
    assert w.recv_multipart()[0].startswith(COMPACT_SUBMIT)  # given at its HELLO
    bench.submit(b"m1")  # the same id again (a re-send): acknowledged, one copy kept
    bench.wake_up()
    assert bench.server.sent_first == 0
    assert bench.server.core.in_flight == 1 and bench.server.core.pending == 0
    assert not w.poll(50)


def test_a_gone_worker_s_message_goes_to_another(bench: Bench) -> None:
    """The picked worker's connection is gone (the send fails): the message is
    put back and dispatched to the other, as a failed dispatch always was."""
    gone = bench.worker(b"Wgone", slots=1)
    other = bench.worker(b"Wother", slots=1)
    gone.close(0)
    bench.socks.remove(gone)
    core = bench.server.core
    deadline = time.monotonic() + 5
    while True:  # the ROUTER drops the routing id once the pipe is closed
        try:
            bench.server.sock.send(b"Wgone", zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.ZMQError:
            break
        bench.server.sock.send(b"probe")  # a stray frame to a closing pipe: dropped
        assert time.monotonic() < deadline, "the gone worker's pipe never closed"
        bench.server.sock.poll(10)  # (the socket takes in the pipe's closing meanwhile)
    assert core.workers[b"Wgone"].free == 1  # still registered: sqm has not noticed
    frame = bench.submit(b"m1")
    bench.wake_up()
    assert other.recv_multipart() == [frame]
    assert bench.server.sent_first == 0  # picked first, its send failed: put back
    assert core.workers[b"Wgone"].state == DETACHED  # as on any failed dispatch
    assert core.workers[b"Wother"].in_flight.keys() == {b"m1"}


def test_a_plugin_that_sees_acceptance_first_turns_it_off() -> None:
    """The journal records a message when it is accepted: sqm accounts first."""
    seen: list[bytes] = []

    class Records(Plugin):
        def accepted(self, server: QueueServer, msg: Message) -> None:
            seen.append(msg.id)

    b = Bench(Hooks([Records()]))
    try:
        w = b.worker(b"Wj", slots=2)
        frame = b.submit(b"m1")
        b.wake_up()
        assert w.recv_multipart() == [frame]
        assert seen == [b"m1"] and b.server.sent_first == 0
    finally:
        b.close()
