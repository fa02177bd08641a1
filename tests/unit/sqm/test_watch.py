"""sqm learns that a worker's connection closed (sqm/broker/watch.py): it detaches it.

A detached worker gets no new work; what it holds stays in flight until it
says HELLO again (a brief drop: nothing runs twice) or is silent / not back
for 3 heartbeat intervals (then it is redelivered or failed back).

A real QueueServer on an ipc endpoint and real DEALER peers (in another
ZeroMQ context, so another I/O thread): the test drives the server's input
and its monitor by hand, so it chooses the order in which sqm reads a HELLO
and a disconnect, including the order that would bind a worker to a
connection that has already closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from sqm.broker.server import BrokerOptions, QueueServer
from sqm.config import resolve
from sqm.protocol import DISPATCH, HEARTBEAT, HELLO, SIGNATURE, SUBMIT, encode_envelope, encode_json

pytestmark = pytest.mark.timeout(30)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.ctx = zmq.Context()
        self.peer_ctx = zmq.Context()  # the workers' own I/O thread, as in another process
        self.endpoint = f"ipc://{tmp_path}/q.sock"
        self.mailbox = f"ipc://{tmp_path}/mailbox.sock".encode()  # never used: oneway
        self.server = QueueServer(self.ctx, resolve("q", endpoint=self.endpoint),
                                  BrokerOptions(heartbeat=1.0), time.time())
        self.peers: list[zmq.Socket] = []
        self.ids = 0
        # Worker ids whose heartbeat thread is alive: pump beats for them (own connection).
        self.beating: set[str] = set()
        self._beats: zmq.Socket | None = None
        self._beat_at = 0.0

    def peer(self, rid: bytes) -> zmq.Socket:
        """A DEALER connected to sqm (``rid`` b"": one libzmq names, as a heartbeat thread's)."""
        sock = self.peer_ctx.socket(zmq.DEALER)
        self.peers.append(sock)
        if rid:
            sock.routing_id = rid
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def hello(self, sock: zmq.Socket, wid: str, *, watch: bool = True) -> None:
        info: dict[str, Any] = {"id": wid, "slots": 1, "heartbeat": 1.0}
        if watch:
            info["watch"] = True
        sock.send_multipart([SIGNATURE, HELLO, encode_json(info)])

    def submit(self, sock: zmq.Socket, *, retries: int = 0) -> bytes:
        self.ids += 1
        mid = b"m%d" % self.ids
        env = encode_envelope(mid, self.mailbox, b"work", b"json", oneway=True, retries=retries)
        sock.send_multipart([SIGNATURE, SUBMIT, env, b"{}"])
        return mid

    def read(self) -> None:
        """What sqm has received, without looking at its monitor."""
        self.server.read_batch(time.time())

    def pump(self, cond: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
        """Serve (input, monitor, outbox) until ``cond()`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            self.beat()
            now = time.time()
            self.server.read_batch(now)
            self.server.check_connections(now)
            self.server.core.tick(now)
            self.server.flush(now)
            value = cond()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.server.sock.poll(20)

    def beat(self) -> None:
        """A bare heartbeat for each id in :attr:`beating`, every 0.2 s."""
        if not self.beating or time.monotonic() < self._beat_at:
            return
        self._beat_at = time.monotonic() + 0.2
        if self._beats is None:
            self._beats = self.peer(b"")
        for wid in self.beating:
            self._beats.send_multipart([SIGNATURE, HEARTBEAT, wid.encode()])

    def wait(self, seconds: float) -> None:
        """Serve (and beat) for ``seconds``."""
        deadline = time.monotonic() + seconds
        self.pump(lambda: time.monotonic() > deadline, f"{seconds} s", seconds + 5)

    def workers(self) -> set[bytes]:
        return set(self.server.core.workers)

    def close(self) -> None:
        for sock in self.peers:
            sock.close(0)
        self.server.close()
        self.peer_ctx.term()
        self.ctx.term()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()


def received(setup: Setup, sock: zmq.Socket, timeout: float = 3.0) -> list[bytes]:
    """The next message ``sock`` gets from sqm (served meanwhile)."""
    setup.pump(lambda: sock.poll(0), "a message from sqm", timeout)
    return sock.recv_multipart()


def test_a_watched_worker_is_told_and_its_closed_connection_detaches_it(setup: Setup) -> None:
    w1, w2, sender = setup.peer(b"W1"), setup.peer(b"W2"), setup.peer(b"S1")
    setup.hello(w1, "one")
    setup.pump(lambda: b"W1" in setup.workers(), "W1 registered")
    # sqm watches the connection: a heartbeat with sqm's interval and the report interval
    assert received(setup, w1) == [SIGNATURE, HEARTBEAT, b"1000", b"30000"]
    row = setup.server.status(time.time())["workers"][0]
    assert row["watched"] is True
    mid = setup.submit(sender, retries=1)
    frames = received(setup, w1)
    assert frames[1] == DISPATCH and mid in frames[2]
    setup.hello(w2, "two")
    setup.beating.add("two")
    setup.pump(lambda: b"W2" in setup.workers(), "W2 registered")
    received(setup, w2)  # its watch notice
    heard = setup.server.core.workers[b"W1"].heard_at
    w1.close(0)  # the worker process dies: its connection closes (and it beats no more)
    t0 = time.monotonic()
    setup.pump(lambda: setup.server.core.workers[b"W1"].detached, "W1 detached")
    assert time.monotonic() - t0 < 1.0
    row = {r["id"]: r for r in setup.server.status(time.time())["workers"]}["one"]
    assert row["state"] == "detached" and row["in_flight"] == 1
    assert setup.server.core.redelivered_total == 0  # it may only have lost its connection
    frames = received(setup, w2, timeout=5.0)  # silent 3 intervals: dead, redelivered
    assert frames[1] == DISPATCH and mid in frames[2]
    assert 3.0 <= time.time() - heard < 4.0
    assert b"W1" not in setup.workers() and setup.server.core.redelivered_total == 1


def test_a_worker_back_on_a_new_connection_keeps_what_it_holds(setup: Setup) -> None:
    """A brief drop: the connection closes, the worker (alive, beating) reconnects and
    says HELLO again. What it held stays with it: nothing is redelivered."""
    w1, w2, sender = setup.peer(b"W1"), setup.peer(b"W2"), setup.peer(b"S1")
    setup.hello(w1, "one")
    setup.pump(lambda: b"W1" in setup.workers(), "W1 registered")
    received(setup, w1)  # its watch notice
    mid = setup.submit(sender, retries=1)
    assert mid in received(setup, w1)[2]
    setup.hello(w2, "two")
    setup.beating.update({"one", "two"})  # their heartbeat threads, on their own connection
    setup.pump(lambda: b"W2" in setup.workers(), "W2 registered")
    received(setup, w2)
    w1.close(0)
    setup.pump(lambda: setup.server.core.workers[b"W1"].detached, "W1 detached")
    setup.wait(1.5)  # away 1.5 s, beating: still detached, nothing moved
    assert setup.server.core.workers[b"W1"].detached and w2.poll(0) == 0
    back = setup.peer(b"W1")
    setup.hello(back, "one")
    setup.pump(lambda: not setup.server.core.workers[b"W1"].detached, "W1 back")
    w = setup.server.core.workers[b"W1"]
    assert list(w.in_flight) == [mid] and setup.server.core.redelivered_total == 0
    setup.wait(3.5)  # past 3 intervals since the drop: it stays, nothing moves
    assert b"W1" in setup.workers() and setup.server.core.redelivered_total == 0
    assert w2.poll(0) == 0


def test_a_worker_that_does_not_ask_is_heartbeated_and_still_detached_when_it_closes(
        setup: Setup) -> None:
    old = setup.peer(b"W-old")
    setup.hello(old, "old", watch=False)
    setup.pump(lambda: b"W-old" in setup.workers(), "registered")
    frames = received(setup, old)  # sqm's heartbeat, as ever: no 4th frame
    assert frames == [SIGNATURE, HEARTBEAT, b"1000"]
    old.close(0)
    setup.pump(lambda: setup.server.core.workers[b"W-old"].detached, "detached on close")
    setup.pump(lambda: not setup.workers(), "dropped once silent 3 intervals")


def test_a_hello_read_after_its_connection_closed_registers_nothing(setup: Setup) -> None:
    conns = setup.server.connections
    w = setup.peer(b"W1")
    setup.pump(lambda: conns.open_count == 1, "the connection accepted")
    setup.hello(w, "one")
    assert setup.server.sock.poll(2000)  # the HELLO waits in sqm's socket, unread
    w.close(0)
    assert conns.pending(2000)  # ...and the close on its monitor, unread
    setup.read()  # the HELLO: sqm reads the monitor first and sees the connection gone
    assert setup.workers() == set()
    setup.pump(lambda: True, "one more round")
    assert setup.workers() == set()


def test_a_reused_descriptor_does_not_drop_the_new_worker(setup: Setup) -> None:
    """A worker closes; another connects, gets the closed connection's descriptor and
    says HELLO; sqm reads that HELLO before it looked at its monitor. The old worker is
    detached, the new one is bound to the descriptor and stays attached."""
    old_rid = b"A0"
    old = setup.peer(old_rid)
    setup.hello(old, "a0")
    setup.pump(lambda: old_rid in setup.workers(), "the first worker registered")
    conns = setup.server.connections
    for n in range(1, 21):  # until the kernel hands the closed descriptor to the new one
        fd = conns.fd_of(old_rid)
        old.close(0)
        assert conns.pending(2000)  # its close, unread
        new_rid = b"A%d" % n
        new = setup.peer(new_rid)
        setup.hello(new, new_rid.decode())
        assert setup.server.sock.poll(2000)
        setup.read()  # the HELLO first; sqm reads the monitor inside it
        assert setup.server.core.workers[old_rid].detached  # the close was read before the bind
        assert not setup.server.core.workers[new_rid].detached
        if conns.fd_of(new_rid) == fd:
            break
        old, old_rid = new, new_rid
    else:
        pytest.fail("the kernel never reused a descriptor")
    deadline = time.monotonic() + 0.3
    setup.pump(lambda: time.monotonic() > deadline, "the monitor read again")
    attached = {rid for rid, w in setup.server.core.workers.items() if not w.detached}
    assert attached == {new_rid}


def test_a_second_connection_with_the_same_routing_id_keeps_the_worker(setup: Setup) -> None:
    """A worker that reconnects (ROUTER_HANDOVER) says HELLO on the new connection; the
    old one closing afterwards must not drop it."""
    first = setup.peer(b"W1")
    setup.hello(first, "one")
    setup.pump(lambda: b"W1" in setup.workers(), "registered")
    conns = setup.server.connections
    fd_first = conns.fd_of(b"W1")
    second = setup.peer(b"W1")
    setup.hello(second, "one")
    setup.pump(lambda: conns.fd_of(b"W1") not in (None, fd_first), "bound to the new connection")
    first.close(0)
    deadline = time.monotonic() + 0.5
    setup.pump(lambda: time.monotonic() > deadline, "the old connection's close read")
    assert setup.workers() == {b"W1"} and not setup.server.core.workers[b"W1"].detached
    second.close(0)
    setup.pump(lambda: setup.server.core.workers[b"W1"].detached,
               "detached when its live connection closes")


def test_a_hello_left_on_a_replaced_connection_registers_no_second_worker(setup: Setup) -> None:
    """A worker reconnects before sqm has read the HELLO of its first connection: the
    ROUTER hands the routing id to the new connection and renames the old one with an
    id of its own (5 bytes, the first 0), under which a loaded sqm may still read that
    HELLO. It must not register the worker a second time (a registration no report and
    no closed connection would ever reach)."""
    w = setup.peer(b"W1")
    setup.hello(w, "one")
    setup.pump(lambda: b"W1" in setup.workers(), "registered")
    renamed = zmq.Frame(b"\x00\x80\x00\x00\x01")  # as libzmq names a replaced connection
    info = encode_json({"id": "one", "slots": 1, "watch": True})
    setup.server.handle(renamed, [SIGNATURE, HELLO, info], time.time())
    assert setup.workers() == {b"W1"}
    assert setup.server.core.workers[b"W1"].watched
