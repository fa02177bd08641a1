"""An idle plain-runner worker wakes about once per half heartbeat, and a stop wakes it.

W4 (4 processes x 250 worker threads) lost live workers: each idle runner
woke every WAKE_S (0.1 s) to look at its stop flag, so every process kept
thousands of GIL acquisitions a second queued, its heartbeat threads among
them. An idle runner now waits in one poll for a message, a stop (which
writes to a wake-up socket) or its chores.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from sqm.protocol import BYE, HEARTBEAT, HELLO, SIGNATURE
from worker import Worker, plain

pytestmark = pytest.mark.timeout(60)


class IdleCount:
    """Counts the plain runner's timeouts: recv ones and idle-poll ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real_recv = plain.recv_message
        real_wait = plain.PlainRunner._idle_wait

        def recv(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
            try:
                return real_recv(sock, flags)
            except zmq.Again:
                self.n += 1
                raise

        def wait(runner: plain.PlainRunner, sock: zmq.Socket, seconds: float) -> bool:
            woke = real_wait(runner, sock, seconds)
            self.n += not woke
            return woke

        monkeypatch.setattr(plain, "recv_message", recv)
        monkeypatch.setattr(plain.PlainRunner, "_idle_wait", wait)


class FakeSqm:
    """A ROUTER answering a worker as sqm does: BYE to its rights check, a watch
    to its HELLO (so it needs no heartbeats); counts its heartbeat thread's beats."""

    def __init__(self, tmp_path: Path, heartbeat: float) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.endpoint = f"ipc://{tmp_path}/sqm.sock"
        self.sock.bind(self.endpoint)
        self.worker = Worker("q", endpoint=self.endpoint, callbacks={"m": lambda *_: None},
                             heartbeat=heartbeat)
        self.errors: list[BaseException] = []
        self.beats = 0
        self.hellos = 0
        self.left = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.errors.append(exc)

    def serve_until(self, done: Callable[[], bool], timeout: float = 30.0) -> None:
        """Answer the worker until ``done()``; fail after ``timeout``."""
        wid = self.worker.id.encode()
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; beats {self.beats} {self.errors}"
            assert self.thread.is_alive() or self.left, self.errors
            if not self.sock.poll(20):
                continue
            rid, *frames = self.sock.recv_multipart()
            cmd = frames[1] if len(frames) > 1 and frames[0] == SIGNATURE else b""
            if cmd == HELLO:
                self.hellos += 1
                self.sock.send_multipart([rid, SIGNATURE, HEARTBEAT, b"1000", b"60000"])
            elif cmd == BYE:  # acknowledged, as sqm does: its run() returns
                self.left = True
                self.sock.send_multipart([rid, SIGNATURE, BYE])
            elif cmd == HEARTBEAT and len(frames) == 2:  # the rights check before serving
                self.sock.send_multipart([rid, SIGNATURE, BYE])
            elif cmd == HEARTBEAT and frames[2] == wid:
                self.beats += 1

    def close(self) -> None:
        self.worker.terminate()
        try:
            self.serve_until(lambda: self.left or not self.thread.is_alive(), 10.0)
        finally:
            self.thread.join(10)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def sqm_for(tmp_path: Path) -> Iterator[Callable[[float], FakeSqm]]:
    made: list[FakeSqm] = []

    def make(heartbeat: float) -> FakeSqm:
        fake = FakeSqm(tmp_path, heartbeat)
        made.append(fake)
        fake.thread.start()
        return fake

    yield make
    for fake in made:
        fake.close()


def test_an_idle_worker_wakes_per_half_heartbeat_not_per_wake_s(
    monkeypatch: pytest.MonkeyPatch, sqm_for: Callable[[float], FakeSqm]
) -> None:
    idle = IdleCount(monkeypatch)
    fake = sqm_for(1.0)
    fake.serve_until(lambda: fake.beats >= 1)
    first = idle.n
    fake.serve_until(lambda: fake.beats >= 3)  # its own beats are the clock: ~2 intervals
    # a wake-up per half interval: ~4; every WAKE_S (0.1 s) it would be ~20
    assert idle.n - first <= 8, idle.n - first
    assert not fake.errors


def test_terminate_wakes_an_idle_worker_before_its_next_chores(
    monkeypatch: pytest.MonkeyPatch, sqm_for: Callable[[float], FakeSqm]
) -> None:
    idle = IdleCount(monkeypatch)
    fake = sqm_for(20.0)  # chores every 10 s: a stop seen only then would time out first
    fake.serve_until(lambda: fake.hellos >= 1 and idle.n >= 1)  # idle now, in its long wait
    before = idle.n
    fake.worker.terminate()
    fake.serve_until(lambda: fake.left)
    fake.thread.join(10)
    assert not fake.thread.is_alive()
    assert idle.n == before, "the runner timed out instead of being woken"
    assert not fake.errors
