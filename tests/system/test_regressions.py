"""Regression tests for bugs found while benchmarking."""

from __future__ import annotations

import logging
import socket
import time

import pytest
import zmq

from sender import Sender
from sqm.protocol import MailboxPolicy
from sqm.sockets import ipc_listener_alive
from tests.conftest import wait_for
from worker import Originator, Worker
from worker.mailboxes import MailboxPool

pytestmark = pytest.mark.timeout(30)


def test_listener_with_full_backlog_counts_as_alive(rundir):
    path = str(rundir / "busy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    clients = []
    try:
        # fill the backlog without accepting, until connecting would block
        for _ in range(64):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            clients.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        else:
            pytest.fail("could not fill the listen backlog")
        assert ipc_listener_alive(f"ipc://{path}")
    finally:
        for c in clients:
            c.close()
        server.close()
    assert not ipc_listener_alive(f"ipc://{path}")  # stale file: nobody listening
    assert not ipc_listener_alive(f"ipc://{rundir}/missing.sock")


def test_worker_survives_running_out_of_sockets(rundir, caplog):
    ctx = zmq.Context()
    ctx.max_sockets = 2
    try:
        w = Worker("q", callbacks={"f": lambda *a: 1}, context=ctx)
        w._pool = MailboxPool(ctx, MailboxPolicy([str(rundir)]), linger_ms=0)
        held = [ctx.socket(zmq.PUSH) for _ in range(2)]  # the context is now full
        orig = Originator(b"id:1", f"ipc://{rundir}/mbox-a.sock".encode(), b"cbor", False, "f")
        with caplog.at_level(logging.ERROR, logger="sqm.worker"):
            w._to_mailbox(orig, [b"SQM1", b"A", b"id:1"])  # must not raise
        assert "cannot open mailbox" in caplog.text
        for s in held:
            s.close(0)
        w._pool.close()
    finally:
        ctx.term()


def test_receive_after_the_deadline_still_takes_a_reply_that_already_arrived(cluster):
    """Found by the soak review: receive(id) past the message's deadline raised
    Timeout without reading the mailbox, even with the reply waiting in it."""
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        mid = s.submit("echo", "made it", timeout=0.5)
        # the worker says DONE after sending the reply: it is in the socket, unread
        wait_for(lambda: cluster.status("q")["completed_total"] == 1, 5, "the reply")
        assert s._mailbox.poll(5000, zmq.POLLIN)
        deadline = time.monotonic() + 0.6
        wait_for(lambda: time.monotonic() > deadline, 5, "the message's deadline to pass")
        assert s.receive(id=mid) == "made it"
