"""The worker's mailbox connections: one ROUTER, many connections, bounded and validated."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import zmq

from sqm.protocol import ACK, RESULT, SIGNATURE, MailboxPolicy
from tests.conftest import wait_for
from worker.execute import Execution
from worker.mailboxes import MailboxLost, MailboxPool

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)  # closes every socket, even those a failed assertion left open


def mailbox(ctx: zmq.Context, addr: str, *, kind: int = zmq.DEALER,
            server: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    """A Sender's mailbox bound at ``addr`` (``server``: its CURVE pair, public first)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    if server is not None:
        sock.curve_publickey, sock.curve_secretkey = server
        sock.curve_server = True
    sock.bind(addr)
    return sock


def recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "nothing arrived"
    return sock.recv_multipart()


def test_one_socket_many_connections_each_reply_to_its_own_mailbox(ctx, tmp_path):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0)
    addrs = [f"ipc://{tmp_path}/m{i}.sock" for i in range(20)]
    boxes = [mailbox(ctx, a) for a in addrs]
    heads = [pool.get(a.encode()) for a in addrs]
    assert pool.get(addrs[0].encode()) is heads[0]  # reused: the same frame list, no allocation
    assert len({h[0] for h in heads}) == 20  # a routing id per connection
    for i, a in enumerate(addrs):
        pool.send(a.encode(), [SIGNATURE, RESULT, b"id:%d" % i, b"x"])
    for i, box in enumerate(boxes):
        assert recv(box) == [SIGNATURE, RESULT, b"id:%d" % i, b"x"]  # its own, nothing else
        assert not box.poll(0)
    assert pool.stats() == {"sockets": 1, "open": 20, "opened": 20, "closed": 0, "lost": 0}
    pool.close()
    assert len(pool) == 0 and pool.sock is None


def test_a_reply_queues_before_the_mailbox_exists(ctx, tmp_path):
    """The pipe is made at connect: the first reply waits for the mailbox's bind."""
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0)
    addr = f"ipc://{tmp_path}/late.sock"
    pool.send(addr.encode(), [SIGNATURE, ACK, b"id:1"])
    box = mailbox(ctx, addr)
    assert recv(box) == [SIGNATURE, ACK, b"id:1"]
    pool.close()


def test_bound_drops_the_least_recently_used(ctx, tmp_path):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), max_open=3, linger_ms=0)
    addrs = [f"ipc://{tmp_path}/m{i}.sock".encode() for i in range(5)]
    boxes = [mailbox(ctx, a.decode()) for a in addrs]
    first = pool.get(addrs[0])
    for a in addrs[1:3]:
        pool.get(a)
    pool.get(addrs[0])  # used again: now the most recent
    for a in addrs[3:]:
        pool.get(a)
    assert len(pool) == 3
    assert pool.opened_total == 5 and pool.closed_total == 2
    assert pool.get(addrs[0]) is first  # kept: 1 and 2 went
    again = pool.get(addrs[1])  # dropped, connects again under a new routing id
    assert again[0] not in {first[0]} and len(pool) == 3
    pool.send(addrs[1], [SIGNATURE, RESULT, b"id:1", b""])
    assert recv(boxes[1]) == [SIGNATURE, RESULT, b"id:1", b""]
    assert pool.stats()["sockets"] == 1
    pool.close()


def test_idle_connections_are_dropped_and_come_back(ctx, tmp_path):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), idle_s=10, linger_ms=0)
    a, b = (f"ipc://{tmp_path}/{n}.sock" for n in "ab")
    box, box_b = mailbox(ctx, a), mailbox(ctx, b)
    head = pool.get(a.encode())
    pool.send(a.encode(), [SIGNATURE, ACK, b"id:1"])
    pool.send(b.encode(), [SIGNATURE, ACK, b"id:1"])
    recv(box), recv(box_b)  # both handshakes done: only idleness counts below
    now = time.monotonic()
    pool.expire(now + 5)  # 5 s idle: both kept
    assert len(pool) == 2
    pool.get(b.encode())  # b used again: stamped with the last expire's time
    pool.expire(now + 11)
    assert len(pool) == 1 and pool.closed_total == 1  # a went, b stays
    assert b.encode() in pool._open
    assert pool.get(a.encode()) != head  # a new connection
    pool.send(a.encode(), [SIGNATURE, ACK, b"id:2"])
    assert recv(box) == [SIGNATURE, ACK, b"id:2"]
    pool.close()


