"""Dead letters with real processes: `sqm dead list|replay|purge`, the bound, the journal.

The caller is a raw client (a DEALER to submit, a PULL mailbox), so the test
sees exactly the frames sqm and the worker send it, and controls the
envelope (deadline, retries) byte for byte.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq

from sqm.config import resolve
from sqm.protocol import ERROR, RESULT, SIGNATURE, SUBMIT, encode_envelope
from tests.conftest import Cluster, free_port, read_log, wait_for

pytestmark = pytest.mark.timeout(60)


class RawClient:
    """Submits like a Sender would; reads sqm's errors and its mailbox frame by frame."""

    def __init__(self, rundir: Path, name: str, queue: str = "q") -> None:
        self.ctx = zmq.Context()
        self.mailbox = f"ipc://{rundir}/mbox-{name}.sock"
        self.pull = self.ctx.socket(zmq.DEALER)  # a mailbox: workers reach it from a ROUTER
        self.pull.bind(self.mailbox)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.connect(resolve(queue).endpoint)
        self.closed = False

    def submit(self, mid: str, method: str, payload: bytes, *, deadline: float | None = None,
               retries: int = 0) -> None:
        env = encode_envelope(mid.encode(), self.mailbox.encode(), method.encode(), b"json",
                              retries=retries, deadline=deadline)
        self.dealer.send_multipart([SIGNATURE, SUBMIT, env, payload])

    def error_from_sqm(self, mid: str, timeout_s: float = 15.0) -> str:
        """The error type sqm sends back for ``mid`` (ACCEPTED notices skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.dealer.poll(int(left * 1000) + 1):
                raise AssertionError(f"no error for {mid} from sqm in {timeout_s} s")
            frames = self.dealer.recv_multipart()
            if frames[1] == ERROR and frames[2] == mid.encode():
                return frames[3].decode()

    def reply(self, timeout_s: float = 15.0) -> list[bytes]:
        """The next frames that reach the mailbox (a worker's ACK or RESULT)."""
        if not self.pull.poll(int(timeout_s * 1000)):
            raise AssertionError(f"nothing reached the mailbox in {timeout_s} s")
        return self.pull.recv_multipart()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pull.close(0)
            self.dealer.close(0)
            self.ctx.term()  # the connection to sqm is closed once this returns


def sqm_cli(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "sqm", *args], env=cluster.env,
                         capture_output=True, text=True, timeout=30)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def dead_list(cluster: Cluster, queue: str = "q") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(sqm_cli(cluster, "dead", "list", queue, "--json").stdout)
    return found


def expire(cluster: Cluster, client: RawClient, mid: str, payload: bytes) -> None:
    """Submit ``mid`` with a short deadline while no worker serves the queue: Expired."""
    client.submit(mid, "record", payload, deadline=time.time() + 0.3)
    assert client.error_from_sqm(mid) == "Expired"


