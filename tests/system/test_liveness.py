"""Heartbeats that cost less: sqm watches worker connections (sqm/liveness.py).

Real ``sqm serve`` and ``sqm worker`` processes over ipc (the cluster's
default endpoint): sqm hears of a killed worker from its connection
closing, not from missing heartbeats; an idle watched worker reports every
30 heartbeats, a busy one every heartbeat; a stuck busy worker is still
dropped after three silent heartbeats. Older peers keep the old exchange:
a worker that does not ask to be watched is heartbeated by sqm, and a
worker reports every heartbeat to a broker that heartbeats it. The pulled
cable cases are in test_failover.py (hosts as network namespaces).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

import sender
from sender import Sender
from sqm.protocol import BYE, HEARTBEAT, HELLO, SIGNATURE
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(90)


def starts(log: Path) -> list[dict[str, Any]]:
    try:
        return [e for e in read_log(log) if e["kind"] == "start"]
    except ValueError:  # a line being written right now
        return []


def worker_row(cluster, pid: int | None = None) -> dict[str, Any] | None:
    rows = cluster.status("q")["workers"]
    for row in rows:
        if pid is None or row["pid"] == pid:
            return row
    return None


def report_times(cluster, seconds: float) -> list[float]:
    """The distinct ``last_report_at`` sqm shows for the one worker over ``seconds``."""
    seen: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        row = worker_row(cluster)
        at = row and row["last_report_at"]
        if at and (not seen or at != seen[-1]):
            seen.append(at)
        threading.Event().wait(0.02)  # a sampling interval, not a synchronisation
    return seen


def test_a_killed_busy_worker_is_lost_within_a_heartbeat_not_three(cluster) -> None:
    """Heartbeat 1 s: silence would take 2-3 s to notice; the closed connection takes ~0."""
    cluster.serve("q", heartbeat=1.0)
    w = cluster.worker("q", heartbeat=1.0)
    assert worker_row(cluster)["watched"] is True
    killed: dict[str, float] = {}

    def kill_when_started() -> None:
        wait_for(lambda: starts(cluster.log), 15, "the callback started")
        os.kill(w.pid, signal.SIGKILL)
        killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    with Sender("q") as s:
        with pytest.raises(sender.WorkerLost) as info:
            s.rpc("sleep", {"s": 30}, timeout=15)
        lost_at = time.monotonic()
    killer.join(5)
    assert "connection closed" in str(info.value)
    assert lost_at - killed["at"] < 1.0, f"WorkerLost {lost_at - killed['at']:.2f} s after the kill"
    assert cluster.status("q")["workers_current"] == 0


def test_an_idle_watched_worker_reports_every_30_heartbeats_a_busy_one_every_heartbeat(
        cluster) -> None:
    cluster.serve("q", heartbeat=0.2)
    cluster.worker("q", heartbeat=0.2)
    # Until sqm's answer to HELLO arrives, the worker reports every beat (0.2 s); then the
    # first idle report falls anywhere in the interval (spread), the next ones every 6 s
    # (30 x 0.2 s). Heartbeated, it would have reported ~70 times.
    idle = report_times(cluster, 14.0)
    gaps = [b - a for a, b in zip(idle, idle[1:], strict=False)]
    slow = [i for i, g in enumerate(gaps) if g > 1.0]
    assert len(idle) <= 7 and slow, f"idle reports {gaps}"
    assert all(g > 5.0 for g in gaps[slow[0] + 1:]), f"idle reports {gaps}"
    with Sender("q") as s:
        mid = s.submit("sleep", {"s": 2.0})
        wait_for(lambda: starts(cluster.log), 10, "the callback started")
        busy = report_times(cluster, 1.6)
        assert s.receive(id=mid, timeout=10)["slept"] == 2.0
    busy = busy[1:]  # the first one seen may be from before the callback started
    gaps = [b - a for a, b in zip(busy, busy[1:], strict=False)]
    assert len(gaps) >= 4 and max(gaps) < 0.6, f"busy reports {gaps}"  # every 0.2 s


def test_a_stopped_busy_worker_is_dropped_after_three_silent_heartbeats(cluster) -> None:
    """Its connection stays up (the kernel answers for it), but a busy worker
    reports every heartbeat: three missed ones and its message goes elsewhere."""
    cluster.serve("q", heartbeat=0.2)
    procs = {p.pid: p for p in (cluster.worker("q", heartbeat=0.2),
                                cluster.worker("q", heartbeat=0.2))}
    with Sender("q") as s:
        mid = s.submit("sleep", {"s": 3.0}, retries=1, timeout=30)
        first = wait_for(lambda: starts(cluster.log), 10, "the callback started")[0]["pid"]
        procs[first].signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            again = wait_for(lambda: (lambda got: got if len(got) >= 2 else None)(
                starts(cluster.log)), 10, "the retry started")
            retried = time.monotonic() - stopped
            assert again[1]["pid"] != first
            assert s.receive(id=mid, timeout=15)["pid"] != first
        finally:
            procs[first].signal(signal.SIGCONT)
    assert 0.4 <= retried <= 3.0, f"retried {retried:.2f} s after the worker stopped"


def test_a_stopped_idle_worker_is_dropped_after_three_report_intervals(cluster) -> None:
    """An idle worker holds nothing: it is judged by its reports (every 6 s here)."""
    cluster.serve("q", heartbeat=0.2)
    w = cluster.worker("q", heartbeat=0.2)
    w.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        threading.Event().wait(1.5)  # longer than 3 heartbeats: the old rule's limit
        assert cluster.status("q")["workers_current"] == 1
        wait_for(lambda: cluster.status("q")["workers_current"] == 0, 25, "the worker dropped")
        dropped = time.monotonic() - stopped
    finally:
        w.signal(signal.SIGCONT)
    # 3 report intervals (18 s) after its last report, sent at most 6 s before it stopped
    assert 11.5 <= dropped <= 20.0, f"dropped {dropped:.2f} s after it stopped"


def raw_worker(ctx: zmq.Context, endpoint: str, rid: bytes, *, watch: bool) -> zmq.Socket:
    """A worker speaking the protocol by hand: HELLO, asking to be watched or not."""
    sock = ctx.socket(zmq.DEALER)
    sock.routing_id = rid
    sock.linger = 0
    sock.connect(endpoint)
    info = {"id": rid.decode(), "slots": 1, "heartbeat": 0.2, "methods": ["x"]}
    if watch:
        info["watch"] = True
    sock.send_multipart([SIGNATURE, HELLO, json.dumps(info).encode()])
    return sock


def listen(old: zmq.Socket, new: zmq.Socket, seconds: float) -> tuple[list, list]:
    """What each receives in ``seconds``; ``old`` heartbeats every 0.2 s meanwhile (a
    worker judged by its heartbeats must), ``new`` says nothing."""
    got: dict[zmq.Socket, list[list[bytes]]] = {old: [], new: []}
    poller = zmq.Poller()
    for sock in got:
        poller.register(sock, zmq.POLLIN)
    now = time.monotonic()
    deadline, next_beat = now + seconds, now
    while (now := time.monotonic()) < deadline:
        if now >= next_beat:
            old.send_multipart([SIGNATURE, HEARTBEAT])
            next_beat = now + 0.2
        for sock, _ in poller.poll(max(1, int((min(deadline, next_beat) - now) * 1000))):
            got[sock].append(sock.recv_multipart())
    return got[old], got[new]


def test_sqm_heartbeats_a_worker_that_does_not_ask_to_be_watched_and_not_one_that_does(
        cluster) -> None:
    cluster.serve("q", heartbeat=0.2)
    endpoint = cluster.status("q")["endpoint"]
    ctx = zmq.Context()
    try:
        old = raw_worker(ctx, endpoint, b"Wold", watch=False)
        new = raw_worker(ctx, endpoint, b"Wnew", watch=True)
        got_old, got_new = listen(old, new, 1.5)
        assert len(got_old) >= 5 and all(f == [SIGNATURE, HEARTBEAT, b"200"] for f in got_old)
        # watched: told once (report every 6 s), then no heartbeat for 7 of its intervals
        assert got_new == [[SIGNATURE, HEARTBEAT, b"200", b"6000"]]
        rows = {r["id"]: r for r in cluster.status("q")["workers"]}
        assert rows["Wold"]["watched"] is False and rows["Wnew"]["watched"] is True
        new.close(0)  # nothing said: the closed connection is enough

        def only_old() -> bool:
            old.send_multipart([SIGNATURE, HEARTBEAT])  # the old one keeps beating meanwhile
            return {r["id"] for r in cluster.status("q")["workers"]} == {"Wold"}

        wait_for(only_old, 5, "the closed one dropped")
        old.close(0)
    finally:
        ctx.destroy(0)


class FakeBroker:
    """A ROUTER that answers HELLO as an older sqm (heartbeats) or a newer one (watches)."""

    def __init__(self, endpoint: str, *, watches: bool) -> None:
        self.endpoint = endpoint
        self.watches = watches
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(endpoint)
        self.workers: set[bytes] = set()
        self.named_beats: list[float] = []  # when each self-report arrived
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        next_beat = time.monotonic()
        while not self.stop.is_set():
            if self.sock.poll(20):
                rid, *frames = self.sock.recv_multipart()
                if frames[:2] == [SIGNATURE, HELLO]:
                    self.workers.add(rid)
                    if self.watches:
                        self.sock.send_multipart([rid, SIGNATURE, HEARTBEAT, b"200", b"5000"])
                elif frames[:2] == [SIGNATURE, HEARTBEAT] and len(frames) == 4:
                    self.named_beats.append(time.monotonic())
                elif frames[:2] == [SIGNATURE, HEARTBEAT] and len(frames) == 2:
                    self.sock.send_multipart([rid, SIGNATURE, BYE])  # the rights check
            if not self.watches and time.monotonic() >= next_beat:
                next_beat += 0.2
                for rid in self.workers:
                    self.sock.send_multipart([rid, SIGNATURE, HEARTBEAT, b"200"])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.parametrize("watches", [False, True], ids=["older-sqm", "watching-sqm"])
def test_a_worker_reports_every_heartbeat_unless_its_broker_watches_it(cluster, rundir,
                                                                        watches: bool) -> None:
    fake = FakeBroker(f"ipc://{rundir}/fake.sock", watches=watches)
    try:
        w = cluster.worker("q", endpoint=fake.endpoint, heartbeat=0.2, wait=False)
        wait_for(lambda: fake.workers, 15, "the worker's HELLO")
        wait_for(lambda: fake.named_beats, 5, "its first report")
        since = len(fake.named_beats)
        threading.Event().wait(2.0)  # a counting window, not a synchronisation
        reports = len(fake.named_beats) - since
        assert w.popen.poll() is None, w.stderr
    finally:
        fake.close()
    if watches:
        assert reports <= 1, reports  # idle, watched: every 5 s at most
    else:
        assert 7 <= reports <= 12, reports  # every 0.2 s, as ever
    assert "silent" not in w.stderr  # neither broker looked dead to it
