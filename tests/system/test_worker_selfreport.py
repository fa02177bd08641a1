"""Workers report on themselves in heartbeats, and stop when sqm says STOP.

Most tests here put a fake broker (a raw ROUTER in a thread) in front of
real ``sqm worker`` processes, so they see exactly the frames a worker
sends and can send it exactly the frames they want.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from sender import Sender
from sqm.config import resolve
from sqm.protocol import (
    BYE,
    DISPATCH,
    DONE,
    HEARTBEAT,
    HELLO,
    RESULT,
    SIGNATURE,
    STOP,
    encode_envelope,
)
from tests.conftest import Proc, wait_for

pytestmark = pytest.mark.timeout(90)

APPS = "tests.apps.aio:callbacks"


class FakeBroker:
    """A ROUTER standing in for sqm: records what workers send, sends what a test asks.

    It heartbeats every worker that said HELLO (so none reconnects) and
    acknowledges BYE with BYE, like sqm.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.router_handover = 1
        self.sock.bind(endpoint)
        self.lock = threading.Lock()
        self.log: list[tuple[bytes, list[bytes]]] = []  # (routing id, frames), in arrival order
        self.hellos: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        self._out: queue.Queue[list[bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            if self.sock.poll(20):
                while True:
                    try:
                        rid, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on(rid, frames)
            while not self._out.empty():
                self._send(self._out.get())
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + 0.1
                for info in self.workers():
                    self._send([self.rid(info["id"]), SIGNATURE, HEARTBEAT, b"200"])
        self.sock.close(0)
        self.ctx.term()

    def _on(self, rid: bytes, frames: list[bytes]) -> None:
        with self.lock:
            self.log.append((rid, frames))
            if frames[1] == HELLO:
                self.hellos.append(json.loads(frames[2]))
            elif frames[1] == HEARTBEAT and len(frames) == 4:
                self.reports.append(json.loads(frames[3]))
        if frames[1] == BYE or frames[1:] == [HEARTBEAT]:
            # BYE to a bare heartbeat too, as sqm answers an unknown peer's: the worker's
            # rights check before serving sends one and waits for an answer
            self._send([rid, SIGNATURE, BYE])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    @staticmethod
    def rid(wid: str) -> bytes:
        return b"W" + wid.encode()

    def workers(self) -> list[dict[str, Any]]:
        """The latest HELLO of each worker id."""
        with self.lock:
            return list({h["id"]: h for h in self.hellos}.values())

    def send(self, wid: str, frames: list[bytes]) -> None:
        self._out.put([self.rid(wid), *frames])

    def dispatch(self, wid: str, mid: str, method: str, payload: Any, mailbox: str) -> None:
        env = encode_envelope(mid.encode(), mailbox.encode(), method.encode(), b"json")
        self.send(wid, [SIGNATURE, DISPATCH, env, json.dumps(payload).encode()])

    def commands_from(self, wid: str) -> list[list[bytes]]:
        """Frames that came on the worker's main socket (not its heartbeat socket)."""
        with self.lock:
            return [f for r, f in self.log if r == self.rid(wid)]

    def reports_from(self, pid: int) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.reports if r["pid"] == pid]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def fake(rundir: Path):
    broker = FakeBroker(f"ipc://{rundir}/fake.sock")
    yield broker
    broker.close()


class Mailbox:
    """A Sender's mailbox as raw frames."""

    def __init__(self, rundir: Path) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.DEALER)  # a mailbox: workers reach it from a ROUTER
        self.addr = f"ipc://{rundir}/mbox.sock"
        self.pull.bind(self.addr)

    def until(self, kind: bytes, mid: str, timeout_s: float = 10.0) -> list[bytes]:
        """Skip ahead to the next ``kind`` frame for message ``mid``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.pull.poll(int(left * 1000) + 1):
                raise AssertionError(f"no {kind!r} for {mid} within {timeout_s} s")
            frames = self.pull.recv_multipart()
            if frames[1] == kind and frames[2] == mid.encode():
                return frames

    def close(self) -> None:
        self.pull.close(0)
        self.ctx.term()


@pytest.fixture
def mailbox(rundir: Path):
    box = Mailbox(rundir)
    yield box
    box.close()


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def start_worker(cluster, endpoint: str, *args: str, nice: int = 0, name: str = "worker") -> Proc:
    argv = [sys.executable, "-m", "sqm", "worker", APPS, "--queue", "q",
            "--endpoint", endpoint, "--heartbeat", "0.2", *args]
    if nice:
        argv = ["nice", "-n", str(nice), *argv]
    proc = Proc(argv, cluster.env, cluster.rundir, name)
    cluster.procs.append(proc)
    return proc


def proc_nice(pid: int) -> int:
    """The nice value of ``pid`` as the kernel has it (/proc/PID/stat, field 19)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def hello_of(fake: FakeBroker, pid: int, proc: Proc | None = None) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited early:\n{proc.stderr}")
        return next((h for h in fake.workers() if h["pid"] == pid), None)

    return wait_for(found, 15, f"HELLO from pid {pid}")


# ---------------------------------------------------------------- self-reports


