"""The rights table, checked exhaustively: every role set against every possible command byte."""

from __future__ import annotations

from itertools import combinations

import pytest

from sqm import protocol
from sqm.security.roles import (
    ADMIN,
    ADMITTED_MAY,
    RIGHTS_BY_USER_ID,
    ROLES,
    SENDER,
    WORKER,
    allowed,
    control_allowed,
    rights_of,
    roles_of,
    user_id,
)

SUBMITTER = {protocol.SUBMIT, protocol.STATUS, protocol.CANCEL}  # CANCEL: its own messages
SERVER = {protocol.HELLO, protocol.DONE, protocol.DONE_FAILED, protocol.HEARTBEAT,
          protocol.NACK, protocol.CREDIT, protocol.GIVE_BACK, protocol.BYE,
          b"M", b"V", protocol.RETRY}  # ABILITIES, FORWARD (spelled in roles.py), RETRY
EXPECTED = {
    SENDER: SUBMITTER,
    WORKER: SUBMITTER | SERVER,
    ADMIN: SUBMITTER | SERVER | {protocol.CONTROL},
}
ALL_ROLE_SETS = [frozenset(c) for n in range(len(ROLES) + 1) for c in combinations(ROLES, n)]
ALL_BYTES = [bytes((i,)) for i in range(256)]


def test_table_covers_every_inbound_command_of_the_protocol() -> None:
    # If protocol.py gains a command a peer sends, this test makes someone decide its rights.
    outbound = {protocol.ACCEPTED, protocol.DISPATCH, protocol.STOP, protocol.ERROR,
                protocol.ACK, protocol.PROGRESS, protocol.RESULT, protocol.BATCHES}
    commands = {v for k, v in vars(protocol).items()
                if k.isupper() and isinstance(v, bytes) and len(v) == 1
                and not k.startswith("FEATURE")}  # ACCEPTED's feature letters, not commands
    assert commands - outbound == EXPECTED[ADMIN]


@pytest.mark.parametrize("roles", ALL_ROLE_SETS, ids=lambda r: ",".join(sorted(r)) or "none")
def test_allowed_exhaustive(roles: frozenset[str]) -> None:
    may = set().union(*(EXPECTED[r] for r in roles)) if roles else set()
    for cmd in ALL_BYTES:
        assert allowed(roles, cmd) is (cmd in may), (roles, cmd)
    uid = user_id(roles)
    assert rights_of(uid) == may
    assert roles_of(uid) == roles


def test_the_boundaries_the_spec_names() -> None:
    assert not allowed({SENDER}, protocol.HELLO)  # a sender key cannot register as a worker
    assert not allowed({SENDER}, protocol.CONTROL)  # nor drain/purge/shutdown
    assert allowed({WORKER}, protocol.SUBMIT)  # follow-up work
    assert not allowed({WORKER}, protocol.CONTROL)
    assert allowed({ADMIN}, protocol.CONTROL)
    assert not allowed(set(), protocol.STATUS)


def test_user_ids_are_canonical_and_the_table_is_complete() -> None:
    assert user_id([WORKER, SENDER]) == "sender,worker"
    assert user_id([ADMIN, SENDER, WORKER, SENDER]) == "sender,worker,admin"
    assert user_id([]) == ""
    assert sorted(RIGHTS_BY_USER_ID) == sorted(user_id(r) for r in ALL_ROLE_SETS if r)
    with pytest.raises(ValueError, match="unknown role"):
        user_id(["root"])
    assert rights_of("") == frozenset()
    assert rights_of("anonymous") == frozenset()
    assert rights_of("root,sender") == EXPECTED[SENDER]  # unknown names grant nothing
    assert rights_of("worker,sender") == EXPECTED[WORKER] | EXPECTED[SENDER]


@pytest.mark.parametrize("roles", ALL_ROLE_SETS, ids=lambda r: ",".join(sorted(r)) or "none")
def test_control_commands(roles: frozenset[str]) -> None:
    operator = ["drain", "resume", "purge", "stop-worker", "shutdown", "anything-new"]
    for name in operator:
        assert control_allowed(roles, name) is (ADMIN in roles)
    for name in ["status", "workers"]:
        assert control_allowed(roles, name) is bool(roles)


def test_every_admitted_peer_may_submit_and_read_status() -> None:
    # The broker skips the User-Id read for these; that is only sound while it holds
    # (CANCEL acts only on the peer's own messages: sqm checks the originator).
    assert ADMITTED_MAY == {protocol.SUBMIT, protocol.STATUS, protocol.CANCEL}
    for roles in ALL_ROLE_SETS:
        if roles:
            assert all(allowed(roles, c) for c in ADMITTED_MAY)
