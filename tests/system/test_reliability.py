"""Backpressure, expiry, priorities, poison messages and size limits, end to end.

Real sqm, worker and sender processes; the worker log proves what was (and
was not) dispatched.
"""

from __future__ import annotations

import pytest

from sender import Expired, MessageTooLarge, QueueFull, Sender, SQMError, WorkerLost
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(60)

POISON = "tests.apps.reliability:callbacks"


def test_queue_full_past_max_pending_and_nothing_dropped(cluster):
    cluster.serve("q", "--max-pending", "5")
    with Sender("q", timeout=10) as s:
        ids = [s.submit("record", i) for i in range(8)]
        # the first five wait for a worker; the last three are refused at once
        for mid in ids[5:]:
            with pytest.raises(QueueFull, match="pending"):
                s.receive(id=mid, timeout=5)
        st = cluster.status("q")
        assert st["pending"] == 5 and st["rejected_total"] == 3
        cluster.worker("q")
        assert [s.receive(id=mid, timeout=10)["payload"] for mid in ids[:5]] == [0, 1, 2, 3, 4]
    assert [e["payload"] for e in read_log(cluster.log)] == [0, 1, 2, 3, 4]


def test_max_pending_from_config_per_queue(cluster, tmp_path, monkeypatch):
    conf = tmp_path / "sqm.yaml"
    conf.write_text("max_pending: 1000\nqueues:\n  q:\n    max_pending: 2\n")
    monkeypatch.setenv("SQM_CONFIG", str(conf))
    cluster.env["SQM_CONFIG"] = str(conf)
    cluster.serve("q")
    assert cluster.status("q")["max_pending"] == 2
    with Sender("q") as s:
        ids = [s.submit("record", i) for i in range(3)]
        with pytest.raises(QueueFull):
            s.receive(id=ids[2], timeout=5)


def test_expired_message_is_never_dispatched(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        short = s.submit("record", "short-ttl", ttl=0.3)
        long = s.submit("record", "long-ttl", ttl=30)
        plain = s.submit("record", "no-deadline")
        wait_for(lambda: cluster.status("q")["expired_total"] == 1, 10, "the sweep to expire it")
        cluster.worker("q")
        with pytest.raises(Expired):
            s.receive(id=short, timeout=5)
        assert s.receive(id=long, timeout=10)["payload"] == "long-ttl"
        assert s.receive(id=plain, timeout=10)["payload"] == "no-deadline"
    handled = [e["payload"] for e in read_log(cluster.log)]
    assert handled == ["long-ttl", "no-deadline"]  # no wasted work on the expired one


def test_rpc_timeout_is_the_deadline_so_a_given_up_rpc_is_not_run(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        with pytest.raises(SQMError):  # Timeout (sender side) or Expired (from sqm)
            s.rpc("record", "gave-up", timeout=0.3)
        wait_for(lambda: cluster.status("q")["expired_total"] == 1, 10, "expiry")
        cluster.worker("q")
        assert s.rpc("record", "later", timeout=10)["payload"] == "later"
    assert [e["payload"] for e in read_log(cluster.log)] == ["later"]


def test_priorities_high_first_fifo_within_a_level(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        order = [("low", "l1"), ("normal", "n1"), ("high", "h1"), ("low", "l2"),
                 ("high", "h2"), ("normal", "n2")]
        ids = [s.submit("record", name, priority=prio) for prio, name in order]
        wait_for(lambda: cluster.status("q")["pending"] == 6, 10, "6 pending")
        cluster.worker("q")
        for mid in ids:
            s.receive(id=mid, timeout=10)
        with pytest.raises(ValueError, match="priority"):
            s.submit("record", 1, priority="urgent")
    assert [e["payload"] for e in read_log(cluster.log)] == ["h1", "h2", "n1", "n2", "l1", "l2"]


def test_poison_message_fails_after_max_deliveries_whatever_the_retries(cluster):
    cluster.serve("q", "--max-deliveries", "2")
    pool = cluster.worker("q", target=POISON, processes=2)
    with Sender("q") as s:
        with pytest.raises(WorkerLost) as err:
            s.rpc("die", "poison", retries=10, timeout=30)
        assert err.value.deliveries == 2
        # the pool survives (the supervisor replaced the dead children) and serves
        cluster.wait_workers("q", 2, proc=pool)
        assert s.rpc("record", "after", timeout=10)["payload"] == "after"
    assert [e["payload"] for e in read_log(cluster.log) if e["kind"] == "die"] == ["poison"] * 2
    st = cluster.status("q")
    assert st["redelivered_total"] == 1 and st["failed_total"] == 1


def test_oversized_message_refused_by_sender_and_by_sqm(cluster):
    cluster.serve("q", "--max-message-size", "1000")
    cluster.worker("q")
    big = "x" * 5000
    with Sender("q", max_message_size=1000) as s:
        with pytest.raises(MessageTooLarge, match="limit is 1000"):
            s.submit("echo", big)
        assert s.outstanding == 0
    with Sender("q") as s:  # the default limit is larger: sqm is the backstop
        mid = s.submit("echo", big)
        with pytest.raises(MessageTooLarge, match="1000"):
            s.receive(id=mid, timeout=5)
        assert s.rpc("echo", "small", timeout=5) == "small"  # sqm carries on
    assert cluster.status("q")["rejected_total"] == 1


def test_sqm_answers_accepted(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        mid = s.submit("record", "no worker yet")
        wait_for(lambda: (s.poll(0), s.accepted(mid))[1], 10, "the accepted ack")
        assert not s.started(mid)
