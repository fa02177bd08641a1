"""Every ZeroMQ socket sqm, Sender and Worker open is made here.

Keeping creation in one place means transport security (CURVE keys on every
socket, mailboxes included) is one change in this module, not a hunt.
"""

from __future__ import annotations

import os
import socket as _socket

import zmq

# How long closing a socket may keep flushing queued messages (ms).
DEFAULT_LINGER_MS = 1000


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    routing_id: bytes | None = None,
    linger_ms: int = DEFAULT_LINGER_MS,
    hwm: int | None = None,
) -> zmq.Socket:
    """Create a socket with sqm's defaults (the single hook for security options)."""
    sock = ctx.socket(kind)
    sock.linger = linger_ms
    if routing_id is not None:
        sock.routing_id = routing_id
    if hwm is not None:
        sock.sndhwm = hwm
        sock.rcvhwm = hwm
    if kind == zmq.ROUTER:
        # Fail loudly (EHOSTUNREACH) instead of silently dropping a message
        # for a peer that is gone, and let a reconnecting peer with the same
        # routing id take over its old slot.
        sock.router_mandatory = 1
        sock.router_handover = 1
    return sock


def ensure_ipc_dir(endpoint: str) -> None:
    """Create the directory of an ``ipc://`` endpoint (private to this user)."""
    if endpoint.startswith("ipc://"):
        os.makedirs(os.path.dirname(os.path.abspath(endpoint[6:])), mode=0o700, exist_ok=True)


def ipc_listener_alive(endpoint: str) -> bool:
    """True when something accepts connections on an ``ipc://`` endpoint's file."""
    if not endpoint.startswith("ipc://"):
        return False
    path = endpoint[6:]
    if not os.path.exists(path):
        return False
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
        return True
    except (BlockingIOError, TimeoutError):
        return True  # listen backlog full (EAGAIN) or slow to accept: someone is there
    except OSError:
        return False  # ECONNREFUSED / ENOENT: a stale file, nobody listening
    finally:
        probe.close()


def local_address_towards(host: str) -> str:
    """The local IP the kernel would use to reach ``host`` (no packet is sent)."""
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    probe = _socket.socket(family, _socket.SOCK_DGRAM)
    try:
        probe.connect((host, 9))
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()
