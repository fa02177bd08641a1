"""DeadLetterPlugin with a fake server: what is kept, the bound, replay, purge, the journal."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from sqm.core import Fail, Message, QueueCore
from sqm.deadletters import NOT_DEAD, DeadLetterPlugin, replay_message
from sqm.journal import Journal
from sqm.protocol import (
    DISPATCH,
    FLAG_ONEWAY,
    SIGNATURE,
    SUBMIT,
    decode_envelope,
    encode_envelope,
)
from sqm.testing import InProcessBroker
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(30)

NOW = 1_000.0


class FakeServer:
    """What the plugin uses of a QueueServer: name, core, reachable, resubmit."""

    def __init__(self, name: str = "q", connected: tuple[bytes, ...] = ()) -> None:
        self.name = name
        self.core = QueueCore(name, NOW)
        self.connected = set(connected)
        self.told: list[tuple[bytes, list[bytes]]] = []
        self.resubmitted: list[Message] = []

    def reachable(self, rid: bytes, ids: list[bytes]) -> bool:
        if rid not in self.connected:
            return False
        self.told.append((rid, ids))
        return True

    def resubmit(self, now: float, msg: Message) -> bool:
        if not self.core.submit(now, msg):
            return False
        self.resubmitted.append(msg)
        return True


def message(mid: str, payload: bytes = b'{"x": 1}', *, origin: bytes = b"caller",
            method: str = "work", deadline: float = 0.0, oneway: bool = False,
            deliveries: int = 1) -> Message:
    env = encode_envelope(mid.encode(), b"ipc:///tmp/mbox.sock", method.encode(), b"json",
                          oneway=oneway, retries=2, priority=0, deadline=deadline)
    msg = Message(mid.encode(), origin, [SIGNATURE, DISPATCH, env, payload], size=len(payload),
                  oneway=oneway, retries=2, priority=0, deadline=deadline, method=method.encode())
    msg.seq = 1
    msg.deliveries = deliveries
    return msg


def listed(plugin: DeadLetterPlugin, server: Any) -> list[dict[str, Any]]:
    reply = plugin.dead_list(server, NOW, {"cmd": "dead-list"})
    assert reply["ok"]
    return reply["dead"]


def test_a_failure_is_kept_with_reason_attempts_method_serializer_and_payload():
    plugin, server = DeadLetterPlugin(), FakeServer()
    plugin.failed_back(server, message("m1", b"\x00\xffraw", deliveries=3), "WorkerLost")
    [d] = listed(plugin, server)
    assert (d["id"], d["method"], d["reason"], d["attempts"], d["serializer"]) == (
        "m1", "work", "WorkerLost", 3, "json")
    assert base64.b64decode(d["payload"]) == b"\x00\xffraw"
    assert d["failed_at"] > 0 and d["size"] == 5
    status: dict[str, Any] = {}
    plugin.status(server, status)
    assert (status["dead_letters"], status["dead_total"]) == (1, 1)


def test_outcomes_are_generic_except_the_chosen_and_the_stop():
    plugin, server = DeadLetterPlugin(), FakeServer()
    for i, reason in enumerate(["Expired", "TimeLimitExceeded", "RetriesExhausted", *NOT_DEAD]):
        plugin.failed_back(server, message(f"m{i}"), reason)
    assert [d["reason"] for d in listed(plugin, server)] == [
        "Expired", "TimeLimitExceeded", "RetriesExhausted"]
    assert {"Cancelled", "Purged", "BrokerShutdown"} == NOT_DEAD


def test_the_bound_drops_the_oldest_and_the_total_counts_every_one():
    plugin, server = DeadLetterPlugin(limit=3), FakeServer()
    for i in range(5):
        plugin.failed_back(server, message(f"m{i}"), "WorkerLost")
    assert [d["id"] for d in listed(plugin, server)] == ["m2", "m3", "m4"]
    status: dict[str, Any] = {}
    plugin.status(server, status)
    assert (status["dead_letters"], status["dead_total"], status["dead_letters_limit"]) == (3, 5, 3)


def test_queues_are_kept_apart():
    plugin, a, b = DeadLetterPlugin(limit=1), FakeServer("a"), FakeServer("b")
    plugin.failed_back(a, message("x"), "Expired")
    plugin.failed_back(b, message("y"), "Expired")
    assert [d["id"] for d in listed(plugin, a)] == ["x"]
    assert [d["id"] for d in listed(plugin, b)] == ["y"]


def test_list_without_payloads():
    plugin, server = DeadLetterPlugin(), FakeServer()
    plugin.failed_back(server, message("m1"), "Expired")
    [d] = plugin.dead_list(server, NOW, {"cmd": "dead-list", "payloads": False})["dead"]
    assert "payload" not in d and d["size"] == len(b'{"x": 1}')


def test_replay_to_a_connected_caller_keeps_the_envelope_but_the_deadline():
    plugin, server = DeadLetterPlugin(), FakeServer(connected=(b"caller",))
    plugin.failed_back(server, message("m1", deadline=NOW - 5), "Expired")
    reply = plugin.dead_replay(server, NOW, {"cmd": "dead-replay", "ids": ["m1"]})
    assert reply == {"ok": True, "replayed": [{"id": "m1", "to": "caller"}], "refused": [],
                     "missing": []}
    [msg] = server.resubmitted
    env = decode_envelope(msg.frames[2])
    assert (msg.id, msg.origin, msg.oneway, msg.deadline) == (b"m1", b"caller", False, 0.0)
    assert (env.id, env.mailbox, env.method, env.serializer, env.flags) == (
        b"m1", b"ipc:///tmp/mbox.sock", b"work", b"json", 0)
    assert (env.retries, env.priority, env.deadline) == (2, 0, 0.0)
    assert msg.frames[3] == b'{"x": 1}'
    assert server.told == [(b"caller", [b"m1"])]  # the probe: an ACCEPTED notice
    assert listed(plugin, server) == []
    assert server.core.pending == 1  # no worker yet: it waits like any message


def test_replay_to_a_gone_caller_runs_oneway():
    plugin, server = DeadLetterPlugin(), FakeServer(connected=())
    plugin.failed_back(server, message("m1"), "WorkerLost")
    reply = plugin.dead_replay(server, NOW, {"cmd": "dead-replay", "all": True})
    assert reply["replayed"] == [{"id": "m1", "to": "oneway"}]
    [msg] = server.resubmitted
    assert msg.oneway and decode_envelope(msg.frames[2]).flags & FLAG_ONEWAY


def test_replay_of_an_unknown_id_and_a_refused_one():
    plugin, server = DeadLetterPlugin(), FakeServer(connected=(b"caller",))
    server.core.max_pending = 0  # every submit is refused as QueueFull
    plugin.failed_back(server, message("m1"), "WorkerLost")
    reply = plugin.dead_replay(server, NOW, {"cmd": "dead-replay", "ids": ["m1", "nope"]})
    assert reply["replayed"] == [] and reply["missing"] == ["nope"]
    assert reply["refused"] == [{"id": "m1", "error": "QueueFull"}]
    assert not [e for e in server.core.outbox if type(e) is Fail]  # nobody is told
    assert [d["id"] for d in listed(plugin, server)] == ["m1"]  # still a dead letter


def test_replay_needs_ids_or_all():
    plugin, server = DeadLetterPlugin(), FakeServer()
    assert not plugin.dead_replay(server, NOW, {"cmd": "dead-replay"})["ok"]
    assert not plugin.dead_replay(server, NOW, {"cmd": "dead-replay", "ids": [1]})["ok"]


def test_purge_forgets_them_but_not_the_total():
    plugin, server = DeadLetterPlugin(), FakeServer()
    plugin.failed_back(server, message("m1"), "WorkerLost")
    plugin.failed_back(server, message("m2"), "Expired")
    assert plugin.dead_purge(server, NOW, {"cmd": "dead-purge"}) == {"ok": True, "purged": 2}
    status: dict[str, Any] = {}
    plugin.status(server, status)
    assert (status["dead_letters"], status["dead_total"]) == (0, 2)


def test_replay_message_sets_only_the_flags_and_deadline():
    msg = message("m1", deadline=123.0)
    plugin, server = DeadLetterPlugin(), FakeServer()
    plugin.failed_back(server, msg, "Expired")
    dead = plugin.queues["q"].entries[b"m1"]
    again = replay_message(dead, oneway=True)
    assert again is not None
    before, after = decode_envelope(msg.frames[2]), decode_envelope(again.frames[2])
    assert (after.flags, after.deadline) == (FLAG_ONEWAY, 0.0)
    assert (before.deadline, before.flags) == (123.0, 0)
    assert len(again.frames[2]) == len(msg.frames[2])
    assert again.frames[2][18:] == msg.frames[2][18:]  # id, mailbox, method, serializer as sent


def test_journaled_dead_letters_survive_a_restart_within_the_bound(tmp_path: Path):
    path = str(tmp_path / "j.db")
    journal = Journal(path)
    plugin, server = DeadLetterPlugin(journal=journal), FakeServer(connected=(b"caller",))
    plugin.recover(server, NOW)
    for i in range(4):
        plugin.failed_back(server, message(f"m{i}", bytes([i]) * 3), "WorkerLost")
    plugin.dead_replay(server, NOW, {"cmd": "dead-replay", "ids": ["m0"]})
    journal.commit()
    journal.close()

    journal = Journal(path)
    again, server = DeadLetterPlugin(limit=2, journal=journal), FakeServer()
    again.recover(server, NOW)
    dead = listed(again, server)
    assert [d["id"] for d in dead] == ["m2", "m3"]  # m0 replayed, m1 dropped by the new bound
    assert base64.b64decode(dead[0]["payload"]) == b"\x02\x02\x02"
    assert dead[0]["reason"] == "WorkerLost" and dead[0]["attempts"] == 1
    journal.commit()
    assert len(journal.load_dead("q")) == 2
    again.dead_purge(server, NOW, {"cmd": "dead-purge"})
    journal.commit()
    assert journal.load_dead("q") == []
    journal.close()


def test_in_the_broker_only_accepted_failures_count_and_ends_stay_untracked():
    """The real server: refusals at submit and operator purges are not dead letters, and
    the plugin does not switch the per-message Ended tracking on (the hot path)."""
    with InProcessBroker("q", plugins=[DeadLetterPlugin()]) as b:
        assert b.broker.queues[0].core.track_ends is False
        sock = b.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(b.endpoint)

        def submit(mid: str, deadline: float) -> None:
            env = encode_envelope(mid.encode(), b"inproc://mbox-unit", b"work", b"json",
                                  deadline=deadline)
            sock.send_multipart([SIGNATURE, SUBMIT, env, b"{}"])

        submit("refused", time.time() - 10)  # expired on arrival: refused, never accepted
        submit("purged", 0.0)
        wait_for(lambda: b.status()["pending"] == 1, 10, "one pending")
        assert b.control("purge")["purged"] == 1
        submit("expired", time.time() + 0.2)
        wait_for(lambda: b.status()["expired_total"] == 2, 10, "two expired")
        st = b.status()
        assert (st["dead_letters"], st["dead_total"]) == (1, 1)
        [d] = b.control("dead-list")["dead"]
        assert (d["id"], d["reason"]) == ("expired", "Expired")
        sock.close(0)
