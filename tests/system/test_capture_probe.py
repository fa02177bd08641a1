"""The loopback capture probe sees clear text, and does not see what CURVE encrypts.

Security tests rely on ``LoopbackCapture`` finding nothing; these show it
finds a marker whenever one crosses ``lo`` in clear text, so "not found"
means something.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import zmq

from sqm.security.keys import KeyPair
from sqm.sockets import make_socket

from .capture import LoopbackCapture


def new_marker(tag: str) -> bytes:
    return f"SQM-MARKER-{tag}-{os.urandom(8).hex()}".encode()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(0)


def test_probe_finds_a_marker_sent_over_plain_tcp() -> None:
    marker, never_sent = new_marker("tcp"), new_marker("unsent")
    with socket.create_server(("127.0.0.1", 0)) as server, LoopbackCapture() as cap:
        client = socket.create_connection(server.getsockname(), timeout=10)
        conn, _ = server.accept()
        with client, conn:
            client.sendall(marker)
            got = b""
            conn.settimeout(10)
            while len(got) < len(marker):
                got += conn.recv(len(marker))
            assert got == marker
    assert cap.packets > 0
    assert cap.contains(marker)
    assert not cap.contains(never_sent)


def send_over_zmq(ctx: zmq.Context, marker: bytes, curve: bool) -> None:
    """One message from a DEALER to a ROUTER over tcp://127.0.0.1, CURVE or not."""
    if curve:
        server_keys, client_keys = KeyPair(*zmq.curve_keypair()), KeyPair(*zmq.curve_keypair())
        server = make_socket(ctx, zmq.ROUTER, linger_ms=0, curve_server=server_keys)
        client = make_socket(ctx, zmq.DEALER, linger_ms=0, curve_client=client_keys,
                             server_key=server_keys.public)
    else:
        server = make_socket(ctx, zmq.ROUTER, linger_ms=0)
        client = make_socket(ctx, zmq.DEALER, linger_ms=0)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(marker)
        assert server.poll(10_000), "the message did not arrive"
        _rid, got = server.recv_multipart()
        assert got == marker  # delivered intact, whatever crossed the wire
        server.send_multipart([_rid, marker + b"-reply"])
        assert client.poll(10_000)
        assert client.recv() == marker + b"-reply"
    finally:
        client.close(0)
        server.close(0)


def test_plain_zmq_pair_is_seen_in_clear(ctx: zmq.Context) -> None:
    marker = new_marker("plain-zmq")
    with LoopbackCapture() as cap:
        send_over_zmq(ctx, marker, curve=False)
    assert cap.contains(marker)
    assert cap.contains(marker + b"-reply")


def test_curve_pair_from_the_sockets_helper_is_not(ctx: zmq.Context) -> None:
    plain_marker, curve_marker = new_marker("plain-zmq"), new_marker("curve-zmq")
    with LoopbackCapture() as cap:
        send_over_zmq(ctx, plain_marker, curve=False)  # same capture: the probe works here
        send_over_zmq(ctx, curve_marker, curve=True)
    assert cap.contains(plain_marker)
    assert not cap.contains(curve_marker)
    assert not cap.contains(curve_marker + b"-reply")
