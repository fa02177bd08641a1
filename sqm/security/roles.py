"""Who may send which command: the rights table of a secured sqm.

Pure data and functions over the wire command bytes of :mod:`sqm.protocol`,
so the broker's check is one set lookup and the table is tested on its own.

The ZAP User-Id of an authenticated peer is its roles joined by commas in
the fixed order of :data:`ROLES` (e.g. ``"sender,worker"``), see
:func:`user_id`. A role string rather than the key itself, because the
broker needs rights, not identity: at most seven distinct User-Ids exist,
:data:`RIGHTS_BY_USER_ID` maps each to its rights once at import, and that
table never changes when key directories are reloaded, so the broker thread
shares no mutable state with the ZAP thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations

from ..protocol import (
    BYE,
    CONTROL,
    CREDIT,
    DONE,
    DONE_FAILED,
    GIVE_BACK,
    HEARTBEAT,
    HELLO,
    NACK,
    STATUS,
    SUBMIT,
)

SENDER = "sender"
WORKER = "worker"
ADMIN = "admin"
#: Every role, in User-Id order.
ROLES = (SENDER, WORKER, ADMIN)
#: The folder of ``--clients DIR`` that grants each role.
ROLE_DIRS = {SENDER: "senders", WORKER: "workers", ADMIN: "admins"}

#: b"Z" (CANCEL: a sender cancels its own message; sqm checks it is the
#: originator) and b"T" (RETRY: a worker reschedules the message it holds).
_SUBMITTING = frozenset({SUBMIT, STATUS, b"Z"})
#: b"M" (ABILITIES: the methods a worker serves) and b"V" (FORWARD: hand the
#: message held on) are worker commands too; spelled here so this table does
#: not depend on when they join sqm.protocol.
_SERVING = frozenset({HELLO, DONE, DONE_FAILED, HEARTBEAT, NACK, CREDIT, GIVE_BACK, BYE,
                      b"M", b"V", b"T"})

#: Commands a peer may send to sqm, by role. Anything not listed (including a
#: command added to the protocol later) is refused: fail closed.
RIGHTS: dict[str, frozenset[bytes]] = {
    SENDER: _SUBMITTING,
    WORKER: _SUBMITTING | _SERVING,
    ADMIN: _SUBMITTING | _SERVING | {CONTROL},
}

#: Commands every admitted peer may send, whatever its roles: the ZAP handler
#: admits only keys with at least one role, so the broker need not read the
#: User-Id of these (SUBMIT, the hot one, among them).
ADMITTED_MAY: frozenset[bytes] = frozenset.intersection(*RIGHTS.values())

#: Control requests (the ``cmd`` of a CONTROL message) that only read state:
#: anyone who may read status may send them. Every other control command is
#: an operator action and needs the admin role.
READ_ONLY_CONTROL = frozenset({"status", "workers"})


def user_id(roles: Iterable[str]) -> str:
    """The canonical User-Id for a set of roles ("" for none)."""
    have = set(roles)
    unknown = have.difference(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s): {', '.join(sorted(unknown))}")
    return ",".join(r for r in ROLES if r in have)


def roles_of(uid: str) -> frozenset[str]:
    """The roles named by a User-Id; unknown names are ignored (grant nothing)."""
    return frozenset(r for r in uid.split(",") if r in RIGHTS)


def _rights(roles: Iterable[str]) -> frozenset[bytes]:
    out: frozenset[bytes] = frozenset()
    for r in roles:
        out = out | RIGHTS.get(r, frozenset())
    return out


#: Every canonical User-Id -> the commands it may send. The broker's lookup.
RIGHTS_BY_USER_ID: dict[str, frozenset[bytes]] = {
    user_id(combo): _rights(combo)
    for n in range(1, len(ROLES) + 1)
    for combo in combinations(ROLES, n)
}


def rights_of(uid: str) -> frozenset[bytes]:
    """What a peer with this User-Id may send (nothing for an unknown one)."""
    found = RIGHTS_BY_USER_ID.get(uid)
    return found if found is not None else _rights(roles_of(uid))


def allowed(roles: Iterable[str], command: bytes) -> bool:
    """True when a peer with ``roles`` may send wire ``command`` to sqm."""
    return any(command in RIGHTS.get(r, ()) for r in roles)


def control_allowed(roles: Iterable[str], name: str) -> bool:
    """True when ``roles`` may send the control request ``name`` (e.g. "drain")."""
    have = set(roles)
    if ADMIN in have:
        return True
    return name in READ_ONLY_CONTROL and any(STATUS in RIGHTS.get(r, ()) for r in have)
