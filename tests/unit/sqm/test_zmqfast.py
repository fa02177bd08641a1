"""recv_message: a compact message comes whole as one frame, anything else
reads on to its last frame, and a stray frame never hides a later message."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from sqm.protocol import COMPACT_RESULT, SIGNATURE
from sqm.zmqfast import recv_message, send_frames

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    a.bind("inproc://zmqfast")
    b.connect("inproc://zmqfast")
    b.rcvtimeo = 5000
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def test_a_compact_message_is_one_frame_and_classic_ones_read_to_the_end(pair) -> None:
    a, b = pair
    compact = COMPACT_RESULT + b"\x02id" + b"body"
    classic = [SIGNATURE, b"R", b"envelope", b"payload"]
    send_frames(a, [compact])
    send_frames(a, classic)
    send_frames(a, [b"x"])  # one short frame: not compact, still whole
    assert recv_message(b, 0) == [compact]
    assert recv_message(b, 0) == classic
    assert recv_message(b, 0) == [b"x"]
    with pytest.raises(zmq.Again):
        recv_message(b)


def test_frames_after_a_compact_looking_one_come_as_messages_of_their_own(pair) -> None:
    """A peer breaking the protocol costs itself: its extra frames arrive as a
    garbage message (dropped by the reader), and the next real message still
    arrives whole."""
    a, b = pair
    stray = [COMPACT_RESULT + b"\x01i", b"junk1", b"junk2"]
    send_frames(a, stray)
    send_frames(a, [SIGNATURE, b"R", b"env"])
    assert recv_message(b, 0) == [stray[0]]
    assert recv_message(b, 0) == [b"junk1", b"junk2"]  # the rest, as a message: garbage
    assert recv_message(b, 0) == [SIGNATURE, b"R", b"env"]
