"""Heartbeats that cost less: sqm watches worker connections (sqm/liveness.py).

Real ``sqm serve`` and ``sqm worker`` processes over ipc (the cluster's
default endpoint), and over tcp through a proxy that can cut connections.
SPEC: every worker beats every interval; sqm drops one silent for 3, idle
or busy (SIGSTOP, SIGKILL). A closed connection only detaches a worker (no
new work): a live worker that reconnects runs nothing twice. An idle
watched worker attaches its self-report every 30 beats, a busy one every
beat; sqm sends watched workers no heartbeats. Older peers keep the old
exchange: a worker that does not ask to be watched is heartbeated by sqm,
and a worker reports every heartbeat to a broker that heartbeats it. The
pulled cable cases are in test_failover.py (hosts as network namespaces).
"""

from __future__ import annotations

import json
import signal
import socket
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


def kill_when_started(cluster, procs: dict[int, Any], sig: int = signal.SIGKILL) -> dict:
    """In a thread: signal the worker whose callback starts first; note pid and when."""
    out: dict[str, Any] = {}

    def run() -> None:
        first = wait_for(lambda: starts(cluster.log), 15, "the callback started")[0]["pid"]
        procs[first].signal(sig)
        out.update(pid=first, at=time.monotonic())

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


@pytest.mark.parametrize("retries", [0, 1])
def test_a_killed_busy_worker_is_retried_or_lost_within_three_intervals(cluster,
                                                                          retries: int) -> None:
    """Its connection closes at once (no new work), but only its silence (3 intervals)
    says it is dead: then its message runs elsewhere (retries=1) or fails (retries=0)."""
    cluster.serve("q", heartbeat=0.5)
    procs = {p.pid: p for p in [cluster.worker("q", heartbeat=0.5) for _ in range(1 + retries)]}
    assert all(r["watched"] for r in cluster.status("q")["workers"])
    killed = kill_when_started(cluster, procs)
    with Sender("q") as s:
        if retries:
            reply = s.rpc("sleep", {"s": 1.0}, retries=1, timeout=15)
            done_at = time.monotonic()
            killed["thread"].join(5)
            assert reply["pid"] != killed["pid"]
            assert [e["pid"] for e in starts(cluster.log)] == [killed["pid"], reply["pid"]]
        else:
            with pytest.raises(sender.WorkerLost) as info:
                s.rpc("sleep", {"s": 30}, timeout=15)
            done_at = time.monotonic()
            killed["thread"].join(5)
            assert "stopped heartbeating" in str(info.value)
    took = done_at - killed["at"]
    # silent 3 x 0.5 s after its last beat (<= 0.55 s before the kill), a tick (0.125 s) late
    # at most, plus the retry's 1 s run; a loaded 2-core VM adds some
    assert took < (1.0 if retries else 0.0) + 2.5, f"{took:.2f} s after the kill"
    assert cluster.status("q")["workers_current"] == retries


