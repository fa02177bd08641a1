"""Talking to a running sqm as an operator: status, workers and control commands.

The CLI, the tests and the benchmarks all use :class:`AdminClient`, so the
admin side of docs/PROTOCOL.md (STATUS, CONTROL) is written once. Each
request opens a short-lived DEALER, sends one request and waits for the one
answer. A new control command is one method calling :meth:`AdminClient.control`.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol
from .config import QueueSettings, client_key_paths
from .errors import AuthError, SQMError
from .security.handshake import HandshakeWatch
from .security.keys import client_keys
from .sockets import ipc_listener_alive, make_socket

if TYPE_CHECKING:
    from .security.keys import KeyPair

DEFAULT_TIMEOUT = 3.0

#: A JSON object as sqm sends it (docs/PROTOCOL.md, STATUS and CONTROL).
Answer = dict[str, Any]


def require_broker(settings: QueueSettings) -> None:
    """Fail fast when an ipc endpoint has no broker behind it (tcp cannot tell)."""
    if settings.endpoint.startswith("ipc://") and not ipc_listener_alive(settings.endpoint):
        raise SQMError(
            f"no sqm is serving queue {settings.queue!r} at {settings.endpoint} "
            f"(start it with: sqm serve {settings.queue})"
        )


class AdminClient:
    """Operator requests to the sqm serving ``settings`` (its first endpoint).

    Every method waits at most ``timeout`` seconds and raises :class:`SQMError`
    when nothing answers or sqm refuses the command (with sqm's own reason).
    ``curve`` is a CURVE client's (own key pair, server public key), as
    :func:`sqm.security.keys.client_keys` returns it; None: the keys named by
    ``$SQM_SECRET_KEY``/``$SQM_SERVER_KEY`` or the config, else a plain socket.
    """

    def __init__(self, settings: QueueSettings, timeout: float = DEFAULT_TIMEOUT,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
                 curve: tuple[KeyPair, bytes] | None = None) -> None:
        self.settings = settings
        self.timeout = timeout
        self.ctx = ctx
        if curve is None:  # $SQM_SECRET_KEY / $SQM_SERVER_KEY, else the config's keys
            curve = client_keys(*client_key_paths(settings))
        self.curve = curve

    # -------------------------------------------------------------- commands

    def status(self) -> Answer:
        """The queue's live metrics (STATUS), as `sqm status --json` prints them."""
        return self.request(protocol.STATUS, None)

    def workers(self) -> list[dict[str, Any]]:
        """One dict per registered worker (id, host, pid, state, ...)."""
        workers: list[dict[str, Any]] = self.control("workers")["workers"]
        return workers

    def drain(self) -> Answer:
        """Stop dispatching; pending messages stay. The answer has ``pending``."""
        return self.control("drain")

    def resume(self) -> Answer:
        """Dispatch again after :meth:`drain`. The answer has ``pending``."""
        return self.control("resume")

    def purge(self) -> Answer:
        """Drop every pending message (each sender gets Purged). The answer has ``purged``."""
        return self.control("purge")

    def stop_worker(self, worker_id: str) -> Answer:
        """Ask one worker to finish its message and exit 0."""
        return self.control("stop-worker", id=worker_id)

    def cancel(self, message_id: str) -> Answer:
        """End one scheduled, pending or running message with Cancelled (its
        sender is told). The answer's ``cancelled`` is False when it had ended or is unknown."""
        return self.control("cancel", id=message_id)

    def shutdown(self) -> Answer:
        """Stop the broker as SIGTERM would."""
        return self.control("shutdown")

    def dead_list(self, payloads: bool = True) -> list[dict[str, Any]]:
        """The dead letters, oldest first (id, method, reason, attempts, failed_at,
        serializer, size, payload base64 unless ``payloads`` is False...)."""
        dead: list[dict[str, Any]] = self.control("dead-list", payloads=payloads)["dead"]
        return dead

    def dead_replay(self, ids: list[str] | None = None) -> Answer:
        """Submit dead letters again (every one when ``ids`` is None): the answer has
        ``replayed`` ([{id, to: caller|oneway}]), ``refused`` and ``missing``."""
        if ids is None:
            return self.control("dead-replay", all=True)
        return self.control("dead-replay", ids=list(ids))

    def dead_purge(self) -> Answer:
        """Forget every dead letter of the queue. The answer has ``purged``."""
        return self.control("dead-purge")

    # -------------------------------------------------------------- plumbing

    def control(self, cmd: str, **args: Any) -> Answer:
        """Send control command ``cmd`` with ``args`` (docs/PROTOCOL.md, CONTROL)."""
        body = json.dumps({"cmd": cmd, **args}).encode()
        reply = self.request(protocol.CONTROL, body)
        if not reply.get("ok"):
            error = AuthError if reply.get("error_type") == "AuthError" else SQMError
            raise error(reply.get("error", "sqm refused the command"))
        return reply

    def request(self, command: bytes, body: bytes | None) -> Answer:
        """One request/answer over a short-lived DEALER: the decoded JSON answer."""
        require_broker(self.settings)
        sock = self._socket()
        # A refused handshake (unknown key, or no key for a secured sqm) is
        # AuthError at once, not a wait for nothing.
        watch: HandshakeWatch | None = HandshakeWatch(sock)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if watch is not None:
            poller.register(watch.monitor, zmq.POLLIN)
        try:
            sock.connect(self.settings.endpoint)
            sock.send_multipart([protocol.SIGNATURE, command] + ([body] if body is not None else []))
            deadline = time.monotonic() + self.timeout
            while True:
                remaining = deadline - time.monotonic()
                ready = dict(poller.poll(int(remaining * 1000) + 1)) if remaining > 0 else {}
                if watch is not None:
                    watch.check()  # raises AuthError on a refused handshake
                if not ready:
                    raise SQMError(f"no answer from sqm at {self.settings.endpoint} "
                                   f"within {self.timeout} s")
                if sock not in ready:
                    continue
                frames = sock.recv_multipart()
                if len(frames) == 3 and frames[:2] == [protocol.SIGNATURE, command]:
                    answer: Answer = json.loads(frames[2])
                    return answer
                if len(frames) >= 5 and frames[:2] == [protocol.SIGNATURE, protocol.ERROR] \
                        and frames[3] == b"AuthError":
                    raise AuthError(frames[4].decode("utf-8", "replace"))
        finally:
            if watch is not None:
                watch.close()
            sock.close(0)

    def _socket(self) -> zmq.Socket[bytes]:
        """The DEALER for one request, with this client's transport keys if any."""
        ctx = self.ctx or zmq.Context.instance()
        if self.curve is None:
            return make_socket(ctx, zmq.DEALER, linger_ms=0)
        pair, server_key = self.curve
        return make_socket(ctx, zmq.DEALER, linger_ms=0, curve_client=pair, server_key=server_key)


def fetch_status(settings: QueueSettings, timeout: float = DEFAULT_TIMEOUT,
                 curve: tuple[KeyPair, bytes] | None = None) -> Answer:
    """Ask the broker for its status (STATUS)."""
    return AdminClient(settings, timeout, curve=curve).status()


def control_request(settings: QueueSettings, request: dict[str, Any],
                    timeout: float = DEFAULT_TIMEOUT,
                    curve: tuple[KeyPair, bytes] | None = None) -> Answer:
    """Send one control command given as a dict (``{"cmd": ..., ...}``) and return sqm's answer.

    Raises SQMError with sqm's own explanation when it refuses the command
    (AuthError when this client's key may not run it).
    """
    args = dict(request)
    return AdminClient(settings, timeout, curve=curve).control(str(args.pop("cmd")), **args)
