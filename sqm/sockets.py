"""Every ZeroMQ socket sqm, Sender and Worker open is made here.

Keeping creation in one place means transport security (CURVE keys on every
socket, mailboxes included) is one change in this module, not a hunt.
"""

from __future__ import annotations

import os
import socket as _socket
import stat

import zmq

from .security.keys import KeyPair

# How long closing a socket may keep flushing queued messages (ms).
DEFAULT_LINGER_MS = 1000
#: ipc socket files: owner only unless ``--ipc-mode`` widens it.
DEFAULT_IPC_MODE = 0o600


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    routing_id: bytes | None = None,
    linger_ms: int = DEFAULT_LINGER_MS,
    hwm: int | None = None,
    curve_server: KeyPair | None = None,
    curve_client: KeyPair | None = None,
    server_key: bytes | None = None,
    router_handover: bool = True,
) -> zmq.Socket:
    """Create a socket with sqm's defaults (the single hook for security options).

    ``curve_server=pair`` makes it a CURVE server (it will bind; clients
    are then vetted by the context's ZAP handler, if one runs).
    ``curve_client=pair, server_key=z85`` makes it a CURVE client of the
    server whose public key is ``server_key``. Neither: plain (NULL).

    ``router_handover=False`` (ROUTER only): a second connection presenting
    a routing id already in use is refused instead of taking the slot over.
    A secured broker needs that: otherwise a peer with any admitted key
    could present a worker's routing id and receive its DISPATCHes.
    """
    sock: zmq.Socket = ctx.socket(kind)
    if curve_server is not None:
        set_curve_server(sock, curve_server)
    elif curve_client is not None or server_key is not None:
        if curve_client is None or server_key is None:
            sock.close(0)
            raise ValueError("a CURVE client needs both its own key pair and the server's public key")
        set_curve_client(sock, curve_client, server_key)
    sock.linger = linger_ms
    if routing_id is not None:
        sock.routing_id = routing_id
    if hwm is not None:
        sock.sndhwm = hwm
        sock.rcvhwm = hwm
    if kind == zmq.ROUTER:
        # Fail loudly (EHOSTUNREACH) instead of silently dropping a message
        # for a peer that is gone, and (unless told not to) let a reconnecting
        # peer with the same routing id take over its old slot.
        sock.router_mandatory = 1
        sock.router_handover = int(router_handover)
    return sock


_fd_limit_raised: tuple[int, int] | None = None  # (pid, soft limit) once raised


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the soft limit.

    Every connection (a worker's to each mailbox, sqm's from each peer) is
    a file descriptor, and the usual soft limit (1024) is far below what
    thousands of concurrent senders need while the hard limit rarely is.
    Called at start by sqm, Workers and Senders; once per process; -1
    where the platform has no such limit.
    """
    global _fd_limit_raised
    pid = os.getpid()
    if _fd_limit_raised is not None and _fd_limit_raised[0] == pid:
        return _fd_limit_raised[1]
    try:
        import resource
    except ImportError:  # not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An "unlimited" hard limit still has a ceiling (nr_open, OPEN_MAX): ask for a sane amount.
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    _fd_limit_raised = (pid, int(soft))
    return int(soft)


def set_curve_server(sock: zmq.Socket, keys: KeyPair) -> None:
    """Make ``sock`` a CURVE server with ``keys`` (before bind)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def set_curve_client(sock: zmq.Socket, keys: KeyPair, server_key: bytes) -> None:
    """Make ``sock`` a CURVE client with its own ``keys`` talking to ``server_key`` (before connect)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_key


def dir_mode_for(ipc_mode: int) -> int:
    """The run directory mode that lets exactly the classes in ``ipc_mode`` reach its sockets.

    Connecting to a unix socket needs write on the file and search (x) on
    its directory; listing the directory is never needed, so it is not given.
    """
    mode = 0o700
    if ipc_mode & 0o070:
        mode |= 0o010
    if ipc_mode & 0o007:
        mode |= 0o001
    return mode


def ensure_private_dir(path: str, *, mode: int = 0o700) -> None:
    """Create ``path`` with exactly ``mode``; tighten or widen it if this user owns it.

    A directory someone else owns is refused (PermissionError): in a shared
    temp dir it could be planted to catch our sockets.
    """
    path = os.path.abspath(path)
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to another user (uid {st.st_uid}); refusing to use it")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def ensure_ipc_dir(endpoint: str, *, mode: int | None = None) -> None:
    """Create the directory of an ``ipc://`` endpoint (private to this user).

    With ``mode`` (the ipc socket mode, e.g. ``0o600``) the directory is
    also set to :func:`dir_mode_for` it when this user owns it; without it
    only a missing directory is created (owner-only), as before.
    """
    if not endpoint.startswith("ipc://"):
        return
    directory = os.path.dirname(os.path.abspath(endpoint[6:]))
    if mode is None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    else:
        ensure_private_dir(directory, mode=dir_mode_for(mode))


def bind(sock: zmq.Socket, endpoint: str, *, mode: int = DEFAULT_IPC_MODE) -> None:
    """Bind ``sock``; an ``ipc://`` socket file gets ``mode`` (owner-only by default).

    The file is created by bind with the umask's mode and chmod-ed right
    after; the directory (see :func:`ensure_ipc_dir`) closes that window.
    """
    if endpoint.startswith("ipc://"):
        ensure_ipc_dir(endpoint, mode=mode)
        sock.bind(endpoint)
        os.chmod(endpoint[6:], mode)
    else:
        sock.bind(endpoint)


def sweep_stale_sockets(rundir: str, *, suffix: str = ".sock") -> list[str]:
    """Remove socket files in ``rundir`` nobody listens on; return their paths.

    Only unix socket files named ``*<suffix>`` (sqm's queues and mailboxes;
    never regular files or symlinks) owned by this user are touched, and
    only when a connect is refused. A file re-bound by
    a starting process between our probe and our unlink must survive, so a
    dead-looking file is first renamed aside and probed again there: still
    dead, it is removed; alive after all, it is linked back to its name.
    """
    removed: list[str] = []
    try:
        names = os.listdir(rundir)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    uid = os.geteuid()
    for name in names:
        if not name.endswith(suffix) or name.startswith("."):
            continue
        path = os.path.join(rundir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            continue
        if ipc_listener_alive("ipc://" + path):
            continue
        aside = os.path.join(rundir, f".sweep-{os.getpid()}-{name}")
        try:
            os.rename(path, aside)
        except OSError:
            continue  # gone already, or not ours to move
        if ipc_listener_alive("ipc://" + aside):
            try:
                os.link(aside, path)  # never replaces a newer file at that name
            except OSError:
                pass
            os.unlink(aside)
            continue
        os.unlink(aside)
        removed.append(path)
    return removed


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
        return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()
