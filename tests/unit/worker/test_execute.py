"""worker.execute: both ways of running a dispatch (the plain runner's inlined
``run`` and the asyncio runner's ``prepare`` / call / ``settle``) answer alike."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from sqm.protocol import (
    ACK,
    COMPACT_SUBMIT,
    DISPATCH,
    ERROR,
    FLAG_ACK,
    RESULT,
    SIGNATURE,
    encode_envelope,
)
from worker.execute import Execution, Originator

pytestmark = pytest.mark.timeout(30)


def ok(worker: Any, orig: Originator, payload: Any) -> Any:
    return {"echo": payload}


def answers_itself(worker: Any, orig: Originator, payload: Any) -> Any:
    worker.execution.respond(orig, "mine")
    return "ignored"


def boom(worker: Any, orig: Originator, payload: Any) -> Any:
    raise KeyError("nope")


def unencodable(worker: Any, orig: Originator, payload: Any) -> Any:
    return object()


class Host:
    """Stands in for the Worker (the callbacks' first argument)."""

    execution: Execution


def make() -> tuple[Execution, list[list[bytes]]]:
    host = Host()
    ex = Execution(host, "w-test", {"ok": ok, "mine": answers_itself, "boom": boom,
                                    "bad": unencodable})
    host.execution = ex
    sent: list[list[bytes]] = []
    ex.route(lambda orig, frames: sent.append(frames))
    return ex, sent


def dispatch(method: str, body: bytes = b'"hi"', *, oneway: bool = False,
             ack: bool = False) -> list[bytes]:
    env = encode_envelope(b"id:1", b"ipc:///tmp/none.sock", method.encode(), b"json",
                          oneway=oneway)
    if ack:  # the caller asked to hear of the start at once (submit(ack=True), on_start)
        env = bytes((env[0] | FLAG_ACK,)) + env[1:]
    return [SIGNATURE, DISPATCH, env, body]


def by_steps(ex: Execution, frames: list[bytes]) -> tuple[bytes, bool]:
    """What the asyncio runner does, without the loop."""
    call = ex.prepare(frames)
    if len(call) == 2:
        return call
    orig, fn, payload = call
    try:
        value = fn(ex.worker, orig, payload)
    except Exception as exc:
        ex.raised(orig, exc)
        return orig.id, False
    return orig.id, ex.settle(orig, value)


def scrub(frames: list[list[bytes]]) -> list[list[bytes]]:
    """Tracebacks name the line that called the callback: compare all but that."""
    return [f[:5] if f[1] == ERROR else f for f in frames]


CASES = [
    (dispatch("ok"), (b"id:1", True)),
    (dispatch("ok", ack=True), (b"id:1", True)),
    (dispatch("mine"), (b"id:1", True)),
    (dispatch("boom", ack=True), (b"id:1", False)),
    (dispatch("missing", ack=True), (b"id:1", False)),
    (dispatch("boom"), (b"id:1", False)),
    (dispatch("bad"), (b"id:1", False)),
    (dispatch("missing"), (b"id:1", False)),
    (dispatch("ok", b"{not json"), (b"id:1", False)),
    (dispatch("boom", oneway=True), (b"id:1", False)),
    (dispatch("ok", oneway=True), (b"id:1", True)),
    ([SIGNATURE, DISPATCH, b"\xffgarbage", b""], (b"", False)),
]


@pytest.mark.parametrize(("frames", "outcome"), CASES)
def test_run_and_steps_answer_alike(frames: list[bytes], outcome: tuple[bytes, bool]) -> None:
    ex1, sent1 = make()
    ex2, sent2 = make()
    assert ex1.run(frames) == outcome
    assert by_steps(ex2, frames) == outcome
    assert scrub(sent1) == scrub(sent2)
    # The plain runner's read of a compact one-message DISPATCH (one SQM1s frame).
    ex3, sent3 = make()
    assert ex3.run_compact(COMPACT_SUBMIT + frames[2] + frames[3]) == outcome
    assert scrub(sent3) == scrub(sent1)


def test_what_the_sender_gets() -> None:
    ex, sent = make()
    ex.run(dispatch("ok"))  # no ACK unless asked for: the reply says it all
    assert sent == [[SIGNATURE, RESULT, b"id:1", b'{"echo":"hi"}']]
    sent.clear()
    ex.run(dispatch("ok", ack=True))
    assert sent == [[SIGNATURE, ACK, b"id:1"],
                    [SIGNATURE, RESULT, b"id:1", b'{"echo":"hi"}']]
    sent.clear()
    ex.run(dispatch("boom"))
    assert sent[0][:5] == [SIGNATURE, ERROR, b"id:1", b"KeyError", b"'nope'"]
    assert b"Traceback" in sent[0][5] and b"boom" in sent[0][5]


@pytest.mark.parametrize("way", ["run", "steps"])
def test_a_raising_callback_is_logged_at_debug_with_its_traceback(way: str, caplog) -> None:
    ex, _ = make()
    with caplog.at_level(logging.DEBUG, logger="sqm.worker"):
        (ex.run if way == "run" else lambda f: by_steps(ex, f))(dispatch("boom"))
    hits = [r for r in caplog.records if r.levelno == logging.DEBUG and "raised" in r.message]
    assert len(hits) == 1, caplog.text
    assert "Traceback" in hits[0].message and "KeyError: 'nope'" in hits[0].message
    assert "w-test" in hits[0].message and "boom" in hits[0].message