def test_a_stopped_idle_worker_is_dropped_within_three_intervals_and_work_goes_elsewhere(
        cluster) -> None:
    """SIGSTOP: its connection stays up (the kernel answers for it) but it beats no more.
    Idle or not, it is dropped after 3 silent intervals; what comes next goes to the
    other worker; resumed, it is told BYE and registers again."""
    cluster.serve("q", heartbeat=0.5)
    stopped_w = cluster.worker("q", heartbeat=0.5)
    other = cluster.worker("q", heartbeat=0.5)
    stopped_w.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_for(lambda: cluster.status("q")["workers_current"] == 1, 10, "the stopped one dropped")
        dropped = time.monotonic() - t0
        assert [r["pid"] for r in cluster.status("q")["workers"]] == [other.pid]
        with Sender("q") as s:
            for _ in range(3):
                assert s.rpc("sleep", {"s": 0.0}, timeout=10)["pid"] == other.pid
    finally:
        stopped_w.signal(signal.SIGCONT)
    assert dropped < 3 * 0.5 + 1.0, f"dropped {dropped:.2f} s after it stopped"
    wait_for(lambda: cluster.status("q")["workers_current"] == 2, 10, "the resumed one back")


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
    """What each receives in ``seconds``; both beat every 0.2 s meanwhile (every worker
    must), ``old`` bare as older workers do, ``new`` naming itself as a heartbeat thread
    does."""
    got: dict[zmq.Socket, list[list[bytes]]] = {old: [], new: []}
    poller = zmq.Poller()
    for sock in got:
        poller.register(sock, zmq.POLLIN)
    now = time.monotonic()
    deadline, next_beat = now + seconds, now
    while (now := time.monotonic()) < deadline:
        if now >= next_beat:
            old.send_multipart([SIGNATURE, HEARTBEAT])
            new.send_multipart([SIGNATURE, HEARTBEAT, new.routing_id])
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
        new.close(0)  # nothing said, no beat: detached at once, dropped when silent 3 beats

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
        self.bare_beats: list[float] = []  # when each beat without a report arrived
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
                elif frames[:2] == [SIGNATURE, HEARTBEAT] and len(frames) == 3:
                    self.bare_beats.append(time.monotonic())
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
        since, bare_since = len(fake.named_beats), len(fake.bare_beats)
        threading.Event().wait(2.0)  # a counting window, not a synchronisation
        reports = len(fake.named_beats) - since
        beats = reports + len(fake.bare_beats) - bare_since
        assert w.popen.poll() is None, w.stderr
    finally:
        fake.close()
    assert 7 <= beats <= 12, beats  # a beat every 0.2 s to either broker (SPEC)
    if watches:
        assert reports <= 1, reports  # idle, watched: the report every 5 s at most
    else:
        assert reports == beats, (reports, beats)  # every beat carries it, as ever
    assert "silent" not in w.stderr  # neither broker looked dead to it


class CuttableProxy:
    """A tcp proxy whose connections the test can cut (a brief network drop)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                a, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            b = socket.create_connection(self.target)
            with self.lock:
                self.pairs.append((a, b))
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.close()
            except OSError:
                pass

    def cut(self) -> int:
        """Close every connection through the proxy (both ends); new ones are accepted."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for sock in (a, b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        return len(pairs)

    def close(self) -> None:
        self.stop.set()
        self.cut()
        self.listener.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def test_a_brief_connection_drop_of_a_live_worker_runs_nothing_twice(cluster) -> None:
    """The worker's connections (its runner's and its heartbeat thread's) are cut while
    it runs a callback; it reconnects and says HELLO again. Its message is not run
    again (retries=1 would allow it): one callback invocation, one reply."""
    port = free_port()
    direct = f"tcp://127.0.0.1:{port}"
    serve = cluster.serve("q", endpoint=direct, heartbeat=1.0)  # tcp is watched from 1 s up
    proxy = CuttableProxy(("127.0.0.1", port))
    try:
        via = f"tcp://127.0.0.1:{proxy.port}"
        cluster.worker("q", endpoint=via, heartbeat=1.0)
        assert cluster.status("q", endpoint=direct)["workers"][0]["watched"] is True
        with Sender("q", endpoint=direct) as s:
            mid = s.submit("sleep", {"s": 1.5}, retries=1, timeout=30)
            wait_for(lambda: starts(cluster.log), 10, "the callback started")
            assert proxy.cut() >= 2  # its runner's and its heartbeat thread's connections
            # It says HELLO on a new connection. sqm usually logs the old one's close
            # first ("connection closed while it held 1 message(s)"), but libzmq may
            # hand sqm the new connection's HELLO before the old one's disconnect
            # event; the old close then names nobody. Either way: registered again.
            wait_for(lambda: serve.stderr.count(" registered (") >= 2, 10,
                     "the worker's HELLO on its new connection")
            reply = s.receive(id=mid, timeout=15)
        assert reply["slept"] == 1.5
        wait_for(lambda: cluster.status("q", endpoint=direct)["workers"][0]["state"] == "idle",
                 10, "the worker back (HELLO on its new connection)")
        threading.Event().wait(3.5)  # past 3 intervals: a late drop would re-run it now
        st = cluster.status("q", endpoint=direct)
        assert st["workers_current"] == 1 and st["redelivered_total"] == 0
        assert len(starts(cluster.log)) == 1  # the callback ran once
    finally:
        proxy.close()