@pytest.mark.parametrize(
    "addr",
    [b"ipc:///etc/passwd.sock", b"ipc://relative.sock", b"inproc://x", b"tcp://example.com:80",
     b"pgm://eth0;239.192.1.1:5555", b"tcp://1.2.3.4:0", b"ipc://\xff.sock",
     b"tcp://127.0.0.1:5 short-key"],
)
def test_refused_addresses_never_connected(ctx, tmp_path, addr):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)], networks=["127.0.0.0/8"]))
    for _ in range(2):  # the second time from the refusal cache
        with pytest.raises(ValueError):
            pool.get(addr)
    assert len(pool) == 0 and pool.opened_total == 0 and pool.sock is None
    pool.close()


def test_curve_mailboxes_each_get_their_own_server_key(ctx, tmp_path):
    """Keys are per connection: two CURVE mailboxes and a plain one on one socket."""
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0)
    pairs = [zmq.curve_keypair() for _ in range(2)]
    addrs = [f"ipc://{tmp_path}/c{i}.sock" for i in range(2)]
    secured = [mailbox(ctx, a, server=p) for a, p in zip(addrs, pairs, strict=True)]
    plain_addr = f"ipc://{tmp_path}/plain.sock"
    plain = mailbox(ctx, plain_addr)
    for i, (a, p) in enumerate(zip(addrs, pairs, strict=True)):
        pool.send(f"{a} {p[0].decode()}".encode(), [SIGNATURE, RESULT, b"c%d" % i, b""])
    pool.send(plain_addr.encode(), [SIGNATURE, RESULT, b"plain", b""])
    for i, box in enumerate(secured):
        assert recv(box) == [SIGNATURE, RESULT, b"c%d" % i, b""]
    assert recv(plain) == [SIGNATURE, RESULT, b"plain", b""]
    assert pool.stats()["sockets"] == 1
    pool.close()


def test_the_same_endpoint_under_a_new_key_replaces_the_connection(ctx, tmp_path):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0)
    a = f"ipc://{tmp_path}/k.sock"
    pub = zmq.curve_keypair()[0].decode()
    pool.get(a.encode())
    pool.get(f"{a} {pub}".encode())
    assert len(pool) == 1 and pool.closed_total == 1
    pool.close()


def test_a_40_character_key_that_is_not_z85_is_refused(ctx, tmp_path):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0)
    bad = f"ipc://{tmp_path}/k.sock {chr(34) * 40}".encode()  # '"' is not a z85 digit
    with pytest.raises(ValueError, match="key refused"):
        pool.get(bad)
    assert len(pool) == 0
    good = f"ipc://{tmp_path}/p.sock"
    box = mailbox(ctx, good)
    pool.send(good.encode(), [SIGNATURE, ACK, b"after"])  # the socket is still usable, plain
    assert recv(box) == [SIGNATURE, ACK, b"after"]
    pool.close()


def wait_lost(pool: MailboxPool, n: int = 1) -> None:
    """Run the pool's chores (as the runners do every half beat) until ``n`` connections are lost."""
    wait_for(lambda: pool.expire() or pool.lost_total >= n, 10, "the connection to be given up")


