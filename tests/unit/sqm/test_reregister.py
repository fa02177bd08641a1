"""A restarted sqm asks an unknown worker connection to re-register once per
heartbeat, however many DONEs and heartbeats it had queued meanwhile: each
BYE would draw one more HELLO (tests/unit/sqm/test_queue.py: a repeat HELLO
keeps what the worker holds)."""

from __future__ import annotations

import time

import zmq

from sqm.broker import BrokerOptions
from sqm.protocol import BYE, DONE, HEARTBEAT, SIGNATURE
from sqm.testing import InProcessBroker


def byes_within(sock: zmq.Socket, seconds: float) -> int:
    """How many BYEs ``sock`` receives in ``seconds`` (the broker's heartbeats aside)."""
    n = 0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(int(left * 1000) + 1):
            break
        frames = sock.recv_multipart()
        if frames[:2] == [SIGNATURE, BYE]:
            n += 1
    return n


def test_queued_traffic_of_an_unknown_worker_draws_one_bye_per_heartbeat() -> None:
    with InProcessBroker("q", opts=BrokerOptions(heartbeat=1.0)) as b:
        sock = b.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"W-unknown")
        sock.connect(b.endpoint)
        try:
            for i in range(5):  # what a worker queued while sqm was away
                sock.send_multipart([SIGNATURE, DONE, b"old:%d" % i])
            sock.send_multipart([SIGNATURE, HEARTBEAT])
            assert byes_within(sock, 0.4) == 1
            sock.send_multipart([SIGNATURE, DONE, b"old:8"])  # within the heartbeat: not again
            assert byes_within(sock, 0.8) == 0
            sock.send_multipart([SIGNATURE, DONE, b"old:9"])  # a heartbeat later: asked again
            assert byes_within(sock, 1.0) == 1
        finally:
            sock.close(0)
