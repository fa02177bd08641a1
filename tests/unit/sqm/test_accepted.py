"""When sqm sends ACCEPTED: a sender's first message at once (it lists the
features), then per sender every ACK_BATCH messages (if half of them are still
held), when sqm is idle, or a tick later for what sqm still holds; ended
messages are never listed.

A real QueueServer and real DEALER peers (test_dispatch_batches' Setup, the
``setup`` fixture of conftest.py); the test drives input, flushes and ticks
by hand. "Nothing came" is checked by waiting NOTHING_MS on the peer, after
a check that the same wait sees an ACCEPTED that was sent.
"""

from __future__ import annotations

import pytest
import zmq

from sqm.broker.server import ACK_BATCH
from sqm.protocol import ACCEPTED, DONE, FEATURES, SIGNATURE, envelope_id, unpack_ids
from tests.unit.sqm.test_dispatch_batches import Setup

pytestmark = pytest.mark.timeout(30)

NOTHING_MS = 200


def accepted(sock: zmq.Socket) -> list[bytes] | None:
    """The ids of the ACCEPTED waiting on ``sock`` (None: nothing within NOTHING_MS)."""
    if not sock.poll(NOTHING_MS):
        return None
    frames = sock.recv_multipart()
    assert frames[:2] == [SIGNATURE, ACCEPTED] and frames[3] == FEATURES, frames
    return unpack_ids(frames[2])


def first_told(setup: Setup) -> list[bytes]:
    """Submit the sender's first message: told at once (the features it lists)."""
    ids = setup.submit(1, oneway=False)
    setup.read_then_flush(1)
    assert accepted(setup.sender) == ids
    return ids


def test_the_first_at_once_the_rest_a_tick_later_if_still_held(setup: Setup) -> None:
    first_told(setup)  # the probe sees an ACCEPTED sent in a flush
    later = setup.submit(2, oneway=False)
    setup.read_then_flush(2)
    assert accepted(setup.sender) is None  # not told yet: the next ones wait
    setup.server.age_acks()  # tick 1: accepted since the last tick, kept
    assert accepted(setup.sender) is None
    setup.server.age_acks()  # tick 2: accepted before the previous tick, still queued
    assert accepted(setup.sender) == later
    setup.server.age_acks()
    assert accepted(setup.sender) is None  # each id told once
    assert setup.server.acks_pending == 0


def test_an_idle_sqm_tells_both_ticks_ids_in_one_message(setup: Setup) -> None:
    first_told(setup)
    older = setup.submit(1, oneway=False)
    setup.read_then_flush(1)
    setup.server.age_acks()
    newer = setup.submit(1, oneway=False)
    setup.read_then_flush(1)
    setup.server.send_acks()  # what sqm does after ACK_IDLE_MS with nothing to read
    assert accepted(setup.sender) == older + newer
    assert accepted(setup.sender) is None


def test_every_ack_batch_of_one_sender_goes_at_once(setup: Setup) -> None:
    first_told(setup)
    ids = setup.submit(ACK_BATCH - 1, oneway=False)
    setup.read_then_flush(ACK_BATCH - 1)
    assert accepted(setup.sender) is None
    ids += setup.submit(1, oneway=False)
    setup.read_then_flush(1)
    assert accepted(setup.sender) == ids


def test_a_sequential_sender_s_batch_of_ended_messages_is_not_told(setup: Setup) -> None:
    """32 rpcs of a sequential Sender: all but the last ended before the 32nd came.
    Its notice would list one message, read by a Sender only at its 20 ms look
    (~100 µs in that rpc); that one waits for the idle moment or a tick instead."""
    first = first_told(setup)
    w = setup.peer(b"Wseq")
    setup.hello(w, "wseq", slots=1)
    setup.read_then_flush(1)  # the HELLO: the first message goes to the worker
    setup.told_batches(w)
    running = [envelope_id(setup.received(w)[2])]
    assert running == first
    last: list[bytes] = []
    for _ in range(ACK_BATCH):
        w.send_multipart([SIGNATURE, DONE, running.pop()])  # a reply went; the rpc ended
        setup.read_then_flush(1)  # read first: two peers' messages may come in either order
        last = setup.submit(1, oneway=False)  # the Sender's next rpc
        setup.read_then_flush(1)
        running.append(envelope_id(setup.received(w)[2]))
    assert running == last
    assert accepted(setup.sender) is None  # 32 accepted since the first, one held: not told
    assert setup.server.acks_pending == 1  # the ended ones are dropped, the held one waits
    setup.server.send_acks()  # what sqm does after ACK_IDLE_MS with nothing to read
    assert accepted(setup.sender) == last


def test_many_senders_one_message_each_wait_for_a_tick(setup: Setup) -> None:
    """The batch counts per sender: 40 sequential senders' messages (each past
    its first) are not told together after 32 of them, as they were."""
    senders = [setup.peer(b"S%d" % i) for i in range(40)]
    own = setup.sender
    try:
        for sock in senders:  # each sender's first: told at once
            setup.sender = sock
            first_told(setup)
        second = {}
        for sock in senders:
            setup.sender = sock
            second[sock] = setup.submit(1, oneway=False)
        setup.read_then_flush(len(senders))
        assert all(accepted(sock) is None for sock in senders[:3])
        setup.server.send_acks()  # what sqm does after ACK_IDLE_MS with nothing to read
        assert all(accepted(sock) == second[sock] for sock in senders)
    finally:
        setup.sender = own


def test_ended_messages_are_left_out(setup: Setup) -> None:
    first_told(setup)
    ids = setup.submit(2, oneway=False)
    setup.read_then_flush(2)
    w = setup.peer(b"Wacks")
    setup.hello(w, "wa", slots=2)  # takes the first message and ids[0]
    setup.read_then_flush(1)
    setup.told_batches(w)
    dispatched = setup.received(w)
    assert ids[0] in [envelope_id(env) for env in dispatched[2::2]]
    w.send_multipart([SIGNATURE, DONE, ids[0]])
    setup.read_then_flush(1)  # ids[0] ended before sqm told its sender
    setup.server.send_acks()
    assert accepted(setup.sender) == [ids[1]]