def kill_worker(proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the worker and any child: no goodbye
    proc.wait(10)


@pytest.fixture
def clients(rundir: Path):
    made: list[RawClient] = []

    def make(name: str) -> RawClient:
        made.append(RawClient(rundir, name))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_dead_list_shows_a_worker_lost_and_an_expired_message(cluster, clients):
    cluster.serve("q")
    caller = clients("caller")
    worker = cluster.worker("q")
    lost = b'{"s": 30, "note": "caf\\u00e9"}'
    caller.submit("lost-1", "sleep", lost, retries=0)
    wait_for(lambda: cluster.status()["in_flight"] == 1, 15, "the message in flight")
    kill_worker(worker)
    assert caller.error_from_sqm("lost-1") == "WorkerLost"
    wait_for(lambda: cluster.status()["workers_current"] == 0, 15, "the worker gone")
    expired = b'{"never": "run"}'
    expire(cluster, caller, "late-1", expired)

    dead = {d["id"]: d for d in dead_list(cluster)}
    assert list(dead) == ["lost-1", "late-1"]
    one, two = dead["lost-1"], dead["late-1"]
    assert (one["method"], one["reason"], one["attempts"], one["serializer"]) == (
        "sleep", "WorkerLost", 1, "json")
    assert base64.b64decode(one["payload"]) == lost
    assert (two["method"], two["reason"], two["attempts"], two["serializer"]) == (
        "record", "Expired", 0, "json")
    assert base64.b64decode(two["payload"]) == expired
    assert time.time() - 60 < one["failed_at"] <= two["failed_at"] <= time.time()
    st = cluster.status()
    assert (st["dead_letters"], st["dead_total"]) == (2, 2)
    table = sqm_cli(cluster, "dead", "list", "q").stdout
    assert "lost-1" in table and "WorkerLost" in table and "Expired" in table


def test_replay_to_a_waiting_caller_brings_it_the_reply(cluster, clients):
    cluster.serve("q")
    caller = clients("caller")
    payload = b'{"a": 1}'
    expire(cluster, caller, "again-1", payload)
    cluster.worker("q")
    out = sqm_cli(cluster, "dead", "replay", "q", "again-1").stdout
    assert "replayed again-1 to its caller" in out
    frames = caller.reply()
    while frames[1] != RESULT:  # an ACK first
        frames = caller.reply()
    assert frames[2] == b"again-1"
    assert json.loads(frames[3])["payload"] == {"a": 1}
    assert dead_list(cluster) == []
    st = cluster.status()
    assert (st["dead_letters"], st["dead_total"], st["completed_total"]) == (0, 1, 1)


def test_replay_to_a_caller_that_is_gone_runs_oneway(cluster, clients, rundir):
    cluster.serve("q")
    caller = clients("gone")
    expire(cluster, caller, "orphan-1", b'{"who": "orphan"}')
    caller.close()
    cluster.worker("q")
    out = sqm_cli(cluster, "dead", "replay", "q", "--all").stdout
    assert "replayed orphan-1 oneway (its caller is gone)" in out
    log = Path(cluster.env["SQM_TEST_LOG"])
    wait_for(lambda: any(r.get("payload") == {"who": "orphan"} for r in read_log(log)), 15,
             "the worker to run the replayed message")
    wait_for(lambda: cluster.status()["completed_total"] == 1, 15, "the oneway message done")
    assert dead_list(cluster) == []


def test_replay_of_an_unknown_id_says_so(cluster):
    cluster.serve("q")
    out = sqm_cli(cluster, "dead", "replay", "q", "nope-1", "nope-2", check=False)
    assert out.returncode == 1
    assert "no dead letter nope-1" in out.stdout and "no dead letter nope-2" in out.stdout


def test_purge_forgets_the_dead_letters_not_the_total(cluster, clients):
    cluster.serve("q")
    caller = clients("caller")
    expire(cluster, caller, "p-1", b"1")
    expire(cluster, caller, "p-2", b"2")
    assert len(dead_list(cluster)) == 2
    out = sqm_cli(cluster, "dead", "purge", "q").stdout
    assert "purged 2 dead letter(s)" in out
    assert dead_list(cluster) == []
    st = cluster.status()
    assert (st["dead_letters"], st["dead_total"]) == (0, 2)


def test_the_bound_keeps_the_newest(cluster, clients):
    cluster.serve("q", "--dead-letters", "3")
    caller = clients("caller")
    for i in range(5):
        expire(cluster, caller, f"b-{i}", b'{"i": %d}' % i)
    assert [d["id"] for d in dead_list(cluster)] == ["b-2", "b-3", "b-4"]
    st = cluster.status()
    assert (st["dead_letters"], st["dead_total"], st["dead_letters_limit"]) == (3, 5, 3)


def test_dead_letters_survive_a_restart_with_the_journal(cluster, clients, rundir):
    journal = str(rundir / "journal.db")
    sqm = cluster.serve("q", "--journal", journal)
    caller = clients("caller")
    expire(cluster, caller, "j-1", b'{"kept": 1}')
    expire(cluster, caller, "j-2", b"\x00\x01 not json at all")
    before = dead_list(cluster)
    sqm.signal(signal.SIGTERM)
    assert sqm.wait(15) == 0
    cluster.serve("q", "--journal", journal)
    after = dead_list(cluster)
    assert after == before and [d["id"] for d in after] == ["j-1", "j-2"]
    assert base64.b64decode(after[1]["payload"]) == b"\x00\x01 not json at all"
    st = cluster.status()
    assert (st["dead_letters"], st["dead_total"]) == (2, 0)  # the total counts since start


def test_metrics_count_dead_letters(cluster, clients):
    port = free_port()
    cluster.serve("q", "--dead-letters", "1", "--metrics-port", str(port))
    caller = clients("caller")
    expire(cluster, caller, "m-1", b"1")
    expire(cluster, caller, "m-2", b"2")

    def figures() -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return {}
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                if line.startswith(("sqm_dead_letters{", "sqm_messages_dead_total{"))}

    wait_for(lambda: figures() == {"sqm_dead_letters": 1.0, "sqm_messages_dead_total": 2.0}, 10,
             "dead-letter figures in /metrics (the snapshot refreshes every second)")
