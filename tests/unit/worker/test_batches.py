"""Both runners read multi-message DISPATCHes and hold DONEs back while more work is there.

A fake sqm (a ROUTER the test drives) sends the DISPATCHes and records what
the worker answers, in order: HELLO says ``batch``; the DONEs of a batch go
as multi-id DONEs (half the slots each at most) to a broker that sent a
multi-message DISPATCH, one per id to one that never did (an older sqm),
and at once for a prefetch-1 worker; a worker stopped mid-batch says BYE
before any of the DONEs it held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from sqm.protocol import (
    BATCHES,
    BYE,
    DISPATCH,
    DONE,
    DONE_FAILED,
    HEARTBEAT,
    HELLO,
    SIGNATURE,
    decode_json,
    encode_envelope,
)
from worker import Worker, aio, plain

pytestmark = pytest.mark.timeout(60)


class FakeSqm:
    """A ROUTER answering one worker as sqm does; keeps every command it receives."""

    def __init__(self, tmp_path: Path, use_async: bool = False, **worker_args: Any) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.endpoint = f"ipc://{tmp_path}/sqm.sock"
        self.sock.bind(self.endpoint)
        self.ran: list[bytes] = []
        self.worker = Worker("q", endpoint=self.endpoint, heartbeat=5.0,
                             callbacks={"work": self._awork if use_async else self._work},
                             **worker_args)
        self.on_work: Callable[[bytes], None] = lambda _p: None
        self.errors: list[BaseException] = []
        self.log: list[list[bytes]] = []  # [cmd, frames...] of everything but heartbeats
        self.hello: dict[str, Any] = {}
        self.rid = b""
        self.left = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _work(self, _worker: Any, orig: Any, payload: Any) -> None:
        self.ran.append(orig.id)
        self.on_work(orig.id)

    async def _awork(self, worker: Any, orig: Any, payload: Any) -> None:
        self._work(worker, orig, payload)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.errors.append(exc)

    def serve_until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; {self.log} {self.errors}"
            assert self.thread.is_alive() or self.left, self.errors
            if not self.sock.poll(20):
                continue
            rid, *frames = self.sock.recv_multipart()
            cmd = frames[1] if len(frames) > 1 and frames[0] == SIGNATURE else b""
            if cmd == HEARTBEAT and len(frames) == 2:  # the rights check before serving
                self.sock.send_multipart([rid, SIGNATURE, BYE])
                continue
            if cmd == HEARTBEAT:
                continue
            self.log.append(frames[1:])
            if cmd == HELLO:
                self.rid = rid
                self.hello = decode_json(frames[2])
                self.sock.send_multipart([rid, SIGNATURE, HEARTBEAT, b"5000", b"60000"])
            elif cmd == BYE:
                self.left = True
                self.sock.send_multipart([rid, SIGNATURE, BYE])

    def say_batches(self) -> None:
        """What sqm answers a HELLO with ``batch``: it reads multi-id DONEs."""
        self.sock.send_multipart([self.rid, SIGNATURE, BATCHES])

    def dispatch(self, ids: list[bytes], *, batch: bool) -> None:
        """The messages ``ids`` (oneway: no mailbox), in one DISPATCH or one each."""
        bodies = [(encode_envelope(i, b"", b"work", b"json", oneway=True), b"{}") for i in ids]
        if batch:
            self.sock.send_multipart([self.rid, SIGNATURE, DISPATCH,
                                      *[f for body in bodies for f in body]])
        else:
            for env, payload in bodies:
                self.sock.send_multipart([self.rid, SIGNATURE, DISPATCH, env, payload])

    def dones(self) -> list[list[bytes]]:
        return [e for e in self.log if e[0] in (DONE, DONE_FAILED)]

    def done_ids(self) -> list[bytes]:
        return [i for e in self.dones() for i in e[1:]]

    def close(self) -> None:
        self.worker.terminate()
        try:
            self.serve_until(lambda: self.left or not self.thread.is_alive(), 10.0)
        finally:
            self.thread.join(10)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def sqm_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeSqm]]:
    # No age limit on held DONEs: what goes together is then the same on a slow machine.
    monkeypatch.setattr(plain, "DONE_HOLD_S", 3600.0)
    monkeypatch.setattr(aio, "DONE_HOLD_S", 3600.0)
    made: list[FakeSqm] = []

    def make(**worker_args: Any) -> FakeSqm:
        fake = FakeSqm(tmp_path, **worker_args)
        made.append(fake)
        fake.serve_until(lambda: bool(fake.hello))
        return fake

    yield make
    for fake in made:
        fake.close()


IDS = [b"m%d" % i for i in range(8)]


def test_plain_runner_batches_its_dones(sqm_for: Callable[..., FakeSqm]) -> None:
    """Prefetch 8: a DISPATCH of 8 runs in order; its DONEs go 4 ids at a time."""
    fake = sqm_for(prefetch=8)
    assert fake.hello["batch"] is True
    fake.dispatch(IDS, batch=True)
    fake.serve_until(lambda: len(fake.done_ids()) == 8)
    assert fake.ran == IDS
    # In order, 4 at most (half its slots) and together: m1..m7 came while m0 ran
    # (m0's own DONE may go alone if they had not reached its socket when it ended).
    dones = fake.dones()
    assert [i for d in dones for i in d[1:]] == IDS and {d[0] for d in dones} == {DONE}
    sizes = [len(d) - 1 for d in dones]
    assert max(sizes) == 4 and len(dones) <= 3, dones


def test_plain_runner_sends_single_dones_to_an_older_sqm(sqm_for: Callable[..., FakeSqm]) -> None:
    """A broker that never sent a multi-message DISPATCH gets one DONE per id."""
    fake = sqm_for(prefetch=8)
    fake.dispatch(IDS, batch=False)
    fake.serve_until(lambda: len(fake.done_ids()) == 8)
    assert sorted(fake.ran) == sorted(IDS)
    assert all(len(d) == 2 for d in fake.dones()), fake.dones()


def test_prefetch_one_reports_each_done_at_once(sqm_for: Callable[..., FakeSqm]) -> None:
    """One slot: DONE before the next message is even read (as before batching)."""
    fake = sqm_for(prefetch=1)
    fake.dispatch(IDS[:1], batch=False)
    fake.serve_until(lambda: len(fake.done_ids()) == 1)
    fake.dispatch(IDS[1:2], batch=False)
    fake.serve_until(lambda: len(fake.done_ids()) == 2)
    assert fake.dones() == [[DONE, IDS[0]], [DONE, IDS[1]]]


def test_plain_runner_stopped_mid_batch_says_bye_first(sqm_for: Callable[..., FakeSqm]) -> None:
    """Stopped by its second message: BYE before every DONE, then all 8 run and end once."""
    fake = sqm_for(prefetch=8)
    fake.on_work = lambda mid: fake.worker.terminate() if mid == IDS[1] else None
    fake.dispatch(IDS, batch=True)
    fake.serve_until(lambda: len(fake.done_ids()) == 8 and fake.left)
    assert fake.ran == IDS
    cmds = [e[0] for e in fake.log[1:]]  # after the HELLO
    assert cmds[0] == BYE, fake.log
    assert sorted(fake.done_ids()) == sorted(IDS)


@pytest.mark.parametrize("args", [{"concurrency": 2}, {"concurrency": 1, "use_async": True}])
def test_asyncio_runner_batches_its_dones(sqm_for: Callable[..., FakeSqm],
                                          args: dict[str, Any]) -> None:
    """The asyncio runner (threads, or async callbacks): a DISPATCH of 8 all run; DONEs
    are held while others wait a turn, half the slots at most."""
    fake = sqm_for(prefetch=8, **args)
    fake.dispatch(IDS, batch=True)
    fake.serve_until(lambda: len(fake.done_ids()) == 8)
    assert sorted(fake.ran) == sorted(IDS)
    assert sorted(fake.done_ids()) == sorted(IDS)
    sizes = [len(d) - 1 for d in fake.dones()]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 4, sizes


def test_asyncio_runner_sends_single_dones_to_an_older_sqm(
        sqm_for: Callable[..., FakeSqm]) -> None:
    fake = sqm_for(prefetch=8, concurrency=2)
    fake.dispatch(IDS, batch=False)
    fake.serve_until(lambda: len(fake.done_ids()) == 8)
    assert all(len(d) == 2 for d in fake.dones()), fake.dones()


def test_a_broker_that_says_it_batches_gets_multi_id_dones(
        sqm_for: Callable[..., FakeSqm]) -> None:
    """BATCHES (sqm's answer to HELLO): DONEs of single DISPATCHes go together too."""
    fake = sqm_for(prefetch=8)
    sent = threading.Event()
    fake.on_work = lambda mid: sent.wait(10) if mid == IDS[0] else None
    fake.say_batches()
    fake.dispatch(IDS, batch=False)  # while the first runs, the other 7 wait in its socket
    sent.set()
    fake.serve_until(lambda: len(fake.done_ids()) == 8)
    assert fake.ran == IDS
    # In order, 4 at most (half its slots) and together: m1..m7 came while m0 ran
    # (m0's own DONE may go alone if they had not reached its socket when it ended).
    dones = fake.dones()
    assert [i for d in dones for i in d[1:]] == IDS and {d[0] for d in dones} == {DONE}
    sizes = [len(d) - 1 for d in dones]
    assert max(sizes) == 4 and len(dones) <= 3, dones
