"""Compact messages (docs/PROTOCOL.md, "Compact messages"): the hot ones in one
frame, read by sqm, workers and Senders of this version, and the classic form
for every peer that does not say it reads them."""

from __future__ import annotations

from typing import Any

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from sender import Sender
from sqm.broker.server import QueueServer
from sqm.protocol import (
    ACCEPTED,
    COMPACT_DONE,
    COMPACT_DONE_FAILED,
    COMPACT_HEAD,
    COMPACT_RESULT,
    COMPACT_SUBMIT,
    DISPATCH,
    ERROR,
    FEATURE_BATCH,
    FEATURE_COMPACT,
    FLAG_COMPACT_REPLY,
    HELLO,
    RESULT,
    SIGNATURE,
    classic_result,
    compact_dispatches,
    compact_parts,
    compact_result,
    decode_compact,
    decode_envelope,
    encode_envelope,
    encode_json,
    pack_envelope,
    pack_ids,
    read_compact,
    read_head,
    unpack_ids,
)
from tests.conftest import wait_for

from .test_dispatch_batches import Setup
from .test_submit_batch import served

pytestmark = pytest.mark.timeout(30)

ids = st.binary(min_size=1, max_size=128)
texts = st.binary(min_size=1, max_size=64)


@given(ids, st.binary(max_size=256), texts, st.binary(min_size=1, max_size=32),
       st.binary(max_size=300), st.floats(0, 1e10), st.booleans())
def test_a_compact_submit_reads_as_its_envelope_and_payload(
        mid: bytes, mailbox: bytes, method: bytes, ser: bytes, payload: bytes,
        not_before: float, extra: bool) -> None:
    env = pack_envelope(FLAG_COMPACT_REPLY, 3, 1, 12.5, mid, mailbox, method, ser,
                        not_before=not_before if extra else 0.0)
    frame = COMPACT_SUBMIT + env + payload
    assert compact_parts(frame) == (env, payload)
    head = read_head(env)
    got = read_compact(frame)
    assert got[:4] == head[:4]  # flags, retries, priority, deadline
    assert [x - COMPACT_HEAD for x in got[4:7]] == list(head[4:])  # the field ends
    assert got[7] == COMPACT_HEAD + len(env)
    # A worker reads the compact DISPATCH (the same frames) as the classic one.
    assert compact_dispatches([frame, frame]) == [SIGNATURE, DISPATCH, env, payload, env, payload]


@given(ids, st.binary(max_size=256), texts, st.binary(min_size=1, max_size=32),
       st.binary(max_size=300), st.floats(0, 1e10), st.integers(0, 255), st.booleans())
def test_a_worker_reads_a_compact_dispatch_in_place_as_its_envelope(
        mid: bytes, mailbox: bytes, method: bytes, ser: bytes, payload: bytes,
        not_before: float, hops: int, extra: bool) -> None:
    env = pack_envelope(FLAG_COMPACT_REPLY, 3, 1, 12.5, mid, mailbox, method, ser, hops,
                        not_before=not_before if extra else 0.0, attempts=2 if extra else 0)
    frame = COMPACT_SUBMIT + env + payload
    got, start = decode_compact(frame)
    assert frame[start:] == payload
    want = decode_envelope(env)
    assert {k: getattr(got, k) for k in got.__slots__} == {
        k: getattr(want, k) for k in want.__slots__}
    assert (got.id, got.hops, got.attempts) == (mid, hops, 2 if extra else 0)
    with pytest.raises(ValueError):
        decode_compact(frame[:start - 1])  # the envelope cut short


@given(ids, st.binary(max_size=500))
def test_a_compact_result_reads_as_the_classic_one(mid: bytes, body: bytes) -> None:
    frame = compact_result(mid, body)
    assert frame.startswith(COMPACT_RESULT)
    assert classic_result(frame) == [SIGNATURE, RESULT, mid, body]


def test_malformed_compact_frames_read_as_nothing_valid() -> None:
    env = encode_envelope(b"m:1", b"ipc:///x", b"w", b"cbor")
    with pytest.raises(ValueError):
        read_compact(COMPACT_SUBMIT + env[:-1])  # lengths past the frame's end
    with pytest.raises(ValueError):
        read_compact(COMPACT_SUBMIT + b"\x00" * 5)  # too short for a head
    # In a dispatch, each bad one gets an empty envelope (the worker refuses it), the rest stand.
    assert compact_dispatches([COMPACT_SUBMIT + env + b"p", b"SQM1", COMPACT_SUBMIT + b"x"]) == [
        SIGNATURE, DISPATCH, env, b"p", b"", b"", b"", b""]
    assert compact_dispatches([SIGNATURE, DISPATCH, env, b"p"]) is None  # the classic form
    assert classic_result(COMPACT_RESULT) == [COMPACT_RESULT]  # too short: dropped as unknown


def compact_frame(s: Setup, mid: bytes, payload: bytes = b"{}", *, oneway: bool = False) -> bytes:
    env = encode_envelope(mid, s.mailbox, b"work", b"json", oneway=oneway)
    return COMPACT_SUBMIT + env + payload


def hello(s: Setup, rid: bytes, slots: int, *, compact: bool) -> zmq.Socket:
    """A raw worker: HELLO with ``batch`` (and ``compact`` if it reads compact DISPATCHes)."""
    sock = s.peer(rid)
    info: dict[str, Any] = {"id": rid.decode(), "slots": slots, "heartbeat": 1.0, "batch": True}
    if compact:
        info["compact"] = True
    sock.send_multipart([SIGNATURE, HELLO, encode_json(info)])
    s.pump(lambda: rid in s.server.core.workers, "registered")
    s.told_batches(sock)  # BATCHES names the compact DONE: any worker of this version may send it
    return sock


