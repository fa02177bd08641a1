"""Lean multipart send/receive for the hot path.

pyzmq's ``send_multipart``/``recv_multipart`` and attribute options
(``sock.rcvmore``) build ``enum.Flag`` objects for every frame; that Python
overhead was most of the broker's per-message CPU. These helpers call the
Cython backend directly with plain-int flags: an 8-frame send drops from
~7.7 µs to ~1.2 µs (measured in BENCHMARKS.md). Semantics are unchanged.
"""

from __future__ import annotations

from typing import cast

import zmq
from zmq.backend import Socket as _Backend

from sqm.protocol import SIGNATURE as _SIGNATURE

_send = _Backend.send
_recv = _Backend.recv
#: One frame, plain-int flags, no Python wrapper: for a routing-id frame with
#: ``SNDMORE`` before a message, where a ``send_frames`` call of its own
#: measured ~1 µs more per reply (BENCHMARKS.md).
send_raw = _send
set_option = _Backend.set  # plain-int options, no enum conversion
get_option = _Backend.get

NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
RCVTIMEO = int(zmq.RCVTIMEO)
EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)
_SIGNATURE_LEN = len(_SIGNATURE)
POLLIN = int(zmq.POLLIN)
ZERO_COPY_ABOVE = 64 * 1024  # like pyzmq's copy_threshold: big frames are not copied


def send_frames(sock: zmq.Socket, frames: list[bytes], flags: int = NOBLOCK) -> None:
    """Send ``frames`` as one message. Raises zmq.Again (nothing sent) if it would block."""
    more = flags | SNDMORE
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], more)
    data = frames[last]
    if len(data) > ZERO_COPY_ABOVE:
        _send(sock, data, flags, False)
    else:
        _send(sock, data, flags)


def recv_frames(sock: zmq.Socket, flags: int = NOBLOCK) -> list[bytes]:
    """Receive one whole message as a list of bytes. Raises zmq.Again if none is waiting."""
    frame = _recv(sock, flags, False)
    parts = [frame.bytes]
    while frame.more:  # Frame.more is cheap; getsockopt(RCVMORE) costs ~1 µs per call
        frame = _recv(sock, flags, False)
        parts.append(frame.bytes)
    return parts


def recv_message(sock: zmq.Socket, flags: int = NOBLOCK) -> list[bytes]:
    """:func:`recv_frames` for a DEALER where most messages are compact.

    A frame longer than the signature that starts with it is a compact
    message, whole by the protocol (docs/PROTOCOL.md): it comes as bytes, with
    no Frame object and one release of the GIL where a Frame costs two (its
    receive and its close). Hot: 0.2 µs against 0.9 µs; with many Senders'
    threads in one process, each release of the GIL can hand it to another
    thread. Anything else reads on as :func:`recv_frames`. Never on a ROUTER:
    there a sender's stray frame after a compact-looking one would be read
    as the next message's routing id.
    """
    first = _recv(sock, flags, True)
    if len(first) > _SIGNATURE_LEN and first.startswith(_SIGNATURE):
        return [first]
    if get_option(sock, RCVMORE):
        return [first, *recv_frames(sock, flags)]  # the rest of this message
    return [first]


def recv_rest(sock: zmq.Socket, first: zmq.Frame, flags: int = NOBLOCK) -> list[bytes]:
    """The remaining frames of the message whose first frame is ``first``."""
    parts = []
    frame = first
    while frame.more:
        frame = _recv(sock, flags, False)
        parts.append(frame.bytes)
    return parts


def readable(sock: zmq.Socket) -> bool:
    """A message is waiting on ``sock`` (~2.5 µs, where a failing NOBLOCK
    recv costs ~7 µs: pyzmq builds and raises zmq.Again)."""
    return bool(cast(int, get_option(sock, EVENTS)) & POLLIN)


def recv_frame(sock: zmq.Socket, flags: int = NOBLOCK) -> zmq.Frame:
    """One frame as a zmq.Frame (it carries metadata such as Peer-Address)."""
    return _recv(sock, flags, False)


def send_more(sock: zmq.Socket, data: bytes, flags: int = NOBLOCK) -> None:
    """Send one frame of a message with more to follow."""
    _send(sock, data, flags | SNDMORE)