def test_heartbeats_carry_a_self_report(cluster, fake, mailbox):
    expected_nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
    w = start_worker(cluster, fake.endpoint, nice=5)
    wid = hello_of(fake, w.pid, w)["id"]
    first = wait_for(lambda: fake.reports_from(w.pid), 10, "a self-report")[0]
    assert set(first) >= {"host", "pid", "rss_bytes", "nice", "started_at", "tasks_done",
                          "busy_s"}
    assert first["nice"] == expected_nice == proc_nice(w.pid)
    assert 1 << 20 < first["rss_bytes"] and 0.5 < first["rss_bytes"] / proc_rss(w.pid) < 2
    assert first["tasks_done"] == 0 and first["busy_s"] == 0

    fake.dispatch(wid, "t:1", "block", {"s": 0.5}, mailbox.addr)
    mailbox.until(RESULT, "t:1")
    done = wait_for(lambda: [r for r in fake.reports_from(w.pid) if r["tasks_done"] == 1], 5,
                    "a report after the first task")[0]
    assert 0.45 <= done["busy_s"] < 3

    # busy_s counts the task in hand too, before it is done
    fake.dispatch(wid, "t:2", "block", {"s": 1.5}, mailbox.addr)
    during = wait_for(
        lambda: [r for r in fake.reports_from(w.pid)
                 if r["tasks_done"] == 1 and r["busy_s"] > done["busy_s"] + 0.4], 5,
        "a report with the running task's time")[0]
    assert during["busy_s"] < done["busy_s"] + 1.5
    mailbox.until(RESULT, "t:2")
    # the worker's heartbeats name it (the bare one of its rights check before serving does not)
    beats = [f for _, f in fake.log if f[1] == HEARTBEAT and f[2:3] == [wid.encode()]]
    assert beats and all(len(f) == 4 for f in beats)  # every heartbeat carries a report


def test_sqm_status_shows_the_self_report(cluster):
    cluster.serve("q")
    expected_nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
    w = start_worker(cluster, resolve("q").endpoint, nice=5)
    cluster.wait_workers("q", 1, proc=w)
    st = wait_for(lambda: (x := cluster.status("q"))["workers"][0].get("rss_bytes") and x, 10,
                  "a self-report in sqm status")
    before = st["workers"][0]
    assert before["pid"] == w.pid and before["rss_bytes"] > 1 << 20
    assert before["nice"] == expected_nice
    with Sender("q", timeout=10) as s:
        assert s.rpc("block", {"s": 0.5})["pid"] == w.pid
    wait_for(lambda: cluster.status("q")["workers"][0]["busy_s"] >= before["busy_s"] + 0.45,
             5, "busy_s to grow by the task's 0.5 s")


# ---------------------------------------------------------------- STOP


@pytest.mark.parametrize("args", [(), ("--concurrency", "2")], ids=["plain", "asyncio"])
def test_stop_finishes_the_message_in_hand_says_bye_and_exits_0(cluster, fake, mailbox, args):
    w = start_worker(cluster, fake.endpoint, *args)
    wid = hello_of(fake, w.pid, w)["id"]
    fake.dispatch(wid, "t:1", "block", {"s": 0.5}, mailbox.addr)
    mailbox.until(b"A", "t:1")  # started
    fake.send(wid, [SIGNATURE, STOP])
    assert json.loads(mailbox.until(RESULT, "t:1")[3])["slept"] == 0.5
    assert w.wait(10) == 0
    cmds = [f[1] for f in fake.commands_from(wid) if f[1] != HEARTBEAT]
    assert cmds.count(HELLO) == 1  # it did not register again
    assert DONE in cmds and cmds[-1] in (BYE, DONE) and BYE in cmds
    assert "asked it to stop" in w.stderr


def test_pool_does_not_respawn_a_stopped_child_and_exits_0_when_all_stopped(cluster, fake):
    pool = cluster.sqm("worker", APPS, "--queue", "q", "--endpoint", fake.endpoint,
                       "--heartbeat", "0.2", "--processes", "2", name="pool")
    first, second = wait_for(lambda: len(h := fake.workers()) == 2 and h, 20, "two children")
    fake.send(first["id"], [SIGNATURE, STOP])
    wait_for(lambda: gone(first["pid"]), 10, "the stopped child to exit")
    fake.send(second["id"], [SIGNATURE, STOP])
    assert pool.wait(15) == 0  # a respawned child would keep the pool running
    assert len(fake.workers()) == 2, fake.workers()
    assert "exited on request" in pool.stderr


def test_pool_respawns_a_crashed_child(cluster, fake):
    pool = cluster.sqm("worker", APPS, "--queue", "q", "--endpoint", fake.endpoint,
                       "--heartbeat", "0.2", "--processes", "2", name="pool")
    first, second = wait_for(lambda: len(h := fake.workers()) == 2 and h, 20, "two children")
    os.kill(first["pid"], signal.SIGKILL)
    third = wait_for(lambda: [h for h in fake.workers() if h["pid"] not in
                              (first["pid"], second["pid"])], 20, "a replacement child")[0]
    for child in (second, third):
        fake.send(child["id"], [SIGNATURE, STOP])
    assert pool.wait(15) == 0