def test_sqm_hands_a_compact_submit_on_unchanged_and_to_an_older_worker_in_four_frames(
        setup: Setup) -> None:
    s = setup
    first, second = compact_frame(s, b"c1", b"one"), compact_frame(s, b"c2", b"two")
    s.sender.send(first)
    s.sender.send(second)
    s.pump(lambda: s.server.core.pending == 2, "2 pending")
    s.server.send_acks()  # the broker's loop sends them once idle for 2 ms
    accepted = s.received(s.sender)
    assert accepted[:2] == [SIGNATURE, ACCEPTED] and unpack_ids(accepted[2]) == [b"c1", b"c2"]
    assert FEATURE_BATCH in accepted[3] and FEATURE_COMPACT in accepted[3]

    new = hello(s, b"Wnew", 1, compact=True)
    s.pump(lambda: s.server.core.in_flight == 1, "1 dispatched")
    assert s.received(new) == [first]  # the very frame the Sender sent

    old = hello(s, b"Wold", 1, compact=False)
    s.pump(lambda: s.server.core.in_flight == 2, "2 dispatched")
    env, payload = compact_parts(second)
    assert s.received(old) == [SIGNATURE, DISPATCH, env, payload]

    # Compact DONEs free the slots, one id or several, ok or failed.
    new.send(COMPACT_DONE + pack_ids([b"c1"]))
    old.send(COMPACT_DONE_FAILED + pack_ids([b"c2"]))
    s.pump(lambda: s.server.core.in_flight == 0 and s.server.core.completed_total == 1,
           "both ended")
    assert s.server.core.failed_total == 1


def test_a_compact_batch_goes_to_a_compact_worker_as_its_frames(setup: Setup) -> None:
    s = setup
    frames = [compact_frame(s, b"b%d" % i, b"%d" % i, oneway=True) for i in range(4)]
    s.sender.send_multipart(frames)  # one compact SUBMIT of four messages
    s.pump(lambda: s.server.core.pending == 4, "4 pending")
    w = hello(s, b"Wbatch", 8, compact=True)
    s.pump(lambda: s.server.core.in_flight == 4, "4 dispatched")
    assert s.received(w) == frames  # one DISPATCH: the four frames as they came
    w.send(COMPACT_DONE + pack_ids([b"b0", b"b1", b"b2", b"b3"]))
    s.pump(lambda: s.server.core.in_flight == 0, "all ended")
    assert s.server.core.completed_total == 4


def test_a_bad_compact_submit_is_refused_alone_and_sqm_goes_on(setup: Setup) -> None:
    s = setup
    good = compact_frame(s, b"g1")
    bad = compact_frame(s, b"bad")[:-3]  # the envelope runs past the frame's end
    s.sender.send_multipart([good, bad, b"SQM1"])  # the 3rd is not a compact SUBMIT
    s.pump(lambda: s.server.core.malformed_total == 2, "two refused")
    assert s.server.core.pending == 1
    error = s.received(s.sender)
    assert error[:4] == [SIGNATURE, ERROR, b"bad", b"Malformed"]
    s.sender.send(COMPACT_DONE)  # no id: malformed, counted
    s.sender.send(b"SQM1q" + b"x")  # an unknown compact command
    s.pump(lambda: s.server.core.malformed_total == 4, "four refused")
    s.sender.send(compact_frame(s, b"g2"))
    s.pump(lambda: s.server.core.pending == 2, "the next one taken")


def test_sender_and_worker_of_this_version_talk_compact_end_to_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Submits go compact once ACCEPTED said so, dispatches and DONEs are compact, and the
    replies come in one frame (the counts below see each form)."""
    seen: dict[str, int] = {"submit": 0, "done": 0, "result": 0}
    real_submit, real_done = QueueServer._on_compact_submit, QueueServer._on_compact_done

    def on_submit(self: QueueServer, rid_frame: Any, frames: list[bytes], now: float) -> None:
        seen["submit"] += len(frames)
        real_submit(self, rid_frame, frames, now)

    def on_done(self: QueueServer, rid_frame: Any, frames: list[bytes], now: float) -> None:
        seen["done"] += len(unpack_ids(frames[0][COMPACT_HEAD:]))
        real_done(self, rid_frame, frames, now)

    monkeypatch.setattr(QueueServer, "_on_compact_submit", on_submit)
    monkeypatch.setattr(QueueServer, "_on_compact_done", on_done)
    import sender._correlator as correlator
    real_classic = correlator.classic_result

    def classic(frame: bytes) -> list[bytes]:
        seen["result"] += 1
        return real_classic(frame)

    monkeypatch.setattr(correlator, "classic_result", classic)
    with served() as b, Sender("q", endpoint=b.endpoint, context=b.context, timeout=10) as sender:
        for i in range(60):
            assert sender.rpc("add", i) == i + 1
        assert seen["result"] == 60  # every reply in one frame
        # The first one went in 4 frames: no ACCEPTED had said sqm reads compact ones.
        assert 0 < seen["submit"] < 60
        # (the last DONE may reach sqm after its reply reached us)
        wait_for(lambda: seen["done"] == 60, what="every DONE, compact")
