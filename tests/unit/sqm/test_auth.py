"""ZAP admission over real ZeroMQ sockets: who gets in, with which User-Id, and how fast a refusal shows."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from sqm.errors import AuthError, KeyFileError
from sqm.security.auth import BrokerAuthenticator, ClientKeys
from sqm.security.handshake import HandshakeWatch
from sqm.security.keys import KeyPair, generate_keypair, load_keypair, load_public_key
from sqm.sockets import make_socket

PROMPT_S = 2.0  # a refusal must show well inside this; the watch waits up to 10 s


def make_key(directory: Path, name: str) -> tuple[KeyPair, Path]:
    public, secret = generate_keypair(name, directory)
    return load_keypair(secret), public


def grant(clients: Path, role_dir: str, public: Path) -> None:
    (clients / role_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(public, clients / role_dir / public.name)


class Server:
    """A CURVE ROUTER behind a BrokerAuthenticator, as the broker will have it."""

    def __init__(self, tmp: Path, check_interval: float = 1.0) -> None:
        self.keydir = tmp / "keys"
        self.clients = tmp / "clients"
        self.clients.mkdir()
        self.keys, _ = make_key(self.keydir, "server")
        self.ctx = zmq.Context()
        self.auth = BrokerAuthenticator(self.ctx, self.clients, check_interval=check_interval)
        self.auth.start()
        self.sock = make_socket(self.ctx, zmq.ROUTER, curve_server=self.keys, linger_ms=0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.client_ctx = zmq.Context()

    def client(self, keys: KeyPair | None, server_key: bytes | None = None) -> tuple[zmq.Socket, HandshakeWatch]:
        if keys is None:
            sock = make_socket(self.client_ctx, zmq.DEALER, linger_ms=0)
        else:
            sock = make_socket(self.client_ctx, zmq.DEALER, linger_ms=0, curve_client=keys,
                               server_key=server_key or self.keys.public)
        watch = HandshakeWatch(sock)
        sock.connect(self.endpoint)
        return sock, watch

    def recv(self, timeout_ms: int = 5000) -> list[zmq.Frame]:
        assert self.sock.poll(timeout_ms), "server got nothing"
        return self.sock.recv_multipart(copy=False)

    def close(self) -> None:
        self.sock.close(0)
        self.auth.stop()
        self.ctx.term()
        self.client_ctx.destroy(0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.close()


def admitted_user_id(server: Server, keys: KeyPair, marker: bytes) -> str:
    sock, watch = server.client(keys)
    try:
        assert watch.wait(10)
        sock.send(marker)
        frames = server.recv()
        assert frames[-1].bytes == marker
        return str(frames[-1].get("User-Id"))
    finally:
        watch.close()
        sock.close(0)


def assert_refused(server: Server, keys: KeyPair | None, match: str, **kw: bytes) -> None:
    sock, watch = server.client(keys, **kw)
    try:
        start = time.monotonic()
        with pytest.raises(AuthError, match=match) as exc:
            watch.wait(10)
        assert time.monotonic() - start < PROMPT_S
        assert isinstance(exc.value, PermissionError)
        try:
            sock.send(b"must not arrive", zmq.NOBLOCK)  # no pipe: refused at once
        except zmq.Again:
            pass
    finally:
        watch.close()
        sock.close(0)


def test_known_keys_get_their_roles_as_user_id(server: Server, tmp_path: Path) -> None:
    both, both_pub = make_key(tmp_path / "k", "both")
    admin, admin_pub = make_key(tmp_path / "k", "admin")
    grant(server.clients, "senders", both_pub)
    grant(server.clients, "workers", both_pub)
    grant(server.clients, "admins", admin_pub)
    server.auth.reload()
    assert admitted_user_id(server, both, b"m1") == "sender,worker"
    assert admitted_user_id(server, admin, b"m2") == "admin"
    # every frame of the message carries it, the routing id frame included
    sock, watch = server.client(both)
    sock.send_multipart([b"a", b"b"])
    frames = server.recv()
    assert [f.get("User-Id") for f in frames] == ["sender,worker"] * 3
    watch.close()
    sock.close(0)


def test_unknown_key_is_refused_promptly_and_nothing_arrives(server: Server, tmp_path: Path) -> None:
    stranger, _ = make_key(tmp_path / "k", "stranger")
    friend, friend_pub = make_key(tmp_path / "k", "friend")
    grant(server.clients, "senders", friend_pub)
    server.auth.reload()
    assert_refused(server, stranger, "refused our key")
    # the first thing the server receives is the friend's message, not the stranger's
    assert admitted_user_id(server, friend, b"friend") == "sender"


def test_wrong_server_key_and_missing_key_are_auth_errors(server: Server, tmp_path: Path) -> None:
    friend, friend_pub = make_key(tmp_path / "k", "friend")
    grant(server.clients, "workers", friend_pub)
    server.auth.reload()
    other, _ = make_key(tmp_path / "k", "other-server")
    assert_refused(server, friend, "wrong server key", server_key=other.public)
    assert_refused(server, None, "security handshake")
    assert admitted_user_id(server, friend, b"ok") == "worker"


def test_curve_client_against_a_plain_server(tmp_path: Path) -> None:
    ctx = zmq.Context()
    try:
        plain = make_socket(ctx, zmq.ROUTER, linger_ms=0)
        port = plain.bind_to_random_port("tcp://127.0.0.1")
        me, _ = make_key(tmp_path, "me")
        srv, _ = make_key(tmp_path, "srv")
        sock = make_socket(ctx, zmq.DEALER, linger_ms=0, curve_client=me, server_key=srv.public)
        watch = HandshakeWatch(sock)
        sock.connect(f"tcp://127.0.0.1:{port}")
        with pytest.raises(AuthError, match="one end uses CURVE"):
            watch.wait(10)
        watch.close()
        sock.close(0)
        plain.close(0)
    finally:
        ctx.term()


def test_plain_pair_handshake_succeeds(tmp_path: Path) -> None:
    ctx = zmq.Context()
    try:
        plain = make_socket(ctx, zmq.ROUTER, linger_ms=0)
        port = plain.bind_to_random_port("tcp://127.0.0.1")
        sock = make_socket(ctx, zmq.DEALER, linger_ms=0)
        watch = HandshakeWatch(sock)
        sock.connect(f"tcp://127.0.0.1:{port}")
        assert watch.wait(10)
        assert watch.check()
        watch.close()
        sock.close(0)
        plain.close(0)
    finally:
        ctx.term()


def test_key_added_is_admitted_after_reload_and_removed_is_refused(server: Server, tmp_path: Path) -> None:
    late, late_pub = make_key(tmp_path / "k", "late")
    assert_refused(server, late, "refused our key")
    grant(server.clients, "workers", late_pub)
    server.auth.reload()
    assert admitted_user_id(server, late, b"in") == "worker"
    (server.clients / "workers" / "late.key").unlink()
    server.auth.reload()
    assert_refused(server, late, "refused our key")


def test_folders_are_reread_when_they_change(tmp_path: Path) -> None:
    server = Server(tmp_path, check_interval=0.0)  # no rate limit: the test need not wait a second
    try:
        late, late_pub = make_key(tmp_path / "k", "late")
        assert_refused(server, late, "refused our key")
        grant(server.clients, "admins", late_pub)  # no reload(): the mtime changed
        assert admitted_user_id(server, late, b"in") == "admin"
    finally:
        server.close()


def test_refresh_is_rate_limited(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    (clients / "senders").mkdir(parents=True)
    now = [100.0]
    keys = ClientKeys(clients, check_interval=1.0, clock=lambda: now[0])
    _, pub = make_key(tmp_path / "k", "a")
    z = load_public_key(pub)
    keys.refresh()  # first check: nothing changed yet
    grant(clients, "senders", pub)
    now[0] += 0.5
    assert not keys.callback("*", z)  # checked less than a second ago: not re-read yet
    now[0] += 0.6
    assert keys.callback("*", z)
    assert keys.user_id(z) == "sender"


def test_bad_key_file_keeps_the_old_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clients = tmp_path / "clients"
    now = [0.0]
    _, pub = make_key(tmp_path / "k", "a")
    grant(clients, "workers", pub)
    keys = ClientKeys(clients, clock=lambda: now[0])
    z = load_public_key(pub)
    assert keys.user_id(z) == "worker"
    (clients / "workers" / "broken.key").write_text("not a key")
    with pytest.raises(KeyFileError, match="broken.key"):
        keys.reload()
    assert keys.user_id(z) == "worker"
    with caplog.at_level(logging.ERROR, logger="sqm.security"):
        for _ in range(3):
            now[0] += 2
            assert keys.callback("*", z)
    assert sum("broken.key" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_unknown_keys_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "clients").mkdir()
    keys = ClientKeys(tmp_path / "clients")
    with caplog.at_level(logging.WARNING, logger="sqm.security"):
        for _ in range(5):
            assert not keys.callback("*", b"x" * 40)
    assert sum("unknown CURVE key" in r.getMessage() for r in caplog.records) == 1


def test_missing_clients_dir_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="clients directory .*missing: not found") as exc:
        ClientKeys(tmp_path / "missing")
    assert "\n" not in str(exc.value)


def test_async_watch(server: Server, tmp_path: Path) -> None:
    friend, friend_pub = make_key(tmp_path / "k", "friend")
    stranger, _ = make_key(tmp_path / "k", "stranger")
    grant(server.clients, "senders", friend_pub)
    server.auth.reload()

    async def handshake(keys: KeyPair) -> bool:
        actx = zmq.asyncio.Context()
        sock = make_socket(actx, zmq.DEALER, linger_ms=0, curve_client=keys,
                           server_key=server.keys.public)
        watch = HandshakeWatch(sock)
        try:
            sock.connect(server.endpoint)
            return await watch.wait_async(10)
        finally:
            watch.close()
            sock.close(0)
            actx.term()

    assert asyncio.run(handshake(friend))
    start = time.monotonic()
    with pytest.raises(AuthError, match="refused our key"):
        asyncio.run(handshake(stranger))
    assert time.monotonic() - start < PROMPT_S


def test_wait_async_needs_an_asyncio_socket(server: Server) -> None:
    sock = make_socket(server.client_ctx, zmq.DEALER, linger_ms=0)  # not connected: no event
    watch = HandshakeWatch(sock)
    with pytest.raises(TypeError, match="zmq.asyncio"):
        asyncio.run(watch.wait_async(0.01))
    watch.close()
    sock.close(0)


def test_admitted_user_id_survives_a_reload_between_decision_and_reply(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    _, pub = make_key(tmp_path / "k", "a")
    grant(clients, "senders", pub)
    keys = ClientKeys(clients)
    z = load_public_key(pub)
    assert keys.callback("*", z)
    (clients / "senders" / "a.key").unlink()
    keys.reload()  # SIGHUP lands between pyzmq's callback and its curve_user_id call
    assert keys.admitted_user_id(z) == "sender"
    assert not keys.callback("*", z)
