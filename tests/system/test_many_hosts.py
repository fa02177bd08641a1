"""sqm across hosts: each process on its own network namespace (tests/system/hosts.py)."""

from __future__ import annotations

import json
import re

from tests.conftest import read_log, wait_for
from tests.system.hosts import Host, HostProc, Network

PORT = 5555

# Sends one rpc, prints its result as JSON, then holds the Sender open (and so
# its mailbox) until a line arrives on stdin.
RPC_SENDER = """
import json, sys
from sender import Sender
with Sender("q", endpoint=sys.argv[1], timeout=15) as s:
    print(json.dumps(s.rpc("record", {"from": sys.argv[2]})), flush=True)
    sys.stdin.readline()
"""


def alive_or_fail(proc: HostProc) -> None:
    if proc.popen.poll() is not None:
        raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.stderr}")


def tcp_peers(host: Host) -> set[tuple[str, int]]:
    """Remote (address, port) of the host's established TCP connections."""
    out = host.call(["ss", "-Htn", "state", "established"]).stdout
    peers = set()
    for line in out.splitlines():
        match = re.search(r"\s(\d+\.\d+\.\d+\.\d+):(\d+)\s*$", line)
        if match:
            peers.add((match.group(1), int(match.group(2))))
    return peers


def test_rpc_across_three_hosts(net: Network) -> None:
    """Broker on A, worker on B, Sender on C: the reply needs C's mailbox reachable from B."""
    a, b, c = net(3)
    endpoint = f"tcp://{a.addr}:{PORT}"
    broker = a.serve("q", endpoint, "--heartbeat", "0.2")

    def answering() -> bool:
        alive_or_fail(broker)
        return c.status("q", endpoint, timeout=1.0) is not None

    wait_for(answering, 20, "sqm on host A answering host C")
    worker = b.sqm("worker", "tests.apps:callbacks", "--queue", "q", "--endpoint", endpoint,
                   "--heartbeat", "0.2")

    def registered() -> bool:
        alive_or_fail(worker)
        st = c.status("q", endpoint, timeout=1.0)
        return st is not None and st["workers_current"] == 1

    wait_for(registered, 20, "the worker on host B registered with sqm on host A")

    sender = c.python("-c", RPC_SENDER, endpoint, c.label, name="sender", stdin=True)

    def replied() -> bool:
        alive_or_fail(sender)
        return bool(sender.stdout.strip())

    wait_for(replied, 30, f"the rpc's reply on host C; sender stderr:\n{sender.stderr}")
    reply = json.loads(sender.stdout)
    assert reply["payload"] == {"from": c.label}
    # The worker on B handled it (its own log, in B's run directory)...
    handled = read_log(b.rundir / "handled.jsonl")
    assert [(r["kind"], r["payload"], r["pid"]) for r in handled] == [
        ("record", {"from": c.label}, reply["pid"])
    ]
    # ...and answered straight to the Sender's mailbox on C, not through A: B holds
    # a connection to C's address (C's own broker connection goes to A's port).
    b_peers = tcp_peers(b)
    assert (a.addr, PORT) in b_peers
    mailbox_peers = {(addr, port) for addr, port in b_peers if addr == c.addr}
    assert mailbox_peers, f"B has no connection to C's mailbox; B's peers: {b_peers}"
    assert (a.addr, PORT) in tcp_peers(c)

    sender.write("done\n")
    assert sender.wait(15) == 0, sender.stderr


def test_the_mailbox_binds_on_the_address_that_reaches_the_broker(net: Network) -> None:
    """A Sender on C talking to a broker on A: its mailbox is C's address on the
    switch (what A's workers can reach), never loopback or a wildcard."""
    a, c = net(2)
    endpoint = f"tcp://{a.addr}:{PORT}"
    broker = a.serve("q", endpoint)
    c.wait_serving(broker, endpoint)
    sender = c.sender([endpoint], mode="idle")
    mailbox = wait_for(sender.said, 20, f"the mailbox line; {sender.stderr}")[0]["mailbox"]
    assert re.fullmatch(rf"tcp://{re.escape(c.addr)}:\d+", mailbox), mailbox
    sender.write("done\n")
    assert sender.wait(15) == 0, sender.stderr


def test_the_mailbox_across_two_brokers_on_two_hosts(net: Network) -> None:
    """Brokers on A and B, a worker on D registered with both, a Sender on C
    spreading over both: one mailbox on C's address, and every reply reaches it
    whichever broker dispatched the message."""
    a, b, c, d = net(4)
    endpoints = [f"tcp://{a.addr}:{PORT}", f"tcp://{b.addr}:{PORT}"]
    brokers = [a.serve("q", endpoints[0]), b.serve("q", endpoints[1])]
    worker = d.worker(endpoints)
    for broker, endpoint in zip(brokers, endpoints, strict=True):
        c.wait_serving(broker, endpoint, workers=1)
    worker.check_alive()
    sender = c.sender(endpoints, count=20, window=10, timeout=15)
    result = wait_for(sender.summary, 30, "the batch's end")
    mailbox = sender.said()[0]["mailbox"]
    assert re.fullmatch(rf"tcp://{re.escape(c.addr)}:\d+", mailbox), mailbox
    assert result["items"] == result["replies"] == 20 and result["errors"] == {}, result
    assert all(line["ok"] for line in sender.said() if "i" in line)
    # Both brokers dispatched some of them (the Sender spreads round-robin).
    for endpoint in endpoints:
        st = c.status("q", endpoint)
        assert st is not None and st["assigned_total"] > 0, (endpoint, st)
    # The worker on D answered straight to C's mailbox port.
    mailbox_port = int(mailbox.rpartition(":")[2])
    assert (c.addr, mailbox_port) in tcp_peers(d)
    sender.write("done\n")
    assert sender.wait(15) == 0, sender.stderr


def test_a_sender_beside_a_broker_gets_replies_through_the_other_broker_too(
        net: Network) -> None:
    """A Sender on broker host A lists its local broker by loopback first and
    broker B second; the worker on C serves both. The mailbox must be where
    C can reach it (A's address), not A's loopback (what the first endpoint
    alone would give): every reply, through either broker, reaches it."""
    a, b, c = net(3)
    on_a = f"tcp://{a.addr}:{PORT}"
    on_b = f"tcp://{b.addr}:{PORT}"
    brokers = [a.serve("q", f"tcp://0.0.0.0:{PORT}"), b.serve("q", on_b)]
    worker = c.worker([on_a, on_b])
    for broker, endpoint in zip(brokers, (on_a, on_b), strict=True):
        c.wait_serving(broker, endpoint, workers=1)
    worker.check_alive()
    sender = a.sender([f"tcp://127.0.0.1:{PORT}", on_b], count=20, window=10, timeout=10)
    result = wait_for(sender.summary, 40, "the batch's end")
    mailbox = sender.said()[0]["mailbox"]
    errors = {line["msg"] for line in sender.said() if "error" in line}
    assert re.fullmatch(rf"tcp://{re.escape(a.addr)}:\d+", mailbox), (mailbox, result, errors)
    assert result["items"] == result["replies"] == 20, (result, errors)
