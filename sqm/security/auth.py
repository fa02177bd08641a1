"""Who may connect to a secured sqm: ZAP over the ``--clients DIR`` key folders.

Built on pyzmq's :mod:`zmq.auth` (a ThreadAuthenticator answering ZAP in a
background thread with a credentials provider) rather than a hand-written
ZAP handler. A CURVE client is admitted iff its public key is in
``DIR/senders``, ``DIR/workers`` or ``DIR/admins``; the ZAP User-Id it gets
is its role string (:func:`sqm.security.roles.user_id`, e.g.
``"sender,worker"``), which ZeroMQ then attaches to every message from that
connection (``frame.get("User-Id")``); the broker turns it into rights with
``roles.rights_of`` - a lookup in a fixed seven-entry table.

Key changes take effect without a restart, for new connections: call
:meth:`BrokerAuthenticator.reload` (on SIGHUP), and the key folders are also
re-read by themselves when their modification time changed, checked at most
once a second and only when a client connects. Editing a ``.key`` file in
place does not change its folder's mtime: send SIGHUP for that. Connections
already admitted keep their User-Id until they close.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..errors import KeyFileError
from .keys import load_key_dir
from .roles import ROLE_DIRS, ROLES, user_id

log = logging.getLogger("sqm.security")

#: How often (s) a connecting client may trigger a check of the folders' mtimes.
CHECK_INTERVAL = 1.0
#: Unknown keys remembered so each is logged once, not once per retry.
_MAX_LOGGED_UNKNOWN = 1024


class ClientKeys:
    """The admitted public keys and their roles, read from ``DIR/<role>s/*.key``.

    Also a pyzmq credentials provider (:meth:`callback`). Reads happen in the
    ZAP thread and :meth:`reload` may run in another: the table is replaced
    whole, never mutated, so a reader sees the old or the new one.
    """

    def __init__(
        self,
        clients_dir: str | os.PathLike[str],
        *,
        check_interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clients_dir = os.path.abspath(os.fspath(clients_dir))
        if not os.path.isdir(self.clients_dir):
            raise KeyFileError(f"clients directory {self.clients_dir}: not found "
                               "(it should hold senders/, workers/ and admins/ folders of .key files)")
        self.check_interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()  # one reload at a time
        self._table: dict[bytes, str] = {}
        self._stamp: tuple[int, ...] = ()
        self._checked_at = float("-inf")
        self._bad_stamp: tuple[int, ...] | None = None
        self._logged_unknown: set[bytes] = set()
        self._admitted: tuple[bytes, str] = (b"", "")  # callback -> curve_user_id hand-over
        self.reload()

    def _dirs(self) -> list[str]:
        return [os.path.join(self.clients_dir, ROLE_DIRS[r]) for r in ROLES]

    def _read_stamp(self) -> tuple[int, ...]:
        stamp = []
        for d in [self.clients_dir, *self._dirs()]:
            try:
                stamp.append(os.stat(d).st_mtime_ns)
            except OSError:
                stamp.append(-1)
        return tuple(stamp)

    def reload(self) -> None:
        """Re-read every key folder now.

        On a bad key file, raises KeyFileError and keeps the previous table
        (a typo must not lock everybody out, nor let anybody in).
        """
        with self._lock:
            stamp = self._read_stamp()
            roles_by_key: dict[bytes, set[str]] = {}
            for role, d in zip(ROLES, self._dirs(), strict=True):
                for key in load_key_dir(d):
                    roles_by_key.setdefault(key, set()).add(role)
            self._table = {k: user_id(rs) for k, rs in roles_by_key.items()}
            self._stamp = stamp
            self._bad_stamp = None
            self._logged_unknown = set()
        counts = {r: sum(r in uid.split(",") for uid in self._table.values()) for r in ROLES}
        log.info("client keys loaded from %s: %s", self.clients_dir,
                 ", ".join(f"{n} {ROLE_DIRS[r]}" for r, n in counts.items()))

    def refresh(self) -> None:
        """Reload if a folder changed; at most once per ``check_interval``; never raises."""
        now = self._clock()
        if now - self._checked_at < self.check_interval:
            return
        self._checked_at = now
        stamp = self._read_stamp()
        if stamp == self._stamp or stamp == self._bad_stamp:
            return
        try:
            self.reload()
        except KeyFileError as exc:
            self._bad_stamp = stamp  # log this state once, keep the old keys
            log.error("%s; keeping the previous client keys", exc)

    def user_id(self, z85_key: bytes) -> str | None:
        """The User-Id (role string) of a z85 public key, or None if not admitted."""
        return self._table.get(z85_key)

    def admitted_user_id(self, z85_key: bytes) -> str:
        """The User-Id :meth:`callback` just admitted ``z85_key`` with.

        Taken from that decision, not from the table again, so a reload in
        between cannot leave an admitted peer with an empty User-Id.
        """
        key, uid = self._admitted
        return uid if key == z85_key else (self._table.get(z85_key) or "")

    def __len__(self) -> int:
        return len(self._table)

    # pyzmq credentials-provider protocol (configure_curve_callback)
    def callback(self, domain: str, z85_key: bytes) -> bool:
        self.refresh()
        uid = self._table.get(z85_key)
        if uid:
            self._admitted = (z85_key, uid)
            return True
        if z85_key not in self._logged_unknown and len(self._logged_unknown) < _MAX_LOGGED_UNKNOWN:
            self._logged_unknown.add(z85_key)
            log.warning("refused a client with an unknown CURVE key %s", z85_key.decode("ascii"))
        return False


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with the role string as User-Id instead of the key."""

    def __init__(self, context: zmq.Context, keys: ClientKeys, log: Any) -> None:
        super().__init__(context, log=log)
        self.keys = keys

    def curve_user_id(self, client_public_key: bytes) -> str:
        # Called right after callback() admitted this key, in the same thread.
        return self.keys.admitted_user_id(z85.encode(client_public_key))


class BrokerAuthenticator:
    """ZAP for every CURVE server socket of one ZeroMQ context.

    Start it before binding: a CURVE socket in a context without a ZAP
    handler admits any client that knows the server's public key.
    """

    def __init__(
        self,
        context: zmq.Context,
        clients_dir: str | os.PathLike[str],
        *,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.keys = ClientKeys(clients_dir, check_interval=check_interval)
        self._auth = _Authenticator(context, self.keys, logging.getLogger("sqm.security.zap"))

    def start(self) -> None:
        """Start answering ZAP requests (a background thread)."""
        self._auth.configure_curve_callback("*", credentials_provider=self.keys)
        self._auth.start()

    def stop(self) -> None:
        self._auth.stop()

    def reload(self) -> None:
        """Re-read the key folders now (SIGHUP); KeyFileError keeps the old keys."""
        self.keys.reload()

    def __enter__(self) -> BrokerAuthenticator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
