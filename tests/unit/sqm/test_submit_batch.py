"""A batched SUBMIT ``[SIG, S, env1, payload1, env2, payload2, ...]`` (the
AsyncSender's: everything submitted in one event-loop iteration): sqm takes
each message as if it had come alone, answers a malformed one without
dropping the others, and tells senders in ACCEPTED that it takes batches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from sender import AsyncSender, Sender
from sqm.broker.server import QueueServer
from sqm.protocol import (
    ACCEPTED,
    DISPATCH,
    ERROR,
    FEATURES,
    HELLO,
    MAX_SUBMIT_BATCH,
    SIGNATURE,
    SUBMIT,
    decode_envelope,
    encode_envelope,
    unpack_ids,
)
from sqm.testing import InProcessBroker
from worker import Worker

pytestmark = pytest.mark.timeout(30)

MAILBOX = b"inproc://batch-mailbox"


def recv(sock: zmq.Socket, what: str) -> list[bytes]:
    assert sock.poll(5000), f"nothing came: {what}"
    return sock.recv_multipart()


def sender_socket(b: InProcessBroker) -> zmq.Socket:
    sock = b.context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(b.endpoint)
    return sock


def test_each_message_of_a_batch_is_taken_and_a_bad_one_alone_is_refused() -> None:
    with InProcessBroker("q") as b:
        sock = sender_socket(b)
        try:
            good = [encode_envelope(b"m:%d" % i, MAILBOX, b"work", b"json") for i in (1, 2, 3)]
            bad = encode_envelope(b"m:bad", MAILBOX, b"work", b"json")[:-1]  # lengths don't add up
            sock.send_multipart([SIGNATURE, SUBMIT, good[0], b"1", bad, b"x", good[1], b"2",
                                 good[2], b"3"])
            error = recv(sock, "the refusal of the bad one")
            assert error[:4] == [SIGNATURE, ERROR, b"m:bad", b"Malformed"]
            accepted = recv(sock, "ACCEPTED")
            assert accepted[:2] == [SIGNATURE, ACCEPTED] and accepted[3] == FEATURES
            assert unpack_ids(accepted[2]) == [b"m:1", b"m:2", b"m:3"]
            st = b.status()
            assert st["pending"] == 3 and st["malformed_total"] == 1

            # A worker with room for all three gets them in order, payloads untouched.
            w = b.context.socket(zmq.DEALER)
            w.setsockopt(zmq.LINGER, 0)
            w.setsockopt(zmq.ROUTING_ID, b"Wbatch")
            w.connect(b.endpoint)
            try:
                w.send_multipart([SIGNATURE, HELLO, json.dumps(
                    {"id": "wb", "slots": 3, "heartbeat": 1.0, "methods": ["work"]}).encode()])
                got = []
                while len(got) < 3:
                    frames = recv(w, "the dispatches")
                    if frames[1] == DISPATCH:
                        for i in range(2, len(frames), 2):
                            got.append((decode_envelope(frames[i]).id, frames[i + 1]))
                assert got == [(b"m:1", b"1"), (b"m:2", b"2"), (b"m:3", b"3")]
            finally:
                w.close(0)
        finally:
            sock.close(0)


@pytest.mark.parametrize("frames", [
    [SIGNATURE, SUBMIT, encode_envelope(b"m:1", MAILBOX, b"work", b"json"), b"1", b"dangling"],
    [SIGNATURE, SUBMIT] + [encode_envelope(b"m:1", MAILBOX, b"w", b"json"), b""]
    * (MAX_SUBMIT_BATCH + 1),
], ids=["odd", "too-many"])
def test_a_batch_of_the_wrong_shape_is_malformed_and_sqm_goes_on(frames: list[bytes]) -> None:
    with InProcessBroker("q") as b:
        sock = sender_socket(b)
        try:
            sock.send_multipart(frames)
            error = recv(sock, "the refusal")
            assert error[:4] == [SIGNATURE, ERROR, b"m:1", b"Malformed"]
            assert b.status()["malformed_total"] == 1 and b.status()["pending"] == 0
            sock.send_multipart([SIGNATURE, SUBMIT, encode_envelope(b"m:ok", MAILBOX, b"w",
                                                                    b"json"), b"1"])
            assert unpack_ids(recv(sock, "ACCEPTED")[2]) == [b"m:ok"]
        finally:
            sock.close(0)


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many messages each batched SUBMIT that sqm reads carries (a spy)."""
    sizes: list[int] = []
    real = QueueServer._on_submits
    real_compact = QueueServer._on_compact_submit

    def spy(self: QueueServer, rid_frame: Any, frames: list[bytes], now: float) -> None:
        sizes.append((len(frames) - 2) // 2)
        real(self, rid_frame, frames, now)

    def spy_compact(self: QueueServer, rid_frame: Any, frames: list[bytes], now: float) -> None:
        if len(frames) > 1:  # one compact frame per message: a batch of len(frames)
            sizes.append(len(frames))
        real_compact(self, rid_frame, frames, now)

    monkeypatch.setattr(QueueServer, "_on_submits", spy)
    monkeypatch.setattr(QueueServer, "_on_compact_submit", spy_compact)
    return sizes


@contextlib.contextmanager
def served() -> Iterator[InProcessBroker]:
    """An in-process broker with one worker answering ``add`` (payload + 1)."""
    with InProcessBroker("q") as b:
        w = Worker("q", endpoint=b.endpoint, context=b.context,
                   callbacks={"add": lambda _w, _o, p: p + 1})
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        try:
            yield b
        finally:
            w.terminate()
            t.join(10)


def test_async_sender_batches_what_one_loop_iteration_submits(batch_sizes: list[int]) -> None:
    """The first rpc goes alone (no broker has said it takes batches yet);
    after its ACCEPTED, of 100 concurrent rpcs the first goes alone too
    (nothing else outstanding yet: never delayed) and the other 99 leave as
    a few SUBMITs of many."""
    with served() as b:
        async def main() -> list[int]:
            async with AsyncSender("q", endpoint=b.endpoint, context=b.context,
                                   timeout=20) as s:
                assert await s.rpc("add", 0) == 1
                while not s._links.links[0].batches:  # its ACCEPTED comes within 2 ms
                    await asyncio.sleep(0.01)
                return list(await asyncio.gather(*(s.rpc("add", i) for i in range(100))))

        assert asyncio.run(asyncio.wait_for(main(), 20)) == [i + 1 for i in range(100)]
    assert batch_sizes and sum(batch_sizes) == 99 and max(batch_sizes) >= 50, batch_sizes


def test_sync_map_sends_each_round_of_submissions_as_one_batch(batch_sizes: list[int]) -> None:
    """map() queues what one round of free window slots submits and sends it
    before it waits or hands out items: the first round is the whole window."""
    with served() as b, Sender("q", endpoint=b.endpoint, context=b.context, timeout=20) as s:
        assert s.rpc("add", 0) == 1
        while not s._links.links[0].batches:  # read with its ACCEPTED
            s.poll(0.01)
        assert list(s.map("add", range(200), max_concurrent=40)) == list(range(1, 201))
    assert batch_sizes and batch_sizes[0] == 40 and sum(batch_sizes) <= 200, batch_sizes