def test_a_wrong_server_key_delivers_nothing_and_is_given_up(ctx, tmp_path, caplog):
    """The server drops a client with the wrong key: nothing arrives, the connection is dropped."""
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0, handshake_s=0.3)
    addr = f"ipc://{tmp_path}/c.sock"
    box = mailbox(ctx, addr, server=zmq.curve_keypair())
    pool.handshake_s = 1.0  # the refusal below is checked within it
    wrong = f"{addr} {zmq.curve_keypair()[0].decode()}".encode()
    pool.send(wrong, [SIGNATURE, ACK, b"wrong"])
    right = zmq.curve_keypair()
    addr2 = f"ipc://{tmp_path}/c2.sock"
    box2 = mailbox(ctx, addr2, server=right)
    pool.send(f"{addr2} {right[0].decode()}".encode(), [SIGNATURE, ACK, b"right"])
    assert recv(box2) == [SIGNATURE, ACK, b"right"]  # both handshakes have run by now
    with caplog.at_level(logging.WARNING, logger="sqm.worker"):
        wait_lost(pool)
    assert not box.poll(0)
    assert len(pool) == 1 and wrong not in pool._open  # the right one stays
    assert [r for r in caplog.records if "refused" in r.getMessage()]
    with pytest.raises(MailboxLost):
        pool.get(wrong)
    pool.close()


def test_an_old_senders_pull_mailbox_is_given_up_with_one_warning(ctx, tmp_path, caplog):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0, handshake_s=0.3)
    addr = f"ipc://{tmp_path}/old.sock"
    old = mailbox(ctx, addr, kind=zmq.PULL)  # before the mailbox became a DEALER
    with caplog.at_level(logging.WARNING, logger="sqm.worker"):
        for round_ in range(2):  # lost, refused for handshake_s, tried again, lost again
            wait_for(lambda: _sent(pool, addr.encode()), 10, "the address to be tried again")
            wait_lost(pool, round_ + 1)
    assert not old.poll(0)  # nothing got through
    assert len(pool) == 0 and pool.opened_total == 2
    warnings = [r for r in caplog.records if "older Sender" in r.getMessage()]
    assert len(warnings) == 1  # once per address, not per attempt
    old.close(0)
    pool.expire(time.monotonic() + 2)  # past handshake_s: the address may be a new Sender's
    new = mailbox(ctx, addr)
    pool.send(addr.encode(), [SIGNATURE, ACK, b"id:2"])
    assert recv(new) == [SIGNATURE, ACK, b"id:2"]
    pool.close()


def _sent(pool: MailboxPool, addr: bytes) -> bool:
    try:
        pool.send(addr, [SIGNATURE, ACK, b"id:1"])
    except MailboxLost:
        pool.expire()
        return False
    return True


def test_a_sender_gone_is_given_up_quietly(ctx, tmp_path, caplog):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0, handshake_s=0.3)
    gone = f"ipc://{tmp_path}/gone.sock".encode()  # nobody listens there
    with caplog.at_level(logging.DEBUG, logger="sqm.worker"):
        pool.send(gone, [SIGNATURE, RESULT, b"id:1", b""])
        wait_lost(pool)
    assert len(pool) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r for r in caplog.records if "unreachable" in r.getMessage()]
    pool.close()


def test_a_working_connection_is_never_given_up(ctx, tmp_path):
    """The handshake watch sees a completed handshake: past handshake_s the connection stays."""
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0, handshake_s=0.3)
    addrs = [f"ipc://{tmp_path}/w{i}.sock" for i in range(3)]
    boxes = [mailbox(ctx, a) for a in addrs]
    for a in addrs:
        pool.send(a.encode(), [SIGNATURE, ACK, b"id"])
    for box in boxes:
        recv(box)
    pool.expire(time.monotonic() + 5)  # well past handshake_s, within idle_s
    assert len(pool) == 3 and pool.lost_total == 0
    for a, box in zip(addrs, boxes, strict=True):
        pool.send(a.encode(), [SIGNATURE, ACK, b"again"])
        assert recv(box) == [SIGNATURE, ACK, b"again"]
    pool.close()


