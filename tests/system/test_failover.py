"""Brokers and workers failing across hosts, counted from the caller's side.

Hosts are network namespaces (tests/system/hosts.py). Every test names what
the caller must see (docs/GUARANTEES.md, README "Several brokers") and
bounds how long it takes; each prints its counts (run with ``-s``).
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from tests.conftest import read_log, wait_for
from tests.system.hosts import Host, HostProc, Network, admit, keygen

PORT = 5555
MESSAGES = 100
HEARTBEAT = 1.0  # sqm's, the workers' and the Sender's (the default)
#: How long a silent worker may hold a message before its caller hears of it:
#: 3 heartbeats, plus sqm's tick (a quarter heartbeat) and the test's own slack
#: (process start-up of the status probes on a busy 2-core machine).
DETECT_S = 3 * HEARTBEAT + 1.5


def handled(*hosts: Host) -> list[dict[str, Any]]:
    """Every start of a callback logged by workers on ``hosts``."""
    return [entry for host in hosts for entry in read_log(host.rundir / "handled.jsonl")]


def report(label: str, **counts: Any) -> None:
    print(f"\n[{label}] " + json.dumps(counts, sort_keys=True))


class Pair:
    """Two brokers (on hosts A and B) and a worker on each host registered with both."""

    def __init__(self, a: Host, b: Host, c: Host, *serve: str, journal: bool = False,
                 worker_args: tuple[str, ...] = ("--concurrency", "4")) -> None:
        self.hosts = (a, b)
        self.asker = c
        self.endpoints = [f"tcp://{a.addr}:{PORT}", f"tcp://{b.addr}:{PORT}"]
        self.serve = serve
        self.journal = journal
        self.brokers = [self.start(0), self.start(1)]
        self.workers = [host.worker(self.endpoints, *worker_args) for host in self.hosts]
        for index in range(2):
            self.wait(index, workers=2)

    def start(self, index: int) -> HostProc:
        host = self.hosts[index]
        extra = list(self.serve)
        if self.journal:
            extra += ["--journal", str(host.rundir / "journal.db")]
        return host.serve("q", self.endpoints[index], *extra)

    def wait(self, index: int, workers: int = 2) -> dict[str, Any]:
        return self.asker.wait_serving(self.brokers[index], self.endpoints[index], workers)

    def restart(self, index: int, workers: int = 2) -> None:
        """Start broker ``index`` again (same journal) and wait for its workers."""
        self.brokers[index] = self.start(index)
        self.wait(index, workers)


def outcomes(sender: HostProc) -> int:
    """How many items the sender has reported so far (it must still run)."""
    sender.check_alive()
    return sum(1 for line in sender.said() if "i" in line)


def failures(sender: HostProc, *others: HostProc) -> str:
    """The failed items and the other processes' logs, for an assertion's message."""
    failed = [line for line in sender.said() if "error" in line]
    logs = "\n".join(f"--- {p.name}:\n{p.stderr[-3000:]}" for p in others)
    return f"failed items: {failed}\n{logs}"


def check_batch(result: dict[str, Any], sender: HostProc) -> None:
    items = [line for line in sender.said() if "i" in line]
    assert result["duplicates"] == 0, result
    assert len(items) == result["items"] == MESSAGES, result
    assert sorted(line["i"] for line in items) == list(range(MESSAGES))
    assert all(line["ok"] for line in items if "error" not in line), "a reply for the wrong item"


@pytest.mark.timeout(60)
def test_a_broker_killed_mid_load_in_memory_mode_loses_nothing(net: Network) -> None:
    """SIGKILL broker A with ~100 messages outstanding across A and B: what A
    held and no worker had started is re-sent through B, what a worker had
    started is answered by it. Every item ends with one reply or a precise
    error: no Timeout, no duplicate."""
    a, b, c = net(3)
    pair = Pair(a, b, c)
    sender = c.sender(pair.endpoints, count=MESSAGES, window=MESSAGES, s=0.2, retries=1,
                      timeout=15)
    wait_for(lambda: outcomes(sender) >= 15, 20, "15 replies")
    pair.brokers[0].signal(signal.SIGKILL)
    killed_at = outcomes(sender)
    result = wait_for(sender.summary, 40, "the batch's end")

    check_batch(result, sender)
    errors = result["errors"]
    report("memory", killed_after=killed_at, **result, executions=len(handled(a, b)))
    why = f"{result}\n{failures(sender, *pair.brokers, *pair.workers)}"
    assert "Timeout" not in errors, why  # nothing lost silently
    assert set(errors) <= {"WorkerLost", "BrokerShutdown"}, why  # only precise errors
    # The kill caught messages that A held: they were re-sent through B.
    assert result["resent"] > 0, result
    assert killed_at < MESSAGES  # ...mid-load, not after it
    st = c.status("q", pair.endpoints[1])
    assert st is not None and st["completed_total"] > 0


@pytest.mark.timeout(60)
def test_a_broker_killed_mid_load_and_restarted_on_its_journal_answers_everything(
        net: Network) -> None:
    """With ``--journal`` on each broker, kill A mid-load and restart it on the
    same journal: every message gets its reply, exactly once to the caller
    (the re-sent copy and the journal's copy may both run: at-least-once)."""
    a, b, c = net(3)
    pair = Pair(a, b, c, journal=True)
    sender = c.sender(pair.endpoints, count=MESSAGES, window=MESSAGES, s=0.2, retries=1,
                      timeout=25)
    wait_for(lambda: outcomes(sender) >= 15, 20, "15 replies")
    pair.brokers[0].signal(signal.SIGKILL)
    pair.brokers[0].wait(10)
    killed_at = outcomes(sender)
    pair.restart(0)
    result = wait_for(sender.summary, 40, "the batch's end")

    check_batch(result, sender)
    executions = handled(a, b)
    report("journal", killed_after=killed_at, **result, executions=len(executions))
    assert result["errors"] == {}, f"{result}\n{failures(sender, *pair.brokers, *pair.workers)}"
    assert result["replies"] == MESSAGES
    # No "resent > 0" here: what A held unacknowledged waits two heartbeats
    # (a worker may be running it), and A is back by then with its journal.
    assert {entry["i"] for entry in executions} == set(range(MESSAGES))
    # The restarted broker ran what its journal held to the end: nothing is left.
    wait_for(lambda: (st := c.status("q", pair.endpoints[0])) is not None
             and st["pending"] == 0 and st["in_flight"] == 0, 20, "A's journal drained")


@pytest.mark.timeout(60)
def test_secured_brokers_killed_mid_load_lose_nothing(net: Network) -> None:
    """The memory-mode failover with CURVE on every connection: brokers share
    one server key pair, workers and the Sender have their own keys (the
    Sender's is also an admin, for status), replies travel encrypted."""
    a, b, c = net(3)
    keys = keygen(net.workdir / "keys", "broker", "worker-a", "worker-b", "sender-c")
    clients = net.workdir / "clients"
    for name, role in (("worker-a", "workers"), ("worker-b", "workers"),
                       ("sender-c", "senders"), ("sender-c", "admins")):
        admit(clients, role, keys[name].with_suffix(".key"))
    server_key = str(keys["broker"].with_suffix(".key"))
    for host, name in ((a, "worker-a"), (b, "worker-b"), (c, "sender-c")):
        host.extra_env.update(SQM_SECRET_KEY=str(keys[name]), SQM_SERVER_KEY=server_key)
    pair = Pair(a, b, c, "--secret-key", str(keys["broker"]), "--clients", str(clients))
    sender = c.sender(pair.endpoints, count=MESSAGES, window=MESSAGES, s=0.2, retries=1,
                      timeout=15)
    wait_for(lambda: outcomes(sender) >= 15, 20, "15 replies")
    pair.brokers[0].signal(signal.SIGKILL)
    killed_at = outcomes(sender)
    result = wait_for(sender.summary, 40, "the batch's end")

    check_batch(result, sender)
    report("memory, CURVE", killed_after=killed_at, **result)
    why = f"{result}\n{failures(sender, *pair.brokers, *pair.workers)}"
    assert result["errors"] == {}, why
    assert result["resent"] > 0, result
    # The broker really is secured: the same status query without a key is refused.
    c.extra_env.clear()
    assert c.status("q", pair.endpoints[1], timeout=1.0) is None


def one_message_on(worker_host: Host, broker_host: Host, c: Host, *, retries: int,
                   seconds: float, spare: Host | None = None, timeout: float = 25.0) -> tuple[HostProc, list[HostProc]]:
    """A broker on ``broker_host``, a worker on ``worker_host``, a Sender on ``c``
    whose one message that worker has started; then a spare worker (if asked)."""
    endpoint = f"tcp://{broker_host.addr}:{PORT}"
    broker = broker_host.serve("q", endpoint)
    first = worker_host.worker([endpoint])
    c.wait_serving(broker, endpoint, workers=1)
    sender = c.sender([endpoint], mode="one", s=seconds, retries=retries, timeout=timeout)
    def started() -> bool:
        sender.check_alive()
        return any("started" in line for line in sender.said())

    wait_for(started, 20, "the message started on the first worker")
    assert [entry["pid"] for entry in handled(worker_host)] == [first.pid]
    procs = [broker, first]
    if spare is not None:
        procs.append(spare.worker([endpoint]))
        c.wait_serving(broker, endpoint, workers=2)
    return sender, procs


def ended(sender: HostProc) -> dict[str, Any]:
    def last() -> dict[str, Any] | None:
        found = [line for line in sender.said() if "t" in line]
        if not found:
            sender.check_alive()
        return found[-1] if found else None

    found: dict[str, Any] = wait_for(last, 30, "the message's outcome")
    return found


@pytest.mark.timeout(60)
def test_a_link_pulled_under_a_busy_worker_retries_it_elsewhere(net: Network) -> None:
    """Worker B holds the message when B's cable is pulled (no FIN, no RST):
    sqm drops B after 3 silent heartbeats and gives the message to worker D."""
    a, b, c, d = net(4)
    sender, _ = one_message_on(b, a, c, retries=1, seconds=3.0, spare=d)
    b.link_down()
    pulled = time.time()
    restarted = wait_for(lambda: handled(d), DETECT_S + 10, "the retry on D")[0]
    outcome = ended(sender)
    report("link down, retries=1", detect_s=round(restarted["t"] - pulled, 2),
           reply_s=round(outcome["t"] - pulled, 2))
    assert outcome.get("ok"), outcome
    assert outcome["pid"] == restarted["pid"]
    assert restarted["t"] - pulled <= DETECT_S
    assert restarted["t"] - pulled >= 1.5 * HEARTBEAT  # dropped for silence, not at once
    assert outcome["t"] - pulled <= DETECT_S + 3.0 + 1.0


@pytest.mark.timeout(60)
def test_a_link_pulled_under_a_busy_worker_without_retries_is_worker_lost(net: Network) -> None:
    """The same with no retry left: the caller gets WorkerLost within the
    heartbeat window, not Timeout at its deadline."""
    a, b, c = net(3)
    sender, (_, first) = one_message_on(b, a, c, retries=0, seconds=20.0)
    b.link_down()
    pulled = time.time()
    outcome = ended(sender)
    first.signal(signal.SIGKILL)  # it would finish its 20 s message before leaving
    report("link down, retries=0", error=outcome.get("error"),
           detect_s=round(outcome["t"] - pulled, 2))
    assert outcome.get("error") == "WorkerLost", outcome
    assert 1.5 * HEARTBEAT <= outcome["t"] - pulled <= DETECT_S  # silence, not at once


@pytest.mark.timeout(60)
def test_a_broker_killed_under_a_busy_worker_still_gets_its_reply(net: Network) -> None:
    """Only the broker dies: the worker that started the message finishes it and
    answers the caller straight (replies never pass through sqm)."""
    a, b, c = net(3)
    sender, (broker, _) = one_message_on(b, a, c, retries=0, seconds=4.0)
    broker.signal(signal.SIGKILL)
    outcome = ended(sender)
    assert outcome.get("ok"), outcome
    assert len(handled(b)) == 1


@pytest.mark.timeout(60)
def test_broker_and_busy_worker_both_killed_is_worker_lost_not_timeout(net: Network) -> None:
    """The known gap. The broker that dispatched a started message and the
    worker running it both die: nobody is left to say WorkerLost. The caller
    must still learn it within the heartbeat window (WorkerLost, as when only
    the worker dies), not a Timeout at its deadline (12 s here)."""
    a, b, c = net(3)
    sender, (broker, first) = one_message_on(b, a, c, retries=0, seconds=20.0, timeout=12.0)
    broker.signal(signal.SIGKILL)
    first.signal(signal.SIGKILL)
    killed = time.time()
    outcome = ended(sender)
    report("broker and worker killed", error=outcome.get("error"),
           after_s=round(outcome["t"] - killed, 2))
    assert outcome.get("error") == "WorkerLost", outcome
    assert outcome["t"] - killed <= DETECT_S


@pytest.mark.timeout(90)
def test_a_broker_host_pulled_mid_load_is_noticed_by_heartbeats_on_both_sides(
        net: Network) -> None:
    """Host A (broker A and a worker) loses its cable mid-load: no FIN, no RST.

    The worker on B hears nothing from broker A for 3 heartbeats and says so;
    broker B hears nothing from A's worker and drops it; the Sender on C stops
    using broker A. Every item still ends with one reply (retries=1), none as
    a Timeout, and the caller never hears twice."""
    a, b, c = net(3)
    pair = Pair(a, b, c)
    sender = c.sender(pair.endpoints, count=MESSAGES, window=MESSAGES, s=0.2, retries=1,
                      timeout=30)
    wait_for(lambda: outcomes(sender) >= 15, 20, "15 replies")
    a.link_down()
    pulled = time.monotonic()
    pulled_after = outcomes(sender)

    # Broker B side: A's worker falls silent and is dropped after 3 heartbeats.
    def workers_on_b() -> int | None:
        st = c.status("q", pair.endpoints[1])
        return None if st is None else int(st["workers_current"])

    wait_for(lambda: workers_on_b() == 1, DETECT_S + 10, "broker B dropping A's worker")
    dropped_s = time.monotonic() - pulled
    # Worker side: B's worker notices broker A's silence (the first failure is logged).
    wait_for(lambda: f"sqm at {pair.endpoints[0]} silent" in pair.workers[1].stderr,
             DETECT_S + 10, "worker B noticing broker A's silence")
    noticed_s = time.monotonic() - pulled

    result = wait_for(sender.summary, 60, "the batch's end")
    check_batch(result, sender)
    report("broker host pulled", pulled_after=pulled_after, dropped_s=round(dropped_s, 2),
           noticed_s=round(noticed_s, 2), **result)
    assert pulled_after < MESSAGES  # mid-load
    assert 1.5 * HEARTBEAT <= dropped_s <= DETECT_S + 4  # silence, seen by heartbeats
    assert noticed_s <= DETECT_S + 4
    assert result["errors"] == {}, f"{result}\n{failures(sender, *pair.brokers, *pair.workers)}"
