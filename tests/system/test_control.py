"""Operator commands end to end: drain, resume, purge, stop-worker, shutdown, workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import zmq

from sender import Purged, Sender
from sqm import protocol
from tests.conftest import REPO, read_log, wait_for

pytestmark = pytest.mark.timeout(60)


def sqm(cluster, *args):
    return subprocess.run([sys.executable, "-m", "sqm", *args], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def test_drain_holds_messages_and_resume_dispatches_them_in_order(cluster):
    cluster.serve("q")
    cluster.worker("q")
    out = sqm(cluster, "drain", "q")
    assert out.returncode == 0 and "draining" in out.stdout
    with Sender("q", timeout=10) as s:
        ids = [s.submit("record", i) for i in range(3)]
        # the worker is idle: sqm would have dispatched at once if it could
        st = wait_for(lambda: (st := cluster.status("q"))["pending"] == 3 and st, 10, "3 pending")
        assert st["in_flight"] == 0 and st["draining"] is True
        assert read_log(cluster.log) == []
        out = sqm(cluster, "resume", "q")
        assert out.returncode == 0 and "3 were pending" in out.stdout
        assert [s.receive(id=m)["payload"] for m in ids] == [0, 1, 2]
    assert cluster.status("q")["draining"] is False


def test_purge_fails_each_pending_message_back_promptly(cluster):
    cluster.serve("q")
    with Sender("q", timeout=30) as s:
        ids = [s.submit("record", i) for i in range(4)]
        wait_for(lambda: cluster.status("q")["pending"] == 4, 10, "4 pending")
        out = sqm(cluster, "purge", "q")
        assert out.returncode == 0 and "purged 4" in out.stdout
        for mid in ids:
            with pytest.raises(Purged, match="purged"):
                s.receive(id=mid, timeout=2)  # promptly, not at the 30 s deadline
        st = cluster.status("q")
        assert st["pending"] == 0 and st["failed_total"] == 4
        cluster.worker("q")
        assert s.rpc("record", "after")["payload"] == "after"
    assert [e["payload"] for e in read_log(cluster.log)] == ["after"]


def test_stop_worker_finishes_its_message_and_exits_0(cluster):
    cluster.serve("q")
    a = cluster.worker("q")
    b = cluster.worker("q")
    with Sender("q", timeout=20) as s:
        mid = s.submit("sleep", {"s": 1.0})
        wait_for(lambda: read_log(cluster.log), 10, "the task to start")
        busy = [w for w in cluster.status("q")["workers"] if w["state"] == "busy"]
        assert len(busy) == 1
        out = sqm(cluster, "stop-worker", "q", busy[0]["id"])
        assert out.returncode == 0, out.stderr
        assert s.receive(id=mid)["slept"] == 1.0
        stopped = a if busy[0]["pid"] == a.pid else b
        assert stopped.wait(10) == 0
        st = cluster.wait_workers("q", 1)
        assert st["workers"][0]["pid"] != stopped.pid
        assert s.rpc("echo", "still served") == "still served"


def test_stop_worker_unknown_id_is_a_one_line_error(cluster):
    cluster.serve("q")
    out = sqm(cluster, "stop-worker", "q", "no-such-worker")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "no worker 'no-such-worker'" in out.stderr


def test_shutdown_stops_sqm_with_exit_0(cluster):
    proc = cluster.serve("q")
    out = sqm(cluster, "shutdown", "q")
    assert out.returncode == 0 and "shutting down" in out.stdout
    assert proc.wait(10) == 0
    assert "operator asked to shutdown" in proc.stderr


def test_workers_lists_what_status_shows(cluster):
    cluster.serve("q")
    cluster.worker("q", processes=2)
    out = sqm(cluster, "workers", "q", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert sorted(w["id"] for w in listed) == sorted(w["id"] for w in cluster.status("q")["workers"])
    table = sqm(cluster, "workers", "q").stdout.splitlines()
    assert table[0].split()[:3] == ["WORKER", "HOST", "PID"] and len(table) == 3


def test_bad_control_requests_get_an_answer_and_are_counted(cluster, rundir):
    cluster.serve("q")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"ipc://{rundir}/q.sock")
    try:
        sock.send_multipart([protocol.SIGNATURE, protocol.CONTROL, b'{"cmd": "explode"}'])
        assert sock.poll(5000)
        reply = json.loads(sock.recv_multipart()[2])
        assert reply["ok"] is False and "unknown control command" in reply["error"]
        sock.send_multipart([protocol.SIGNATURE, protocol.CONTROL, b"not json"])
        wait_for(lambda: cluster.status("q")["malformed_total"] == 1, 10, "malformed count")
    finally:
        sock.close()
