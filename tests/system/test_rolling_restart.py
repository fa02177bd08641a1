"""Rolling restarts under load across hosts: what docs/DEPLOY.md tells operators to do.

Brokers on hosts A and B, workers on both registered with both, a Sender on
C keeping ~50 messages outstanding. Restarting one broker at a time (SIGTERM,
start on the same journal, wait until it serves and its workers are back)
and one worker at a time (SIGTERM: it finishes its message) must lose
nothing and deliver no reply twice, with ``retries=0``.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.system.hosts import HostProc, Network
from tests.system.test_failover import Pair, handled, outcomes, report

WINDOW = 50
STEP = 40  # replies between two restarts: the load runs through each one


def more_replies(sender: HostProc, n: int) -> None:
    goal = outcomes(sender) + n
    wait_for(lambda: outcomes(sender) >= goal, 25,
             f"{n} more replies (load still flowing)")


def finish(sender: HostProc, *others: HostProc) -> dict[str, Any]:
    sender.write("stop\n")
    result: dict[str, Any] = wait_for(sender.summary, 30, "the load's end")
    items = [line for line in sender.said() if "i" in line]
    assert result["duplicates"] == 0, result
    failed = [line for line in items if "error" in line]
    logs = "\n".join(f"--- {p.name}:\n{p.stderr[-3000:]}" for p in others)
    assert result["errors"] == {}, f"{result}\n{failed}\n{logs}"  # nothing lost, nothing failed
    assert len(items) == result["items"] == result["replies"], result
    assert sorted(line["i"] for line in items) == list(range(len(items)))
    assert all(line["ok"] for line in items), "a reply for the wrong item"
    return result


@pytest.mark.timeout(90)
def test_rolling_restart_of_both_brokers_in_journal_mode_loses_nothing(net: Network) -> None:
    a, b, c = net(3)
    pair = Pair(a, b, c, journal=True)
    sender = c.sender(pair.endpoints, window=WINDOW, s=0.05, retries=0, timeout=30)
    more_replies(sender, STEP)
    for index in (0, 1):
        broker = pair.brokers[index]
        broker.signal(signal.SIGTERM)
        assert broker.wait(15) == 0, broker.stderr  # a clean stop keeps the journal
        more_replies(sender, STEP // 2)  # the other broker carries the load alone
        pair.restart(index)
        more_replies(sender, STEP)
    result = finish(sender, *pair.brokers, *pair.workers)
    report("rolling broker restart", **result, executions=len(handled(a, b)))
    # Both restarted brokers took part again after their restart.
    for endpoint in pair.endpoints:
        st = c.status("q", endpoint)
        assert st is not None and st["assigned_total"] > 0, (endpoint, st)


@pytest.mark.timeout(90)
def test_rolling_restart_of_workers_loses_nothing(net: Network) -> None:
    a, b, c = net(3)
    pair = Pair(a, b, c, worker_args=())
    sender = c.sender(pair.endpoints, window=WINDOW, s=0.05, retries=0, timeout=30)
    more_replies(sender, STEP)
    for index, host in enumerate(pair.hosts):
        worker = pair.workers[index]
        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.stderr  # it finished its message and left
        more_replies(sender, STEP // 2)  # the other worker carries the load alone
        pair.workers[index] = host.worker(pair.endpoints)
        for broker in range(2):
            pair.wait(broker, workers=2)
        more_replies(sender, STEP)
    result = finish(sender, *pair.brokers, *pair.workers)
    executions = handled(a, b)
    report("rolling worker restart", **result, executions=len(executions))
    assert len(executions) == result["items"]  # retries=0: each ran exactly once


@pytest.mark.timeout(90)
def test_rolling_restart_of_both_brokers_in_memory_mode_loses_nothing(net: Network) -> None:
    """Without a journal, a stopping broker fails back what it holds pending
    (BrokerShutdown); no worker had started those, so the Sender re-sends them
    through the live broker instead: the caller sees no error, with retries=0."""
    a, b, c = net(3)
    pair = Pair(a, b, c)
    sender = c.sender(pair.endpoints, window=WINDOW, s=0.05, retries=0, timeout=30)
    more_replies(sender, STEP)
    for index in (0, 1):
        broker = pair.brokers[index]
        broker.signal(signal.SIGTERM)
        assert broker.wait(15) == 0, broker.stderr
        more_replies(sender, STEP // 2)
        pair.restart(index)
        more_replies(sender, STEP)
    result = finish(sender, *pair.brokers, *pair.workers)
    report("rolling broker restart, memory", **result, executions=len(handled(a, b)))
    # Every item ran; a few may have run twice (a copy re-sent when its broker's
    # link dropped before the worker's ACK arrived): the caller saw one reply each.
    assert {entry["i"] for entry in handled(a, b)} == set(range(result["items"]))
