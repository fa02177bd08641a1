"""Abilities end to end: sqm dispatches a method only to workers that serve it.

Real ``sqm serve`` and ``sqm worker`` processes; the workers log what they
ran (tests/apps/abilities.py), so each check is made from both sides.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sender import Sender
from sqm.errors import RemoteError
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(90)

APPS = "tests.apps.abilities"


def ran(cluster) -> list[dict]:
    return read_log(Path(cluster.log))


def test_two_specialised_workers_each_run_only_their_method(cluster):
    cluster.serve("q")
    wa = cluster.worker("q", target=f"{APPS}:only_a")
    wb = cluster.worker("q", target=f"{APPS}:only_b")
    with Sender("q", timeout=20) as s:
        ids = [(m, s.submit(m, {"i": i})) for i, m in enumerate("abababbbaaab")]
        replies = [(m, s.receive(id=mid)) for m, mid in ids]
    assert all(r["method"] == m for m, r in replies)
    assert {r["pid"] for m, r in replies if m == "a"} == {wa.pid}
    assert {r["pid"] for m, r in replies if m == "b"} == {wb.pid}
    log = ran(cluster)
    assert len(log) == 12
    assert {(e["method"], e["pid"]) for e in log} == {("a", wa.pid), ("b", wb.pid)}
    # each reply goes out before its DONE: wait for sqm to count the last one
    st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 12 and x, 10,
                  "12 completed")
    assert st["methods"]["a"]["workers"] == 1 and st["methods"]["b"]["workers"] == 1
    assert sorted(tuple(w["methods"]) for w in st["workers"]) == [("a",), ("b",)]
    assert st["failed_total"] == 0


def test_unknown_method_fails_at_once_when_workers_exist(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:only_a")
    with Sender("q", timeout=20) as s:
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as info:
            s.rpc("zzz", 1)
        assert time.monotonic() - t0 < 2.0  # at once, not at the 20 s timeout
        assert info.value.type == "UnknownMethod"
        assert s.rpc("a", 1)["method"] == "a"
    st = cluster.status("q")
    assert st["failed_total"] == 1 and st["pending"] == 0
    assert [e["method"] for e in ran(cluster)] == ["a"]  # zzz never reached a worker


def test_message_waits_when_no_worker_is_registered(cluster):
    cluster.serve("q")
    with Sender("q", timeout=30) as s:
        mid = s.submit("a", {"x": 1})
        wait_for(lambda: cluster.status("q")["pending"] == 1, 10, "the message pending")
        w = cluster.worker("q", target=f"{APPS}:only_a")
        assert s.receive(id=mid) == {"method": "a", "pid": w.pid}


def test_hold_unknown_waits_for_a_capable_worker(cluster):
    cluster.serve("q", "--hold-unknown")
    cluster.worker("q", target=f"{APPS}:only_b")
    with Sender("q", timeout=30) as s:
        mid = s.submit("a", {"x": 1})
        st = wait_for(lambda: (x := cluster.status("q"))["pending"] == 1 and x, 10,
                      "the message held")
        assert st["methods"]["a"] == {**st["methods"]["a"], "pending": 1, "workers": 0}
        assert st["failed_total"] == 0
        wa = cluster.worker("q", target=f"{APPS}:only_a")
        assert s.receive(id=mid) == {"method": "a", "pid": wa.pid}


def test_callbacks_changed_at_runtime_are_advertised(cluster):
    cluster.serve("q")
    w = cluster.worker("q", target=f"{APPS}:growing")

    def late_workers() -> int:
        return cluster.status("q")["methods"].get("late", {}).get("workers", 0)

    with Sender("q", timeout=20) as s:
        with pytest.raises(RemoteError) as info:
            s.rpc("late")
        assert info.value.type == "UnknownMethod"
        assert s.rpc("grow") == "grown"
        wait_for(lambda: late_workers() == 1, 10, "late advertised")
        assert s.rpc("late", {}) == {"method": "late", "pid": w.pid}
        assert s.rpc("shrink") == "shrunk"
        wait_for(lambda: late_workers() == 0, 10, "late withdrawn")
        with pytest.raises(RemoteError) as info:
            s.rpc("late")
        assert info.value.type == "UnknownMethod"
    st = cluster.status("q")
    assert sorted(st["workers"][0]["methods"]) == ["grow", "shrink"]
