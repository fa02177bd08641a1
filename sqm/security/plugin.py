"""The broker side of security: ZAP admission and role rights at the plugin seam.

:class:`SecurityPlugin` starts the ZAP handler (:mod:`.auth`) on the
broker's context before any socket binds, and decides each input's right
from the peer's ZAP User-Id (its role string, :mod:`.roles`):

- SUBMIT and STATUS (:data:`~.roles.ADMITTED_MAY`) pass without a look:
  every admitted key may send them, so the hot path reads no metadata;
- DONE and DONE_FAILED (one per message) use the rights cached per routing
  id (set at HELLO, or read from the User-Id the first time); every other
  command reads the User-Id afresh (a routing id may be re-used by a later
  connection: the role that registers a worker, beats for one or runs an
  operator command is the current one; see :data:`CACHED` for why the
  cache is safe);
- a refusal is answered ``ERROR AuthError`` (the caller raises
  :class:`~sqm.errors.AuthError`), logged once per peer and counted in
  ``denied_total``.

Installed only on a secured sqm: an insecure one has no admit hook at all.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import zmq

from ..plugins import Plugin
from ..protocol import CONTROL, DONE, DONE_FAILED, HELLO
from ..wire import COMMANDS
from .auth import BrokerAuthenticator
from .roles import ADMITTED_MAY, RIGHTS_BY_USER_ID, control_allowed, roles_of

if TYPE_CHECKING:
    from ..broker.server import QueueServer

log = logging.getLogger("sqm.security")

#: Peers whose rights are remembered; the cache is emptied when it grows past this.
MAX_CACHED_PEERS = 100_000
#: Peers remembered as already logged (each refused peer is logged once).
MAX_LOGGED_PEERS = 10_000

_NONE: frozenset[bytes] = frozenset()
#: The per-message worker commands whose rights are cached per routing id.
#: From a routing id that is not a registered worker they do nothing, and a
#: secured worker's routing id is random, unpublished and cannot be taken
#: over (no ROUTER hand-over): so a cached entry outliving its connection
#: grants nothing. Every other command reads the User-Id each time.
CACHED = frozenset({DONE, DONE_FAILED})


def peer_user_id(peer: zmq.Frame) -> str:
    """The ZAP User-Id ZeroMQ attached to a message ("" if none)."""
    try:
        uid = peer.get("User-Id")
    except zmq.ZMQError:
        return ""
    return uid if isinstance(uid, str) else ""


class SecurityPlugin(Plugin):
    """ZAP over ``clients_dir`` plus the rights check, for every queue of one sqm."""

    def __init__(self, clients_dir: str | os.PathLike[str]) -> None:
        self.clients_dir = os.fspath(clients_dir)
        self.authenticator: BrokerAuthenticator | None = None
        self.denied: dict[str, int] = {}  # queue name -> refused inputs
        self._rights: dict[bytes, frozenset[bytes]] = {}
        self._logged: set[bytes] = set()
        #: Reads a peer's ZAP User-Id (replaceable in tests and the fuzzer,
        #: whose hand-made frames carry no metadata).
        self.user_id_of = peer_user_id

    # ------------------------------------------------------------ life cycle

    def start_context(self, context: zmq.Context[Any]) -> None:
        """Start ZAP on the broker's context: called before any socket binds."""
        if self.authenticator is None:
            self.authenticator = BrokerAuthenticator(context, self.clients_dir)
            self.authenticator.start()

    def stop_context(self) -> None:
        """Stop ZAP (its sockets must close before the context ends)."""
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def reload(self) -> None:
        """Re-read the key folders (SIGHUP). New connections see the change;
        admitted ones keep their role until they close."""
        if self.authenticator is not None:
            try:
                self.authenticator.reload()
            except Exception as exc:  # a bad key file keeps the old keys
                log.error("keys not reloaded: %s", exc)

    # ------------------------------------------------------------ checks

    def admit(self, server: QueueServer, peer: zmq.Frame, command: bytes) -> bool:
        if command in ADMITTED_MAY or command == CONTROL:
            return True  # CONTROL: admit_control decides by the command's name
        if command in CACHED:
            rid = peer.bytes
            rights = self._rights.get(rid)
            if rights is None:
                if len(self._rights) >= MAX_CACHED_PEERS:
                    self._rights.clear()
                rights = self._rights[rid] = RIGHTS_BY_USER_ID.get(self.user_id_of(peer), _NONE)
        else:
            rights = RIGHTS_BY_USER_ID.get(self.user_id_of(peer), _NONE)
            if command == HELLO:  # a (re-)registration: what DONE will be checked against
                self._rights[peer.bytes] = rights
        if command in rights:
            return True
        if command not in server.handlers:
            return True  # not a command at all: the server counts it as malformed
        what = COMMANDS.get(command) or f"command {command!r}"
        self._deny(server, peer, f"{what} is not allowed for a {self._role_text(peer)} key")
        return False

    def admit_control(self, server: QueueServer, peer: zmq.Frame, name: str) -> bool:
        if control_allowed(roles_of(self.user_id_of(peer)), name):
            return True
        self._count(server, peer, f"control command {name!r} needs an admin key; "
                    f"this is a {self._role_text(peer)} key")
        return False

    def _role_text(self, peer: zmq.Frame) -> str:
        return self.user_id_of(peer).replace(",", "+") or "no-role"

    def _count(self, server: QueueServer, peer: zmq.Frame, why: str) -> None:
        self.denied[server.name] = self.denied.get(server.name, 0) + 1
        rid = peer.bytes
        if rid not in self._logged:
            if len(self._logged) >= MAX_LOGGED_PEERS:
                self._logged.clear()
            self._logged.add(rid)
            log.warning("queue %s: refused peer %s: %s (logged once per peer)",
                        server.name, rid.hex(), why)

    def _deny(self, server: QueueServer, peer: zmq.Frame, why: str) -> None:
        """Count, log once, and tell the peer (an ERROR AuthError it can raise)."""
        self._count(server, peer, why)
        server.send_error(peer.bytes, b"", b"AuthError", why)

    def status(self, server: QueueServer, data: dict[str, Any]) -> None:
        data["denied_total"] = self.denied.get(server.name, 0)
        data["secured"] = True

    def closing(self, server: QueueServer) -> None:
        self._rights.clear()
