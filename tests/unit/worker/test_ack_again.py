"""While a callback runs, the worker's heartbeat thread repeats its ACK (with
its interval) to the caller's mailbox once per beat: a caller whose broker
died learns from the silence that the worker died too (WorkerLost)."""

from __future__ import annotations

import zmq

from sqm.protocol import ACK, SIGNATURE, MailboxPolicy
from worker import Worker
from worker.execute import Originator
from worker.mailboxes import MailboxPool


def test_a_running_message_is_acknowledged_again_from_the_second_beat() -> None:
    ctx = zmq.Context()
    mailbox = ctx.socket(zmq.DEALER)
    mailbox.setsockopt(zmq.LINGER, 0)
    try:
        mailbox.bind("tcp://127.0.0.1:*")
        addr = bytes(mailbox.getsockopt(zmq.LAST_ENDPOINT))
        w = Worker("q", endpoint="tcp://127.0.0.1:1", heartbeat=0.5)
        w._execution.beat_ms = b"500"
        pool = MailboxPool(ctx, MailboxPolicy(), linger_ms=0)
        running = w._execution.running
        running[b"id:1"] = addr
        before = w._ack_again(pool, running, set())  # just started: nothing yet
        assert before == {b"id:1"} and not mailbox.poll(100)
        before = w._ack_again(pool, running, before)  # still running a beat later
        assert mailbox.poll(2000)
        assert mailbox.recv_multipart() == [SIGNATURE, ACK, b"id:1", b"500"]
        # Answered: the execution forgets it, and no more ACKs go out.
        orig = Originator(b"id:1", addr, b"cbor", False, "work")
        w._execution.mailboxes = pool
        w._execution.respond(orig, 1)
        assert b"id:1" not in running
        assert w._ack_again(pool, running, before) == set()
        mailbox.recv_multipart()  # the RESULT
        assert not mailbox.poll(100)
        pool.close()
    finally:
        mailbox.close(0)
        ctx.term()
