"""Every status figure checked against known activity (issue: metrics).

Real sqm and worker processes; the figures come from `sqm status --json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sender import RemoteError, Sender
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(90)


def sqm_json(cluster, *args):
    out = subprocess.run([sys.executable, "-m", "sqm", *args], env=cluster.env, cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_counts_after_100_rpcs_to_3_workers(cluster):
    before = time.time()
    sqm = cluster.serve("q")
    # one slot each: sqm spreads sequential rpcs longest idle first (with prefetch,
    # a worker's slots are taken in turn: it serves up to 16 in a row)
    cluster.worker("q", "--prefetch", "1", processes=3)
    with Sender("q", timeout=10) as s:
        for i in range(100):
            assert s.rpc("sleep", {"s": 0.01, "i": i})["slept"] == 0.01
        with pytest.raises(RemoteError):
            s.rpc("boom", 1)
    st = sqm_json(cluster, "status", "q", "--json")
    assert st["assigned_total"] == 101 and st["completed_total"] == 100
    assert st["failed_total"] == 1  # the callback raised: a failed task
    assert st["workers_current"] == 3 and st["workers_ever"] == 3
    assert sum(w["tasks_done"] for w in st["workers"]) == 101
    assert all(w["tasks_done"] >= 30 for w in st["workers"])  # longest idle first
    assert st["pending"] == 0 and st["in_flight"] == 0
    assert before <= st["started_at"] <= time.time() and st["uptime_s"] > 0
    assert 0 < st["utilization"] < 1
    def children(pid: int | str) -> list[str]:
        return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split()

    # the workers are the children of the parent's pool task supervisors
    assert {w["pid"] for w in st["workers"]} == set(
        int(p) for sup in children(cluster.procs[-1].pid) for p in children(sup)
    )
    for w in st["workers"]:
        assert before <= w["started_at"] <= time.time()
        assert w["host"] and w["state"] == "idle"
    # the manager's own process info
    assert st["broker"]["pid"] == sqm.pid and st["broker"]["rss_bytes"] > 1_000_000
    assert st["broker"]["nice"] == os.getpriority(os.PRIO_PROCESS, 0)

    # latency: 101 samples each; service of a 10 ms sleep lands near 10 ms
    lat = st["latency"]
    assert lat["service"]["count"] == 101 and lat["queue_wait"]["count"] == 101
    assert 0.008 <= lat["service"]["p50"] <= 0.5
    assert lat["service"]["p50"] <= lat["service"]["p90"] <= lat["service"]["p99"]
    assert lat["queue_wait"]["p50"] < lat["service"]["p50"]  # idle workers: no waiting
    sleep, boom = st["methods"]["sleep"], st["methods"]["boom"]
    assert (sleep["assigned_total"], sleep["completed_total"], sleep["failed_total"]) == (100, 100, 0)
    assert (boom["assigned_total"], boom["completed_total"], boom["failed_total"]) == (1, 0, 1)
    assert sleep["latency"]["service"]["count"] == 100

    # idle time grows while idle
    first = {w["id"]: w["idle_s"] for w in st["workers"]}
    wait_for(
        lambda: all(w["idle_s"] > first[w["id"]] + 0.3 for w in cluster.status("q")["workers"]),
        10, "idle_s to grow",
    )


def test_expired_rejected_redelivered_malformed_are_counted(cluster):
    cluster.serve("q", "--max-pending", "1")
    with Sender("q") as s:
        s.submit("echo", 1, timeout=0.2)  # expires while pending
        wait_for(lambda: cluster.status("q")["expired_total"] == 1, 10, "expiry")
        s.submit("echo", 2)
        s.submit("echo", 3)  # refused: QueueFull
        wait_for(lambda: cluster.status("q")["rejected_total"] == 1, 10, "rejection")
    st = cluster.status("q")
    assert (st["expired_total"], st["rejected_total"], st["malformed_total"]) == (1, 1, 0)
    assert st["redelivered_total"] == 0


def test_status_table_and_watch(cluster):
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        s.rpc("echo", 1)
    out = subprocess.run([sys.executable, "-m", "sqm", "status", "q", "--watch", "--count", "3",
                          "--interval", "0.1"], env=cluster.env, cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("queue q at ") == 3
    assert "service" in out.stdout and "p99" in out.stdout and "echo" in out.stdout
    lines = subprocess.run([sys.executable, "-m", "sqm", "status", "q", "--watch", "--json",
                            "--count", "2", "--interval", "0.1"], env=cluster.env, cwd=REPO,
                           capture_output=True, text=True, timeout=30).stdout.splitlines()
    first, second = (json.loads(line) for line in lines)
    assert second["uptime_s"] > first["uptime_s"]
