"""A Sender given several brokers: round-robin over live ones, failover, set_endpoints.

Two ``sqm serve`` processes, A and B, serve queue ``q`` on two tcp ports,
each with its own worker process(es). The Sender keeps one connection per
broker and notices a dead one by its disconnect (SIGKILL) or by missing
ZMTP heartbeats (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import zmq

from sender import AsyncSender, Sender
from sender._correlator import Correlator
from sender._links import DOWN, UP, UP_EVENTS, Links
from sqm.config import resolve
from sqm.protocol import ACCEPTED, ACK, SIGNATURE, decode_envelope, pack_ids
from sqm.zmqfast import recv_frames, send_frames
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(120)

APPS = "tests.apps.batch:callbacks"
HB = 0.2  # heartbeat of brokers, workers and senders here


def tcp() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def pids(cluster, endpoint) -> set[int]:
    return {w["pid"] for w in cluster.status("q", endpoint=endpoint)["workers"]}


def link_state(s, endpoint):
    s.poll()  # take in connect/disconnect events
    return {link.endpoint: link.state for link in s._links.links}.get(endpoint)


@pytest.fixture
def brokers(cluster):
    a, b = tcp(), tcp()
    pa = cluster.serve("q", endpoint=a, heartbeat=HB)
    pb = cluster.serve("q", endpoint=b, heartbeat=HB)
    return a, b, pa, pb


def test_batch_survives_a_broker_killed_mid_batch(cluster, brokers):
    a, b, pa, pb = brokers
    # A's lone worker takes one at a time: what A holds waits in A, where the kill loses it
    cluster.worker("q", "--prefetch", "1", target=APPS, endpoint=a, heartbeat=HB)
    cluster.worker("q", target=APPS, endpoint=b, processes=2, heartbeat=HB)
    payloads = [{"x": i, "s": 0.05} for i in range(80)]
    with Sender("q", endpoint=[a, b], heartbeat=HB, timeout=30) as s:
        wait_for(lambda: link_state(s, a) == UP and link_state(s, b) == UP, 10, "both connected")
        items = []
        for item in s.map("square", payloads, max_concurrent=20):
            items.append(item)
            if len(items) == 10:
                # A holds about half the window: one running, the rest pending
                assert cluster.status("q", endpoint=a)["pending"] > 0
                pa.signal(signal.SIGKILL)
        assert pa.wait(5) == -signal.SIGKILL
        assert items == [i * i for i in range(80)]  # every item, once, correct
        assert s._links.resent > 0  # what A had pending went through B
        assert link_state(s, a) == DOWN
        assert s.outstanding == 0
        # and the sender goes on with the broker it has left
        assert s.rpc("square", 9) == 81


def test_hung_broker_is_noticed_within_three_heartbeats(cluster, brokers):
    a, b, pa, pb = brokers
    cluster.worker("q", target=APPS, endpoint=a, heartbeat=HB)
    cluster.worker("q", target=APPS, endpoint=b, heartbeat=HB)
    with Sender("q", endpoint=f"{a},{b}", heartbeat=HB, timeout=30) as s:
        wait_for(lambda: link_state(s, a) == UP and link_state(s, b) == UP, 10, "both connected")
        pa.signal(signal.SIGSTOP)  # alive to the kernel, silent to ZeroMQ
        try:
            t0 = time.monotonic()
            ids = [s.submit("square", i, timeout=30) for i in range(10)]  # ~5 go to A
            wait_for(lambda: link_state(s, a) == DOWN, 10, "A noticed as gone")
            noticed = time.monotonic() - t0
            assert noticed < 3 * HB + 1.0, f"noticed after {noticed:.2f} s"
            assert [s.receive(id=mid) for mid in ids] == [i * i for i in range(10)]
            assert s._links.resent >= 1
        finally:
            pa.signal(signal.SIGCONT)


def test_restarted_broker_gets_what_it_never_accepted(cluster):
    a = tcp()
    first = cluster.serve("q", endpoint=a, heartbeat=HB)
    worker = cluster.worker("q", target=APPS, endpoint=a, heartbeat=HB)
    with Sender("q", endpoint=a, heartbeat=HB, timeout=30) as s:
        assert s.rpc("square", 2) == 4
        first.signal(signal.SIGSTOP)
        # Written to a broker that will never read them: lost with it.
        ids = [s.submit("square", i, timeout=30) for i in range(5)]
        assert not any(s.accepted(mid) for mid in ids)
        first.signal(signal.SIGKILL)
        assert first.wait(5) == -signal.SIGKILL
        cluster.serve("q", endpoint=a, heartbeat=HB)
        cluster.wait_workers("q", 1, endpoint=a, proc=worker)
        # Once reconnected, the Sender re-sends what sqm never ACCEPTED.
        assert [s.receive(id=mid) for mid in ids] == [i * i for i in range(5)]
        assert s._links.resent == 5


def test_set_endpoints_moves_traffic_and_rescues_a_dead_brokers_messages(cluster, brokers):
    a, b, pa, pb = brokers
    cluster.worker("q", target=APPS, endpoint=b, processes=2, heartbeat=HB)
    on_b = pids(cluster, b)
    with Sender("q", endpoint=a, heartbeat=HB, timeout=30) as s:
        assert s.endpoints == (a,)
        ids = [s.submit("pid", i, timeout=30) for i in range(5)]  # A has no worker: pending
        wait_for(lambda: all(s.accepted(mid) for mid in ids), 10, "A accepts them")
        pa.signal(signal.SIGKILL)
        wait_for(lambda: link_state(s, a) == DOWN, 10, "A noticed as gone")
        s.set_endpoints([b])
        assert s.endpoints == (b,) and s.endpoint == b
        assert {s.receive(id=mid) for mid in ids} <= on_b  # re-sent through B
        assert s.rpc("pid") in on_b

    c = tcp()
    cluster.serve("q", endpoint=c, heartbeat=HB)
    cluster.worker("q", target=APPS, endpoint=c, heartbeat=HB)
    on_c = pids(cluster, c)
    with Sender("q", endpoint=b, heartbeat=HB, timeout=30) as s:
        s.set_endpoints(f"{b},{c}")
        wait_for(lambda: link_state(s, c) == UP, 10, "C connected")
        seen = {r["pid"] for r in s.map("sleep", [{"s": 0.02}] * 30, max_concurrent=6)}
        assert seen & on_b and seen & on_c  # both brokers' workers did some
        s.set_endpoints([c])
        assert [link.endpoint for link in s._links.links] == [c]
        assert {r["pid"] for r in s.map("sleep", [{"s": 0}] * 10)} <= on_c


def test_async_sender_fails_over_and_set_endpoints(cluster, brokers):
    a, b, pa, pb = brokers
    cluster.worker("q", target=APPS, endpoint=a, heartbeat=HB)
    cluster.worker("q", target=APPS, endpoint=b, processes=2, heartbeat=HB)

    async def main():
        async with AsyncSender("q", endpoint=[a, b], heartbeat=HB, timeout=30) as s:
            assert await s.rpc("square", 3) == 9
            items = []
            async for item in s.map("square", [{"x": i, "s": 0.05} for i in range(60)],
                                    max_concurrent=20):
                items.append(item)
                if len(items) == 10:
                    pa.signal(signal.SIGKILL)
            assert items == [i * i for i in range(60)]
            s.set_endpoints([b])
            assert s.endpoints == (b,)
            assert await s.rpc("square", 4) == 16
            assert s.outstanding == 0

    asyncio.run(asyncio.wait_for(main(), 60))


# ---------------------------------------------------------------- the re-send rules alone


def test_resend_rules_on_inproc_sockets(rundir):
    """Links on inproc sockets, events fed by hand: who gets re-sent where."""
    ctx = zmq.Context.instance()
    eps = [f"inproc://links-{rundir.name}-{n}" for n in "ab"]
    routers = {}
    for ep in eps:
        routers[ep] = ctx.socket(zmq.ROUTER)
        routers[ep].bind(ep)
    core = Correlator(resolve("q"), serializer="json", allow_pickle=False, max_message_size=1 << 20)
    core.set_mailbox("ipc:///tmp/mbox-links.sock")
    opened = []

    def opener(link):
        sock = ctx.socket(zmq.DEALER)
        sock.connect(link.endpoint)
        link.sock = link.raw = sock
        opened.append(link.endpoint)

    def closer(link, linger):
        link.sock.close(linger)
        link.sock = link.raw = None

    def received(ep):
        got = []
        while routers[ep].poll(200):
            got.append(recv_frames(routers[ep])[3])  # [rid, SIG, S, envelope, payload]
        return [decode_envelope(env).id.decode() for env in got]

    try:
        links = Links(core, eps, opener, closer, heartbeat=0.5)
        a, b = links.links
        links.event(a, UP_EVENTS, 0.0)
        links.event(b, UP_EVENTS, 0.0)
        ids = []
        for i in range(6):
            mid, frames = core.encode_submit("m", i, oneway=False, timeout=None, retries=0)
            link = links.pick()
            send_frames(link.raw, frames)
            core.sent[mid] = (frames, link, link.epoch)
            ids.append(mid)
        on_a, on_b = received(a.endpoint), received(b.endpoint)
        assert sorted(on_a + on_b) == sorted(ids) and len(on_a) == len(on_b) == 3
        core.feed([SIGNATURE, ACK, on_a[0].encode()], False)  # a worker has it
        core.feed([SIGNATURE, ACCEPTED, pack_ids([on_a[1].encode()])], True)  # A has it

        # A dies while B is up: all that no worker took moves to B, K or not;
        # without FLAG_ACK only after two heartbeats without a worker's ACK
        # (a worker may run it and say so at its next beat).
        links.event(a, int(zmq.EVENT_DISCONNECTED), 1.0)
        assert received(b.endpoint) == []
        assert links.due(1.9) == 2.0 and received(b.endpoint) == []
        links.due(2.0)
        assert received(b.endpoint) == on_a[1:]
        assert opened.count(a.endpoint) == 2  # A's DEALER re-created: stale copies dropped
        assert links.resent == 2

        # B drops and comes back, nobody else up: only what B never accepted
        # is re-sent to it, one grace period after the reconnect.
        core.feed([SIGNATURE, ACCEPTED, pack_ids([on_b[0].encode()])], True)
        links.event(b, int(zmq.EVENT_DISCONNECTED), 2.0)
        assert received(b.endpoint) == []  # nowhere to go while nothing is up
        links.event(b, UP_EVENTS, 3.0)
        assert links.due(3.2) == 3.5 and received(b.endpoint) == []
        links.due(3.6)
        again = received(b.endpoint)
        assert sorted(again) == sorted(on_b[1:] + on_a[1:]) and on_b[0] not in again
        assert links.due(4.0) == float("inf")  # done; nothing more scheduled
        links.close(0)
    finally:
        for r in routers.values():
            r.close(0)
