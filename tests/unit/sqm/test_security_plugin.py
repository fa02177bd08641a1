"""SecurityPlugin's rights check on a real QueueServer (hand-made frames, roles given directly)."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import zmq

from sqm import protocol
from sqm.broker.server import BrokerOptions, QueueServer
from sqm.config import resolve
from sqm.plugins import Hooks
from sqm.security.plugin import CACHED, SecurityPlugin

ROLE = {b"Wa": "worker", b"Sa": "sender", b"Aa": "admin", b"Na": ""}
_n = itertools.count()


@pytest.fixture
def server() -> QueueServer:
    plugin = SecurityPlugin(".")
    plugin.user_id_of = lambda peer: ROLE.get(peer.bytes, "")
    name = f"secplug{os.getpid()}x{next(_n)}"
    srv = QueueServer(zmq.Context.instance(), resolve(name, endpoint=f"inproc://{name}"),
                      BrokerOptions(), 1000.0, hooks=Hooks([plugin]))
    yield srv
    srv.close()


def admit(server: QueueServer, rid: bytes, command: bytes) -> bool:
    return all(a(server, zmq.Frame(rid), command) for a in server.hooks.admit)


def test_every_handled_command_is_checked_fail_closed(server: QueueServer) -> None:
    """Whatever commands the server handles (new ones included), a role without the
    right is refused: the check does not depend on a list of known commands."""
    for command in server.handlers:
        if command in (protocol.SUBMIT, protocol.STATUS, protocol.CONTROL, b"Z"):
            assert admit(server, b"Na", command), command  # anyone admitted (CONTROL: by name)
            continue
        assert not admit(server, b"Sa", command), command
        assert not admit(server, b"Na", command), command
        assert admit(server, b"Wa", command) and admit(server, b"Aa", command), command
    st = server.status(1000.0)
    assert st["denied_total"] > 0 and st["secured"] is True


def test_hello_reads_the_role_afresh_and_done_is_cached(server: QueueServer) -> None:
    assert CACHED == {protocol.DONE, protocol.DONE_FAILED}
    assert admit(server, b"Wa", protocol.HELLO)
    ROLE[b"Wa"] = "sender"  # the routing id re-used by a sender's connection
    try:
        assert not admit(server, b"Wa", protocol.HELLO)  # cannot register
        assert not admit(server, b"Wa", protocol.HEARTBEAT)  # nor beat for a worker
    finally:
        ROLE[b"Wa"] = "worker"


def test_control_needs_admin_except_reads(server: QueueServer) -> None:
    for rid, may_drain in ((b"Sa", False), (b"Wa", False), (b"Aa", True)):
        reply = server.control(1000.0, {"cmd": "drain"}, zmq.Frame(rid))
        assert reply["ok"] is may_drain, (rid, reply)
        if not may_drain:
            assert reply["error_type"] == "AuthError" and "admin" in reply["error"]
        server.control(1000.0, {"cmd": "resume"}, zmq.Frame(b"Aa"))
        assert server.control(1000.0, {"cmd": "status"}, zmq.Frame(rid))["ok"]
    assert json.dumps(server.status(1000.0))  # status stays JSON with the plugin's fields


def test_compact_messages_are_checked_as_their_classic_form(server: QueueServer) -> None:
    """A compact DONE is DONE to the rights check: a sender's is refused, as the 3-frame one."""
    assert set(server.compact_handlers) == set(protocol.COMPACT_COMMANDS)
    done = protocol.COMPACT_DONE + protocol.pack_ids([b"m:1"])
    denied = server.status(1000.0)["denied_total"]
    server._route(zmq.Frame(b"Sa"), [done], 1000.0)
    assert server.status(1000.0)["denied_total"] == denied + 1
    server._route(zmq.Frame(b"Wa"), [done], 1000.0)  # a worker's passes (unknown: told BYE)
    assert server.status(1000.0)["denied_total"] == denied + 1
    env = protocol.encode_envelope(b"m:2", b"inproc://mailbox", b"w", b"json")
    server._route(zmq.Frame(b"Na"), [protocol.COMPACT_SUBMIT + env + b"{}"], 1000.0)
    assert server.core.pending == 1  # SUBMIT: anyone admitted
