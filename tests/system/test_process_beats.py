"""One heartbeat per worker process per broker (worker/beats.py).

A process of 20 Worker threads sharing a context beats with one message
per interval to a broker that reads the packed form (it said so in its
HELLO answer), and with each worker's own beat to one that does not (an
older sqm): the probe, a raw ROUTER standing in for sqm, counts both. With
a real sqm: a SIGSTOPped process still loses all its workers after 3 silent
intervals, and a Worker that leaves stops being listed without sqm dropping
any other wrongly.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq

from sqm.protocol import (
    BYE,
    HEARTBEAT,
    HELLO,
    PACKED_BEATS,
    SIGNATURE,
    pack_ids,
    unpack_ids,
)
from tests.conftest import Cluster, Proc, wait_for

pytestmark = pytest.mark.timeout(90)

N = 20


def many_workers(cluster: Cluster, n: int, heartbeat: float, endpoint: str | None = None) -> Proc:
    argv = [sys.executable, "-m", "tests.apps.many_workers", "q", str(n), str(heartbeat)]
    proc = Proc(argv + ([endpoint] if endpoint else []), cluster.env, cluster.rundir,
                "many-workers")
    cluster.procs.append(proc)
    return proc


class Probe:
    """A ROUTER standing in for a watching sqm: answers HELLO (saying it reads packed
    beats, or not: an older sqm) and counts the beats that arrive, by form."""

    def __init__(self, endpoint: str, *, packed: bool) -> None:
        self.answer = [SIGNATURE, HEARTBEAT, b"200", b"5000"] + ([PACKED_BEATS] if packed else [])
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(endpoint)
        self.hellos: set[bytes] = set()
        self.lock = threading.Lock()
        self.kinds: Counter[str] = Counter()  # "packed", "bare", "report"
        self.named: Counter[bytes] = Counter()  # worker id -> beats naming it
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(20):
                continue
            rid, *frames = self.sock.recv_multipart()
            if frames[:2] == [SIGNATURE, HELLO]:
                self.sock.send_multipart([rid, *self.answer])
                self.hellos.add(rid)
            elif frames[:2] == [SIGNATURE, HEARTBEAT]:
                with self.lock:
                    if len(frames) == 2:  # the rights check
                        self.sock.send_multipart([rid, SIGNATURE, BYE])
                    elif len(frames) == 4 and frames[2] == b"":
                        self.kinds["packed"] += 1
                        self.named.update(unpack_ids(frames[3]))
                    else:
                        self.kinds["bare" if len(frames) == 3 else "report"] += 1
                        self.named[frames[2]] += 1

    def window(self, seconds: float) -> tuple[Counter[str], Counter[bytes]]:
        """Beats by form and per worker over ``seconds`` (a counting window)."""
        with self.lock:
            self.kinds.clear()
            self.named.clear()
        threading.Event().wait(seconds)
        with self.lock:
            return Counter(self.kinds), Counter(self.named)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.parametrize("packed", [True, False], ids=["reads-packed", "older-sqm"])
def test_a_process_of_20_workers_sends_one_beat_per_interval(cluster: Cluster, rundir: Path,
                                                             packed: bool) -> None:
    endpoint = f"ipc://{rundir}/probe.sock"
    probe = Probe(endpoint, packed=packed)
    try:
        proc = many_workers(cluster, N, 0.2, endpoint)
        wait_for(lambda: len(probe.hellos) == N, 20, "20 HELLOs")
        wait_for(lambda: len(probe.window(0.4)[1]) == N, 10, "beats naming all 20")
        kinds, named = probe.window(2.0)
        assert proc.popen.poll() is None, proc.stderr
    finally:
        probe.close()
    assert len(named) == N, named
    # every worker is named every 0.2 s interval (10 in 2 s; a loaded VM may shift some)
    assert all(7 <= n <= 12 for n in named.values()), named
    if packed:
        # one message per interval for all 20, plus the rare self-report (every 5 s each)
        assert 7 <= kinds["packed"] <= 12, kinds
        assert kinds["bare"] == 0, kinds
        assert kinds["report"] <= N, kinds
    else:
        # an older sqm: each worker beats on its own, as before
        assert kinds["packed"] == 0, kinds
        assert kinds["bare"] + kinds["report"] >= 7 * N, kinds


def test_a_stopped_process_loses_all_its_workers_and_one_that_leaves_is_not_dropped_late(
        cluster: Cluster) -> None:
    cluster.serve("q", heartbeat=0.5)
    proc = many_workers(cluster, N, 0.5)
    cluster.wait_workers("q", N, proc=proc)
    # One leaves (BYE): it is gone at once and the others stay, beat after beat.
    proc.signal(signal.SIGUSR1)
    cluster.wait_workers("q", N - 1, proc=proc)

    def registrations() -> dict[str, float]:
        return {r["id"]: r["registered_at"] for r in cluster.status("q")["workers"]}

    # A worker dropped registers again at once (told BYE): its registration time shows it.
    before = registrations()
    threading.Event().wait(3 * 0.5 * 2)  # a window of 6 intervals: twice what sqm waits
    assert registrations() == before
    # The whole process stops: all its workers are dropped after 3 silent intervals.
    proc.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_for(lambda: cluster.status("q")["workers_current"] == 0, 10, "all 19 dropped")
        dropped = time.monotonic() - t0
    finally:
        proc.signal(signal.SIGCONT)
    assert dropped < 3 * 0.5 + 1.0, f"dropped {dropped:.2f} s after it stopped"
    cluster.wait_workers("q", N - 1, proc=proc)  # resumed: told BYE, they register again


def test_sqm_says_it_reads_packed_beats_only_to_a_worker_that_asks_and_reads_them(
        cluster: Cluster) -> None:
    """By hand: a HELLO with ``packed_beats`` gets a 5th frame in the answer, an older
    worker's the 4 frames it knows; one packed beat from a third socket then keeps
    both alive (and an unknown id in it is skipped) while they say nothing."""
    cluster.serve("q", heartbeat=0.3)
    endpoint = cluster.status("q")["endpoint"]
    ctx = zmq.Context()
    try:
        socks = {}
        for rid, asks in ((b"Wnew", True), (b"Wold", False)):
            sock = socks[rid] = ctx.socket(zmq.DEALER)
            sock.routing_id, sock.linger = rid, 0
            sock.connect(endpoint)
            info = {"id": rid.decode(), "slots": 1, "heartbeat": 0.3, "watch": True,
                    **({"packed_beats": True} if asks else {})}
            sock.send_multipart([SIGNATURE, HELLO, json.dumps(info).encode()])
        for sock in socks.values():
            assert sock.poll(5000), "no answer to HELLO"
        assert socks[b"Wnew"].recv_multipart() == [SIGNATURE, HEARTBEAT, b"300", b"9000",
                                                   PACKED_BEATS]
        assert socks[b"Wold"].recv_multipart() == [SIGNATURE, HEARTBEAT, b"300", b"9000"]
        beater = ctx.socket(zmq.DEALER)
        beater.linger = 0
        beater.connect(endpoint)
        packed = pack_ids([b"Wnew", b"nobody", b"Wold"])

        def registrations() -> dict[str, float]:
            return {r["id"]: r["registered_at"] for r in cluster.status("q")["workers"]}

        before = registrations()
        assert set(before) == {"Wnew", "Wold"}
        deadline = time.monotonic() + 6 * 0.3  # twice what sqm waits to drop one
        while time.monotonic() < deadline:
            beater.send_multipart([SIGNATURE, HEARTBEAT, b"", packed])
            threading.Event().wait(0.25)  # the beat interval (what is tested is sqm's side)
        assert registrations() == before
        # Silent now: both dropped after 3 intervals.
        wait_for(lambda: cluster.status("q")["workers_current"] == 0, 5, "both dropped")
    finally:
        ctx.destroy(0)
