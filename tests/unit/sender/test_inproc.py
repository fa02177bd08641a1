"""Sender and AsyncSender on a shared zmq.Context, with a broker stand-in on inproc://.

The stand-in is a ROUTER that plays sqm's part (ACCEPTED) and a worker's
(ACK, RESULT straight to the mailbox): it checks the sender's side of
docs/PROTOCOL.md without any process.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import cbor2
import pytest
import zmq

from sender import AsyncSender, Sender
from sqm.protocol import ACCEPTED, RESULT, SIGNATURE, SUBMIT, decode_envelope, pack_ids


class FakeBroker:
    """Answers every SUBMIT with ACCEPTED and, as a worker would, its payload doubled."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.endpoint = f"inproc://fake-{uuid.uuid4().hex}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(self.endpoint)
        self.mailboxes: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pushes: dict[bytes, zmq.Socket] = {}
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            rid, *frames = self.router.recv_multipart()
            assert frames[0] == SIGNATURE and frames[1] == SUBMIT
            env = decode_envelope(frames[2])
            self.mailboxes.append(env.mailbox)
            self.router.send_multipart([rid, SIGNATURE, ACCEPTED, pack_ids([env.id])])
            push = pushes.get(env.mailbox)
            if push is None:
                push = pushes[env.mailbox] = self.ctx.socket(zmq.DEALER)  # a mailbox takes DEALER or ROUTER
                push.linger = 0
                push.connect(env.mailbox.decode())
            body = cbor2.dumps(cbor2.loads(frames[3]) * 2)
            push.send_multipart([SIGNATURE, RESULT, env.id, body])
        for push in pushes.values():
            push.close(0)
        self.router.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def shared() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def test_sender_on_a_shared_context_binds_an_inproc_mailbox(shared: zmq.Context) -> None:
    broker = FakeBroker(shared)
    try:
        with Sender("q", endpoint=broker.endpoint, context=shared) as s:
            assert s.mailbox.startswith("inproc://sqm-mbox-")
            assert s.rpc("double", 21, timeout=5) == 42
            mid = s.submit("double", 2, timeout=5)
            assert s.receive(id=mid) == 4
            assert list(s.map("double", [1, 2, 3], timeout=5)) == [2, 4, 6]
        assert broker.mailboxes[0].decode() == s.mailbox
    finally:
        broker.close()


def test_async_sender_on_a_shared_plain_context(shared: zmq.Context) -> None:
    broker = FakeBroker(shared)

    async def main() -> list[int]:
        async with AsyncSender("q", endpoint=broker.endpoint, context=shared) as s:
            assert s.mailbox.startswith("inproc://sqm-mbox-")
            one = await s.rpc("double", 5, timeout=5)
            many = [x async for x in s.map("double", [1, 2], timeout=5)]
            return [one, *many]

    try:
        assert asyncio.run(main()) == [10, 2, 4]
    finally:
        broker.close()
