"""sqm groups a flush's dispatches per worker into one DISPATCH; a DONE may name several ids.

A real QueueServer on an ipc endpoint and real DEALER peers; the test drives
the server's input and outbox by hand, so it chooses what one flush holds
(e.g. every message pending when a worker says HELLO).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from sqm.broker.server import BrokerOptions, QueueServer
from sqm.config import resolve
from sqm.protocol import (
    BATCHES,
    BATCHES_READS,
    BYE,
    CANCEL,
    DISPATCH,
    DONE,
    DONE_FAILED,
    HELLO,
    SIGNATURE,
    SUBMIT,
    encode_envelope,
    encode_json,
    envelope_id,
)
from sqm.zmqfast import recv_frame

pytestmark = pytest.mark.timeout(30)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.ctx = zmq.Context()
        self.peer_ctx = zmq.Context()
        self.endpoint = f"ipc://{tmp_path}/q.sock"
        self.mailbox = f"ipc://{tmp_path}/mailbox.sock".encode()
        self.server = QueueServer(self.ctx, resolve("q", endpoint=self.endpoint),
                                  BrokerOptions(heartbeat=1.0), time.time())
        self.peers: list[zmq.Socket] = []
        self.ids = 0
        self.sender = self.peer(b"Ssender")

    def peer(self, rid: bytes) -> zmq.Socket:
        sock = self.peer_ctx.socket(zmq.DEALER)
        self.peers.append(sock)
        sock.routing_id = rid
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def hello(self, sock: zmq.Socket, wid: str, slots: int, *, batch: bool = True) -> None:
        info: dict[str, Any] = {"id": wid, "slots": slots, "heartbeat": 1.0}
        if batch:
            info["batch"] = True
        sock.send_multipart([SIGNATURE, HELLO, encode_json(info)])

    def submit(self, n: int, *, oneway: bool = True) -> list[bytes]:
        ids = []
        for _ in range(n):
            self.ids += 1
            mid = b"m%d" % self.ids
            env = encode_envelope(mid, self.mailbox, b"work", b"json", oneway=oneway)
            self.sender.send_multipart([SIGNATURE, SUBMIT, env, b"{}"])
            ids.append(mid)
        return ids

    def pump(self, cond: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
        """Serve (input, outbox) until ``cond()`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.time()
            self.server.read_batch(now)
            self.server.flush(now)
            value = cond()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.server.sock.poll(20)

    def read_then_flush(self, n: int) -> None:
        """Handle the next ``n`` inputs, then send the outbox once (as one read batch would)."""
        sock = self.server.sock
        now = time.time()
        for _ in range(n):
            assert sock.poll(5000), "input expected"
            self.server.handle_one(recv_frame(sock), now)
        self.server.flush(now)

    def told_batches(self, sock: zmq.Socket) -> None:
        """sqm's answer to a HELLO with ``batch``: it reads multi-id DONEs."""
        assert self.received(sock) == [SIGNATURE, BATCHES, BATCHES_READS]

    def received(self, sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
        assert sock.poll(int(timeout * 1000)), "nothing received"
        return sock.recv_multipart()

    def close(self) -> None:
        for sock in self.peers:
            sock.close(0)
        self.server.close()
        self.peer_ctx.term()
        self.ctx.term()




def dispatched_ids(frames: list[bytes]) -> list[bytes]:
    assert frames[:2] == [SIGNATURE, DISPATCH] and len(frames) % 2 == 0, frames[:2]
    return [envelope_id(frames[i]) for i in range(2, len(frames), 2)]


def test_a_batch_worker_gets_one_dispatch_per_flush(setup: Setup) -> None:
    """Eight pending messages, then a worker with 8 slots: one 18-frame DISPATCH, in order;
    one DONE naming all eight frees all eight slots."""
    ids = setup.submit(8)
    setup.pump(lambda: setup.server.core.pending == 8, "8 pending")
    w = setup.peer(b"Wbatch")
    setup.hello(w, "batch", 8)
    setup.pump(lambda: setup.server.core.in_flight == 8, "8 dispatched")
    setup.told_batches(w)
    frames = setup.received(w)
    assert len(frames) == 2 + 2 * 8
    assert dispatched_ids(frames) == ids
    assert frames[3::2] == [b"{}"] * 8  # the payloads, as submitted
    assert not w.poll(50), "one DISPATCH only"
    status = setup.server.status(time.time())
    assert (status["dispatch_batches_total"], status["dispatch_batched_total"]) == (1, 8)

    w.send_multipart([SIGNATURE, DONE, *ids[:5]])
    w.send_multipart([SIGNATURE, DONE_FAILED, *ids[5:]])
    setup.pump(lambda: setup.server.core.in_flight == 0, "all done")
    core = setup.server.core
    assert (core.completed_total, core.failed_total) == (5, 3)
    assert core.workers[b"Wbatch"].free == 8


def test_an_older_worker_gets_one_dispatch_per_message(setup: Setup) -> None:
    """No ``batch`` in its HELLO: 4-frame DISPATCHes, as before (and no BATCHES)."""
    ids = setup.submit(4)
    setup.pump(lambda: setup.server.core.pending == 4, "4 pending")
    w = setup.peer(b"Wold")
    setup.hello(w, "old", 4, batch=False)
    setup.pump(lambda: setup.server.core.in_flight == 4, "4 dispatched")
    got = [setup.received(w) for _ in range(4)]
    assert all(len(f) == 4 for f in got)
    assert [dispatched_ids(f)[0] for f in got] == ids
    assert setup.server.status(time.time())["dispatch_batches_total"] == 0


def test_a_multi_id_done_ignores_ids_it_does_not_hold(setup: Setup) -> None:
    """Repeated and unknown ids free nothing; an unknown worker's DONE draws one BYE."""
    ids = setup.submit(2)
    w = setup.peer(b"Wone")
    setup.hello(w, "one", 2)
    setup.pump(lambda: setup.server.core.in_flight == 2, "2 dispatched")
    w.send_multipart([SIGNATURE, DONE, ids[0], ids[0], b"nope", ids[1]])
    setup.pump(lambda: setup.server.core.in_flight == 0, "both done")
    core = setup.server.core
    assert core.completed_total == 2 and core.malformed_total == 0
    assert core.workers[b"Wone"].free == 2

    stranger = setup.peer(b"Wstranger")
    stranger.send_multipart([SIGNATURE, DONE, b"x1", b"x2", b"x3"])
    reply = setup.pump(lambda: stranger.poll(0) and stranger.recv_multipart(), "BYE")
    assert reply == [SIGNATURE, BYE]
    assert not stranger.poll(100), "one BYE for the whole DONE"
    w.send_multipart([SIGNATURE, DONE])  # no id: malformed, counted
    setup.pump(lambda: core.malformed_total == 1, "malformed counted")


def test_a_failed_send_puts_the_whole_batch_back(setup: Setup) -> None:
    """A batch to a worker sqm cannot reach: every message goes back (no delivery used)
    and the next worker gets them all, in order, in one DISPATCH."""
    core = setup.server.core
    core.hello(time.time(), b"Wghost", {"id": "ghost", "slots": 4, "batch": True})
    setup.server.flush(time.time())
    ids = setup.submit(4)
    setup.pump(lambda: core.pending == 4 and core.workers[b"Wghost"].detached,
               "4 back in the queue")
    assert core.in_flight == 0
    assert setup.server.status(time.time())["dispatch_batches_total"] == 0
    w = setup.peer(b"Wnext")
    setup.hello(w, "next", 4)
    setup.pump(lambda: core.in_flight == 4, "4 dispatched")
    setup.told_batches(w)
    frames = setup.received(w)
    assert dispatched_ids(frames) == ids
    assert all(core.workers[b"Wnext"].in_flight[i].deliveries == 1 for i in ids)


def test_a_cancel_follows_the_batch_it_cancels(setup: Setup) -> None:
    """Dispatches and a CANCEL for the same worker in one flush: the DISPATCH goes first."""
    core = setup.server.core
    w = setup.peer(b"Wcancel")
    setup.hello(w, "cancel", 3)
    setup.pump(lambda: b"Wcancel" in core.workers, "registered")
    ids = setup.submit(2, oneway=False)
    setup.sender.send_multipart([SIGNATURE, CANCEL, ids[0]])
    setup.read_then_flush(3)  # one flush: both SUBMITs and the CANCEL
    assert core.workers[b"Wcancel"].abandoned
    setup.told_batches(w)
    first = setup.received(w)
    assert dispatched_ids(first) == ids
    assert setup.received(w) == [SIGNATURE, CANCEL, ids[0]]


def test_what_one_wake_up_finds_queued_goes_as_one_dispatch() -> None:
    """handle_burst, the one-queue loop's read: eight SUBMITs queued at one wake-up
    reach a batching worker as one DISPATCH (after a wake-up that found nothing
    queued, the first goes ahead alone); a wake-up that leaves nothing to send
    (a DONE) reads no further, and the blocking recv picks up the rest.

    inproc: a send is readable on the broker's socket once it returns, so the
    test knows exactly what is queued when the broker reads."""
    ctx = zmq.Context()
    endpoint = "inproc://burst"
    server = QueueServer(ctx, resolve("q", endpoint=endpoint), BrokerOptions(heartbeat=1.0),
                         time.time())
    socks: list[zmq.Socket] = []
    try:
        def peer(rid: bytes) -> zmq.Socket:
            sock = ctx.socket(zmq.DEALER)
            socks.append(sock)
            sock.routing_id = rid
            sock.linger = 0
            sock.connect(endpoint)
            return sock

        def wake_up() -> None:  # what the loop does when its blocking recv returns
            server.handle_burst(recv_frame(server.sock, zmq.NOBLOCK), time.time())

        w, sender = peer(b"Wburst"), peer(b"Ssender")
        w.send_multipart([SIGNATURE, HELLO, encode_json({"id": "burst", "slots": 16,
                                                         "heartbeat": 1.0, "batch": True})])
        wake_up()
        assert w.recv_multipart() == [SIGNATURE, BATCHES, BATCHES_READS]
        mailbox = b"inproc://burst-mailbox"
        ids = [b"b%d" % i for i in range(8)]
        for mid in ids:
            env = encode_envelope(mid, mailbox, b"work", b"json", oneway=True)
            sender.send_multipart([SIGNATURE, SUBMIT, env, b"{}"])
        wake_up()
        # The wake-up before found nothing queued: the first goes at once (a lone
        # rpc's dispatch waits for no look), the seven found behind it together.
        assert dispatched_ids(w.recv_multipart()) == ids[:1]
        assert dispatched_ids(w.recv_multipart()) == ids[1:]  # one DISPATCH, in order
        assert not w.poll(50), "two DISPATCHes only"
        more = [b"c%d" % i for i in range(8)]
        for mid in more:
            env = encode_envelope(mid, mailbox, b"work", b"json", oneway=True)
            sender.send_multipart([SIGNATURE, SUBMIT, env, b"{}"])
        wake_up()  # the last look found more: streaming, all eight in one DISPATCH
        assert dispatched_ids(w.recv_multipart()) == more
        assert not w.poll(50), "one DISPATCH only"
        assert server.core.in_flight == 16
        ids += more

        w.send_multipart([SIGNATURE, DONE, *ids[:4]])
        late = encode_envelope(b"late", mailbox, b"work", b"json", oneway=True)
        sender.send_multipart([SIGNATURE, SUBMIT, late, b"{}"])
        wake_up()  # the DONE: nothing to send, so the SUBMIT behind it stays queued
        assert server.core.in_flight == 12 and server.core.completed_total == 4
        assert server.sock.poll(0), "the SUBMIT waits for the next recv"
        wake_up()
        assert dispatched_ids(w.recv_multipart()) == [b"late"]
    finally:
        for sock in socks:
            sock.close(0)
        server.close()
        ctx.term()
