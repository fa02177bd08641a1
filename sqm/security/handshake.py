"""Turn a refused ZeroMQ handshake into an :class:`~sqm.errors.AuthError` promptly.

A refused CURVE peer gets no message from ZeroMQ, only silence, so without
this a caller would wait for its full timeout and see ``Timeout``. The
socket monitor reports the handshake outcome within milliseconds:

- ``EVENT_HANDSHAKE_FAILED_AUTH``: the server's ZAP handler said no (our key
  is not in its lists);
- ``EVENT_HANDSHAKE_FAILED_NO_DETAIL``: the CURVE handshake broke (usually a
  wrong server key, or we have no key and the server wants one). A peer
  that goes away mid-handshake (a broker being stopped) looks the same
  once, so this one counts only when it happens twice in a row (libzmq
  reconnects within ~100 ms, so a real refusal is still reported at once);
- ``EVENT_HANDSHAKE_FAILED_PROTOCOL``: a security mechanism mismatch (one end
  CURVE, the other not) or a peer that does not speak ZMTP properly.

:func:`classify` is pure; :class:`HandshakeWatch` follows a socket, blocking
(``wait``) or, for a socket of a ``zmq.asyncio`` context, as a coroutine
(``wait_async``).
"""

from __future__ import annotations

import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ..errors import AuthError

#: How many NO_DETAIL failures in a row mean "refused" (see the module doc).
NO_DETAIL_REPEATS = 2

#: The monitor events the watch listens to.
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


def classify(event: int, value: int, endpoint: str) -> AuthError | None:
    """The error a handshake monitor event means for a client, or None if it is not one."""
    where = endpoint or "the server"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return AuthError(f"{where} refused our key (ZAP status {value}): "
                         "it is not in the server's senders/workers/admins lists")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return AuthError(f"security handshake with {where} failed: "
                         "wrong server key, or the server needs a key and we gave none")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return AuthError(f"security handshake with {where} failed: "
                         "one end uses CURVE and the other does not (check --secret-key/--server-key)")
    return None


class HandshakeWatch:
    """Follow the handshakes of one client socket (all its connections).

    ``check()`` never blocks; ``wait(timeout)`` (or ``await
    wait_async(timeout)``) waits until a handshake succeeded (True), failed
    (raises AuthError) or the time ran out (False). Make it before
    ``connect`` so no event is missed.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self._owned: zmq.Socket = monitor
        self._async: zmq.asyncio.Socket | None = None
        if isinstance(monitor, zmq.asyncio.Socket):
            # a blocking view of the same socket, so check() never needs a loop
            self._async = monitor
            monitor = zmq.Socket.shadow(monitor.underlying)
        self.monitor: zmq.Socket = monitor
        self._sock = sock
        self.succeeded = False
        self.broken = 0  # NO_DETAIL failures in a row

    def _take(self) -> None:
        frames = self.monitor.recv_multipart()
        msg = parse_monitor_message(frames)
        event = int(msg["event"])
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.succeeded = True
            self.broken = 0
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.broken += 1
            if self.broken < NO_DETAIL_REPEATS:
                return  # maybe a peer going away: a refusal repeats at the next reconnect
        endpoint = msg["endpoint"]
        error = classify(event, int(msg["value"]),
                         endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint))
        if error is not None:
            raise error

    def check(self) -> bool:
        """Read pending events: raise AuthError on a failed handshake; True once one succeeded."""
        while self.monitor.poll(0):
            self._take()
        return self.succeeded

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for the first handshake outcome."""
        deadline = time.monotonic() + timeout
        while not self.check():
            left = deadline - time.monotonic()
            if left <= 0 or not self.monitor.poll(max(1, int(left * 1000))):
                break
            self._take()
        return self.succeeded

    async def wait_async(self, timeout: float) -> bool:
        """:meth:`wait` for a socket made by a ``zmq.asyncio`` context."""
        if self._async is None:
            raise TypeError("wait_async needs a socket of a zmq.asyncio context; use wait()")
        deadline = time.monotonic() + timeout
        while not self.check():
            left = deadline - time.monotonic()
            if left <= 0 or not await self._async.poll(max(1, int(left * 1000))):
                break
            self._take()
        return self.succeeded

    def close(self) -> None:
        """Stop monitoring (the watched socket stays open)."""
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket was closed first
        self._owned.close(linger=0)
