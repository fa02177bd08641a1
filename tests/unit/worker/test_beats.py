"""The process's heartbeat thread (worker/beats.py): groups, the messages of a beat,
joining and leaving, and the re-sent ACKs, on real sockets (a ROUTER stands in
for sqm). Waits are for conditions, never fixed sleeps."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from sqm.protocol import GIVE_BACK, HEARTBEAT, SIGNATURE, MailboxPolicy, pack_ids, unpack_ids
from sqm.security.keys import KeyPair
from tests.conftest import wait_for
from worker.beats import Beater, Group, Member
from worker.links import ReportPlan
from worker.mailboxes import MailboxPool

pytestmark = pytest.mark.timeout(30)


def member(name: str, ctx: zmq.Context, endpoints: list[str], hb: float = 30.0, *,
           packed: bool = True, curve: tuple[KeyPair, bytes] | None = None,
           acks: list[Any] | None = None) -> Member:
    plan = ReportPlan(endpoints, hb, rng=lambda: 0.0)
    for e in endpoints:  # watched, report every 100 beats: the first one not due yet
        plan.watch(e, 100 * hb, 0.0, packed=packed)

    def ack_again(pool: MailboxPool, running: dict[bytes, Any],
                  before: set[bytes]) -> set[bytes]:
        if acks is not None:
            acks.append((name, dict(running), set(before)))
        return set(running)

    return Member(name, ctx, endpoints, hb, curve, plan, {}, lambda: b'{"r": 1}', ack_again,
                  lambda: MailboxPool(ctx, MailboxPolicy(), linger_ms=0))


def fake_broker() -> tuple[zmq.Context, zmq.Socket, str]:
    """A context, and a ROUTER standing for sqm on a free local port (and its endpoint)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind("tcp://127.0.0.1:*")
    return ctx, router, router.getsockopt(zmq.LAST_ENDPOINT).decode()


def test_workers_sharing_context_endpoint_keys_and_interval_form_one_group() -> None:
    ctx, other_ctx = zmq.Context(), zmq.Context()
    beater = Beater()
    pair = KeyPair(b"p" * 40, b"s" * 40)
    a, b = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"
    ms = [member("m1", ctx, [a]), member("m2", ctx, [a]),
          member("slower", ctx, [a], hb=60.0), member("own-ctx", other_ctx, [a]),
          member("keyed", ctx, [a], curve=(pair, b"k" * 40)), member("two", ctx, [a, b])]
    try:
        for m in ms:
            beater.register(m)
        assert sorted(beater.groups()) == sorted([
            (a, ["m1", "m2", "two"]), (a, ["slower"]), (a, ["own-ctx"]), (a, ["keyed"]),
            (b, ["two"])])
        assert beater.unregister(ms[1], timeout=5)  # its group stays, without it
        assert beater.unregister(ms[3], timeout=5)  # its group (and socket) goes
        assert sorted(beater.groups()) == sorted([
            (a, ["m1", "two"]), (a, ["slower"]), (a, ["keyed"]), (b, ["two"])])
        other_ctx.term()  # would hang with the group's socket still open
        for m in ms[:1] + ms[2:3] + ms[4:]:
            assert beater.unregister(m, timeout=5)
        assert beater.groups() == []
        wait_for(lambda: beater._thread is None, 5, "the thread to end with the last worker")
    finally:
        for m in ms:
            beater.unregister(m, timeout=5)
        ctx.term()


def test_one_beat_lists_every_worker_reports_and_older_brokers_go_alone() -> None:
    ctx = zmq.Context()
    e = "tcp://127.0.0.1:1"
    try:
        m1, m2, m3 = member("m1", ctx, [e]), member("m2", ctx, [e]), member("m3", ctx, [e])
        group = Group((0, e, None, 30.0), m1, e, 0.0)
        assert group.frames([m1, m2, m3], 1.0) == [
            [SIGNATURE, HEARTBEAT, b"", pack_ids([b"m1", b"m2", b"m3"])]]
        m2.running[b"id"] = b"mbox"  # a callback runs: its report goes with every beat
        old = member("old", ctx, [e], packed=False)  # its broker did not say it reads them
        assert group.frames([m1, m2, m3, old], 2.0) == [
            [SIGNATURE, HEARTBEAT, b"", pack_ids([b"m1", b"m3"])],
            [SIGNATURE, HEARTBEAT, b"old"],
            [SIGNATURE, HEARTBEAT, b"m2", b'{"r": 1}']]
        assert group.frames([m1], 3.0) == [[SIGNATURE, HEARTBEAT, b"m1"]]  # alone: as ever
    finally:
        ctx.term()


