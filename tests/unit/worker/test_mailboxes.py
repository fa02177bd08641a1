"""The worker's mailbox connections stay bounded and only go where allowed."""

from __future__ import annotations

import pytest
import zmq

from sqm.protocol import MailboxPolicy
from worker.mailboxes import MailboxPool

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def test_lru_bound_and_reuse(ctx, tmp_path):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), max_open=3, linger_ms=0)
    addrs = [f"ipc://{tmp_path}/m{i}.sock".encode() for i in range(5)]
    first = pool.get(addrs[0])
    assert pool.get(addrs[0]) is first  # reused, not reopened
    for a in addrs[1:]:
        pool.get(a)
    assert len(pool) == 3
    assert pool.opened_total == 5 and pool.closed_total == 2
    assert pool.get(addrs[4]) is not None and len(pool) == 3
    pool.close()
    assert len(pool) == 0


def test_idle_sockets_are_closed(ctx, tmp_path):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)]), idle_s=10, linger_ms=0)
    pool.get(f"ipc://{tmp_path}/a.sock".encode())
    pool.expire(now=0)  # monotonic clock far in the past: nothing is idle yet
    assert len(pool) == 1
    import time

    pool.expire(now=time.monotonic() + 11)
    assert len(pool) == 0 and pool.closed_total == 1
    pool.close()


@pytest.mark.parametrize(
    "addr",
    [b"ipc:///etc/passwd.sock", b"ipc://relative.sock", b"inproc://x", b"tcp://example.com:80",
     b"pgm://eth0;239.192.1.1:5555", b"tcp://1.2.3.4:0"],
)
def test_refused_addresses_never_connected(ctx, tmp_path, addr):
    pool = MailboxPool(ctx, MailboxPolicy([str(tmp_path)], networks=["127.0.0.0/8"]))
    with pytest.raises(ValueError):
        pool.get(addr)
    assert len(pool) == 0 and pool.opened_total == 0
    pool.close()