def test_deliver_sends_through_the_pool_and_drops_replies_to_a_lost_mailbox(ctx, tmp_path,
                                                                            caplog):
    """Execution.deliver: the reply path (routing-id frame, then the frames)."""
    ex = Execution(None, "w1", {})
    pool = ex.mailboxes = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0,
                                      handshake_s=1.0)
    good = f"ipc://{tmp_path}/good.sock"
    box = mailbox(ctx, good)
    ex.deliver(SimpleNamespace(mailbox=good.encode()), [SIGNATURE, RESULT, b"id:1", b"r"])
    assert recv(box) == [SIGNATURE, RESULT, b"id:1", b"r"]
    old_addr = f"ipc://{tmp_path}/old.sock"
    old = mailbox(ctx, old_addr, kind=zmq.PULL)
    orig = SimpleNamespace(mailbox=old_addr.encode())
    with caplog.at_level(logging.DEBUG, logger="sqm.worker"):
        ex.deliver(orig, [SIGNATURE, ACK, b"id:2"])
        wait_lost(pool)
        for k in range(3):  # refused quietly now: no warning per reply
            ex.deliver(orig, [SIGNATURE, ACK, b"id:%d" % (3 + k)])
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert not old.poll(0)
    with caplog.at_level(logging.WARNING, logger="sqm.worker"):
        ex.deliver(SimpleNamespace(mailbox=b"ipc:///etc/x.sock"), [SIGNATURE, ACK, b"id:9"])
    assert "refusing mailbox" in caplog.text
    assert pool.stats() == {"sockets": 1, "open": 1, "opened": 2, "closed": 1, "lost": 1}
    pool.close()


FD_CHILD = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
import zmq
if sys.argv[1] == "worker":
    from sqm.protocol import MailboxPolicy
    from worker.mailboxes import MailboxPool
    ctx = zmq.Context()
    pool = MailboxPool(ctx, MailboxPolicy())
    print(pool.max_open)
    pool.close(); ctx.term()
else:
    from sender import Sender
    s = Sender("q", endpoint=sys.argv[2]); s.close()
    print(0)
print(*resource.getrlimit(resource.RLIMIT_NOFILE))
"""


@pytest.mark.parametrize("who", ["worker", "sender"])
def test_the_fd_soft_limit_is_raised_to_the_hard_limit(tmp_path, who):
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > 256, "the test needs room above 256"
    out = subprocess.run(
        [sys.executable, "-c", FD_CHILD, who, f"ipc://{tmp_path}/q.sock"],
        capture_output=True, text=True, timeout=20, cwd=os.getcwd(),
        env=dict(os.environ, SQM_RUNDIR=str(tmp_path)),
    )
    assert out.returncode == 0, out.stderr
    bound, limits = out.stdout.splitlines()
    soft, child_hard = map(int, limits.split())
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    assert soft == want and child_hard == hard
    if who == "worker":
        assert int(bound) == min(4096, max(64, want // 2))


def test_pools_of_many_threads_connect_one_at_a_time(ctx, tmp_path, monkeypatch):
    """Worker threads of one process make their sockets and connections one at a
    time (a lock), not all queued for the GIL at once ahead of heartbeat threads;
    a reply on an open connection takes no lock."""
    import threading

    import worker.mailboxes as mailboxes

    inside = [0]
    most = [0]
    real_open = MailboxPool._open_socket

    def counting_open(self: MailboxPool) -> zmq.Socket:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            # while this one makes its socket, the others get every chance to start theirs
            # (sched_yield releases the GIL: a yield, not a wait for anything)
            for _ in range(50):
                os.sched_yield()
            return real_open(self)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(MailboxPool, "_open_socket", counting_open)
    addr = f"ipc://{tmp_path}/m.sock"
    box = mailbox(ctx, addr)
    pools = [MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), linger_ms=0) for _ in range(8)]
    start = threading.Barrier(len(pools))

    def reply(pool: MailboxPool) -> None:
        start.wait()
        pool.send(addr.encode(), [SIGNATURE, RESULT, b"id", b"x"])

    threads = [threading.Thread(target=reply, args=(p,)) for p in pools]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert most[0] == 1
    assert [recv(box) for _ in pools] == [[SIGNATURE, RESULT, b"id", b"x"]] * len(pools)
    with mailboxes._CONNECTING:  # held elsewhere: a reply on an open connection still goes
        pools[0].send(addr.encode(), [SIGNATURE, RESULT, b"id2", b"x"])
    assert recv(box) == [SIGNATURE, RESULT, b"id2", b"x"]
    for pool in pools:
        pool.close()