def test_the_thread_beats_for_all_then_without_one_that_left_and_acks_running_ones() -> None:
    ctx, router, e = fake_broker()
    beater = Beater()
    acks: list[Any] = []
    ms = [member(f"m{i}", ctx, [e], hb=0.1, acks=acks) for i in range(3)]
    ms[0].running[b"id:1"] = b"mbox"
    try:
        for m in ms:
            beater.register(m)

        def beat_listing(ids: list[bytes]) -> bool:
            while router.poll(50):
                frames = router.recv_multipart()[1:]
                if len(frames) == 4 and frames[2] == b"" and unpack_ids(frames[3]) == ids:
                    return True
            return False

        wait_for(lambda: beat_listing([b"m1", b"m2"]), 5, "a beat for m1, m2 (m0 reports)")
        assert beater.unregister(ms[1], timeout=5)
        # m1 left: from now on the beat lists m2 alone, sent as its own 3-frame beat
        got: list[list[bytes]] = []

        def lone_m2() -> bool:
            while router.poll(50):
                got.append(router.recv_multipart()[1:])
            return [SIGNATURE, HEARTBEAT, b"m2"] in got

        wait_for(lone_m2, 5, "a beat without m1")
        # Only the worker with a running message re-sends ACKs, from the second beat on.
        wait_for(lambda: len(acks) >= 2, 5, "two ACK rounds for m0")
        assert {a[0] for a in acks} == {"m0"}
        assert acks[1] == ("m0", {b"id:1": b"mbox"}, {b"id:1"})
    finally:
        for m in ms:
            beater.unregister(m, timeout=5)
        router.close(0)
        ctx.term()


def test_sqm_asks_a_reclaim_on_the_heartbeat_connection_and_the_thread_sleeps_between() -> None:
    """sqm's ``[SQM1, G, worker-id]`` on a group's socket reaches that member's reclaim()
    (its runner is in a callback: only this thread reads); between beats and asks the
    thread sleeps in its poll (a handful of wake-ups, not a spin)."""
    ctx, router, e = fake_broker()
    beater = Beater()
    ms = [member(f"m{i}", ctx, [e], hb=0.2) for i in range(2)]
    asked: list[str] = []
    for m in ms:
        m.reclaim = lambda name=m.worker_id: asked.append(name)
    try:
        for m in ms:
            beater.register(m)
        rid: list[bytes] = []

        def beats(n: int) -> bool:
            while router.poll(50):
                frames = router.recv_multipart()
                rid.append(frames[0])  # the heartbeat connection, as sqm learns it
            return len(rid) >= n

        wait_for(lambda: beats(1), 5, "a beat")
        router.send_multipart([rid[-1], SIGNATURE, GIVE_BACK, b"m1"])
        router.send_multipart([rid[-1], SIGNATURE, GIVE_BACK, b"stranger"])  # not ours: ignored
        wait_for(lambda: asked == ["m1"], 5, "m1's reclaim called")
        assert beater.reclaims == 1
        wakes, seen = beater.wakes, len(rid)
        wait_for(lambda: beats(seen + 3), 5, "three more beats (0.2 s apart)")
        assert beater.wakes - wakes <= 10, f"{beater.wakes - wakes} wake-ups in ~0.6 s: a spin"
    finally:
        for m in ms:
            beater.unregister(m, timeout=5)
        router.close(0)
        ctx.term()


def test_the_heartbeat_connection_is_up_for_reclaim_asks_before_the_first_beat() -> None:
    """sqm asks a reclaim on the heartbeat connection from the worker's HELLO on (it
    names the connection's routing id), and a ROUTER drops what it sends to a peer
    not connected yet: the thread connects a group at once, not at its first beat.

    The interval is 600 s, so the first beat is at least 60 s away (a tenth of an
    interval), past this test's timeout: what reaches reclaim() came before any beat.
    """
    ctx, router, e = fake_broker()
    router.router_mandatory = True  # a send to a peer not connected raises, not drops
    beater = Beater()
    m = member("early", ctx, [e], hb=600.0)
    asked: list[str] = []
    m.reclaim = lambda: asked.append("early")
    try:
        beater.register(m)
        rid = beater.beat_id(m, e)
        assert rid is not None

        def ask() -> bool:
            try:
                router.send_multipart([rid, SIGNATURE, GIVE_BACK, b"early"])
            except zmq.ZMQError as exc:  # EHOSTUNREACH: not connected (yet)
                assert exc.errno == zmq.EHOSTUNREACH
                return False
            return True

        wait_for(ask, 10, "the heartbeat connection up")
        wait_for(lambda: asked == ["early"], 5, "reclaim called")
        assert beater.sent == 0, "no beat was sent: the connection came up on its own"
    finally:
        beater.unregister(m, timeout=5)
        router.close(0)
        ctx.term()
