"""worker.progress(): PROGRESS frames straight to the originator's mailbox, in order.

Checked at the frame level with a raw DEALER (to submit) and a raw PULL
mailbox, so the test sees exactly what the worker sends, whatever the
Sender makes of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq

from sender import Sender
from sqm.config import resolve
from sqm.protocol import (
    ACK,
    FLAG_ACK,
    PROGRESS,
    RESULT,
    SIGNATURE,
    SUBMIT,
    encode_envelope,
)
from worker import Originator, Worker

pytestmark = pytest.mark.timeout(60)

APPS = "tests.apps.aio:callbacks"
RUNNERS = {"plain": (), "asyncio": ("--concurrency", "2")}


class RawClient:
    """Submits like a Sender would and reads its mailbox frame by frame."""

    def __init__(self, rundir: Path, queue: str = "q") -> None:
        self.ctx = zmq.Context()
        self.mailbox = f"ipc://{rundir}/mbox-raw.sock"
        self.pull = self.ctx.socket(zmq.DEALER)  # a mailbox: workers reach it from a ROUTER
        self.pull.bind(self.mailbox)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.connect(resolve(queue).endpoint)

    def submit(self, mid: str, method: str, payload: object, *, oneway: bool = False,
               ack: bool = True) -> None:
        env = encode_envelope(mid.encode(), self.mailbox.encode(), method.encode(), b"json",
                              oneway=oneway)
        if ack and not oneway:  # FLAG_ACK: the worker acknowledges the start at once
            env = bytes((env[0] | FLAG_ACK,)) + env[1:]
        self.dealer.send_multipart([SIGNATURE, SUBMIT, env, json.dumps(payload).encode()])

    def next(self, timeout_s: float = 10.0) -> list[bytes]:
        if not self.pull.poll(int(timeout_s * 1000)):
            raise AssertionError(f"nothing reached the mailbox in {timeout_s} s")
        return self.pull.recv_multipart()

    def until_result(self, mid: str) -> list[list[bytes]]:
        """Every frame list up to and including the RESULT for ``mid``."""
        got = []
        while True:
            frames = self.next()
            got.append(frames)
            if frames[1] == RESULT and frames[2] == mid.encode():
                return got

    def close(self) -> None:
        self.pull.close(0)
        self.dealer.close(0)
        self.ctx.term()


@pytest.fixture
def raw(rundir):
    client = RawClient(rundir)
    yield client
    client.close()


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("method", ["steps", "sync_steps"])
def test_progress_frames_arrive_in_order_before_the_result(cluster, raw, runner, method):
    cluster.serve("q")
    cluster.worker("q", *RUNNERS[runner], target=APPS)
    raw.submit("t:1", method, {"n": 3})
    got = raw.until_result("t:1")
    assert [f[:3] for f in got] == [
        [SIGNATURE, ACK, b"t:1"],
        [SIGNATURE, PROGRESS, b"t:1"],
        [SIGNATURE, PROGRESS, b"t:1"],
        [SIGNATURE, PROGRESS, b"t:1"],
        [SIGNATURE, RESULT, b"t:1"],
    ]
    # exactly 5 frames each: done and total as ASCII decimal
    assert [f[3:] for f in got if f[1] == PROGRESS] == [[b"1", b"3"], [b"2", b"3"], [b"3", b"3"]]
    assert json.loads(got[-1][3])["steps"] == 3


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_oneway_messages_send_no_progress(cluster, raw, runner):
    cluster.serve("q")
    cluster.worker("q", *RUNNERS[runner], target=APPS)
    raw.submit("t:1", "steps", {"n": 4}, oneway=True)  # dispatched (and started) first
    raw.submit("t:2", "steps", {"n": 2})
    got = raw.until_result("t:2")
    assert {f[2] for f in got} == {b"t:2"}, got  # nothing at all for the oneway message
    assert [f[1] for f in got] == [ACK, PROGRESS, PROGRESS, RESULT]
    assert cluster.status("q")["assigned_total"] == 2


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_sender_gets_progress_as_on_status_calls_in_order(cluster, runner):
    cluster.serve("q")
    cluster.worker("q", *RUNNERS[runner], target=APPS)
    seen: dict[str, list[tuple[int, int]]] = {"steps": [], "sync_steps": []}
    with Sender("q", timeout=20) as s:
        mids = [s.submit(method, {"n": 4}, on_status=lambda d, t, m=method: seen[m].append((d, t)))
                for method in seen]
        assert [s.receive(id=m)["steps"] for m in mids] == [4, 4]
    assert seen == {m: [(1, 4), (2, 4), (3, 4), (4, 4)] for m in seen}  # each in order


def test_progress_checks_its_figures(rundir):
    w = Worker("q", callbacks={"f": lambda *a: None})
    orig = Originator(b"t:1", f"ipc://{rundir}/m.sock".encode(), b"json", True, "f")
    w.progress(orig, 1, 2)  # oneway: a no-op, even with the worker not running
    with pytest.raises(TypeError):
        w.progress(orig, 0.5, 1)
    with pytest.raises(ValueError):
        w.progress(orig, -1, 3)
