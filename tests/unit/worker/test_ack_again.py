"""While a callback runs, the worker's heartbeat thread sends its ACK (with
its interval) to the caller's mailbox once per beat: a caller whose broker
died learns from the silence that the worker died too (WorkerLost).

A message whose envelope asks for the ACK at once (FLAG_ACK: ``submit(ack=True)``
or ``on_start``) got it at its start, so the beats repeat it from the second
one; any other gets its first ACK from the first beat that finds it running.
"""

from __future__ import annotations

import pytest
import zmq

from sqm.protocol import ACK, FLAG_ACK, SIGNATURE, MailboxPolicy, decode_envelope, pack_envelope
from worker import Worker
from worker.execute import Originator
from worker.mailboxes import MailboxPool


def originator(msg_id: bytes, addr: bytes, flags: int) -> Originator:
    env = decode_envelope(pack_envelope(flags, 0, 1, 0.0, msg_id, addr, b"work", b"cbor"))
    return Originator(msg_id, addr, b"cbor", False, "work", env)


@pytest.mark.parametrize(("flags", "first_beat_acks"), [(FLAG_ACK, False), (0, True)])
def test_a_running_message_is_acknowledged_each_beat(flags: int, first_beat_acks: bool) -> None:
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
        orig = originator(b"id:1", addr, flags)
        running[b"id:1"] = orig
        before = w._ack_again(pool, running, set())  # the first beat since it started
        assert before == {b"id:1"}
        if first_beat_acks:
            assert mailbox.poll(2000)
            assert mailbox.recv_multipart() == [SIGNATURE, ACK, b"id:1", b"500"]
        else:
            assert not mailbox.poll(100)
        before = w._ack_again(pool, running, before)  # still running a beat later
        assert mailbox.poll(2000)
        assert mailbox.recv_multipart() == [SIGNATURE, ACK, b"id:1", b"500"]
        # Answered: the execution forgets it, and no more ACKs go out.
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
