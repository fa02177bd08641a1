"""sqm/sockets.py: CURVE options, owner-only ipc files and run directory, the stale-socket sweep."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from sqm import sockets
from sqm.security.handshake import HandshakeWatch
from sqm.security.keys import KeyPair
from sqm.sockets import (
    bind,
    dir_mode_for,
    ensure_ipc_dir,
    ensure_private_dir,
    ipc_listener_alive,
    make_socket,
    sweep_stale_sockets,
)

NOBODY = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(0)


def stale_socket(path: Path) -> None:
    """A unix socket file whose listener is gone (what a killed process leaves)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_curve_server_and_client_options(ctx: zmq.Context) -> None:
    server = KeyPair(*zmq.curve_keypair())
    client = KeyPair(*zmq.curve_keypair())
    srv = make_socket(ctx, zmq.ROUTER, curve_server=server)
    assert srv.mechanism == zmq.CURVE and srv.curve_server == 1
    cli = make_socket(ctx, zmq.DEALER, curve_client=client, server_key=server.public)
    assert cli.mechanism == zmq.CURVE and cli.curve_server == 0
    # (the keys themselves are write-only options; test_auth.py shows they are the right ones)
    plain = make_socket(ctx, zmq.DEALER)
    assert plain.mechanism == zmq.NULL
    with pytest.raises(ValueError, match="both"):
        make_socket(ctx, zmq.DEALER, curve_client=client)
    with pytest.raises(ValueError, match="both"):
        make_socket(ctx, zmq.DEALER, server_key=server.public)
    for s in (srv, cli, plain):
        s.close(0)


def test_dir_mode_for() -> None:
    assert dir_mode_for(0o600) == 0o700
    assert dir_mode_for(0o660) == 0o710
    assert dir_mode_for(0o620) == 0o710
    assert dir_mode_for(0o666) == 0o711
    assert dir_mode_for(0o606) == 0o701


def test_bind_ipc_is_owner_only_by_default(ctx: zmq.Context, tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    old = os.umask(0)  # even with a permissive umask
    try:
        sock = make_socket(ctx, zmq.ROUTER, linger_ms=0)
        bind(sock, f"ipc://{rundir}/q.sock")
    finally:
        os.umask(old)
    assert mode_of(rundir) == 0o700
    assert mode_of(rundir / "q.sock") == 0o600
    assert ipc_listener_alive(f"ipc://{rundir}/q.sock")
    sock.close(0)


def test_bind_ipc_with_a_wider_mode(ctx: zmq.Context, tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o755)
    os.chmod(rundir, 0o755)
    sock = make_socket(ctx, zmq.ROUTER, linger_ms=0)
    bind(sock, f"ipc://{rundir}/q.sock", mode=0o660)
    assert mode_of(rundir / "q.sock") == 0o660
    assert mode_of(rundir) == 0o710  # group may reach the socket, not list the directory
    sock.close(0)
    sock = make_socket(ctx, zmq.ROUTER, linger_ms=0)
    bind(sock, f"ipc://{rundir}/q2.sock")  # back to the default: tightened again
    assert mode_of(rundir) == 0o700 and mode_of(rundir / "q2.sock") == 0o600
    sock.close(0)


def test_bind_tcp_is_untouched(ctx: zmq.Context) -> None:
    sock = make_socket(ctx, zmq.ROUTER, linger_ms=0)
    bind(sock, "tcp://127.0.0.1:*")
    assert sock.getsockopt_string(zmq.LAST_ENDPOINT).startswith("tcp://127.0.0.1:")
    sock.close(0)


def test_a_directory_someone_else_owns_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o777)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match="belongs to another user"):
        ensure_private_dir(str(planted))
    with pytest.raises(PermissionError):
        ensure_ipc_dir(f"ipc://{planted}/q.sock", mode=0o600)
    ensure_ipc_dir(f"ipc://{planted}/q.sock")  # the old call (no mode) only creates


def test_ensure_ipc_dir_without_mode_creates_owner_only(tmp_path: Path) -> None:
    ensure_ipc_dir(f"ipc://{tmp_path}/a/b/q.sock")
    assert mode_of(tmp_path / "a" / "b") == 0o700
    ensure_ipc_dir("tcp://127.0.0.1:5555")  # not ipc: nothing to do


def test_sweep_removes_only_our_dead_sockets(ctx: zmq.Context, tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    live = make_socket(ctx, zmq.ROUTER, linger_ms=0)
    live.bind(f"ipc://{rundir}/live.sock")
    stale_socket(rundir / "stale.sock")
    stale_socket(rundir / "stale2.sock")
    stale_socket(rundir / "theirs.sock")
    os.chown(rundir / "theirs.sock", NOBODY, NOBODY)
    (rundir / "file.sock").write_text("not a socket")
    stale_socket(rundir / "other-app")  # not an sqm name: someone else's business
    os.symlink(rundir / "stale2.sock", rundir / "link.sock")
    assert not ipc_listener_alive(f"ipc://{rundir}/stale.sock")  # the probe sees them dead

    removed = sweep_stale_sockets(str(rundir))

    assert sorted(removed) == [str(rundir / "stale.sock"), str(rundir / "stale2.sock")]
    left = sorted(p.name for p in rundir.iterdir())
    assert left == ["file.sock", "link.sock", "live.sock", "other-app", "theirs.sock"]
    assert ipc_listener_alive(f"ipc://{rundir}/live.sock")
    assert sweep_stale_sockets(str(rundir)) == []
    live.close(0)


def test_sweep_of_a_missing_rundir(tmp_path: Path) -> None:
    assert sweep_stale_sockets(str(tmp_path / "missing")) == []


def test_sweep_leaves_a_socket_rebound_during_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    path = rundir / "q.sock"
    stale_socket(path)
    fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real_probe = sockets.ipc_listener_alive
    probes: list[str] = []

    def probe_then_rebind(endpoint: str) -> bool:
        probes.append(endpoint)
        if len(probes) > 1:
            return real_probe(endpoint)
        # A starting broker replaces the file just after our first probe.
        assert not real_probe(endpoint)
        os.unlink(path)
        fresh.bind(str(path))
        fresh.listen(1)
        return False

    monkeypatch.setattr(sockets, "ipc_listener_alive", probe_then_rebind)
    try:
        assert sweep_stale_sockets(str(rundir)) == []
        assert len(probes) == 2
        assert real_probe(f"ipc://{path}")  # the new listener is still reachable by its name
        assert sorted(p.name for p in rundir.iterdir()) == ["q.sock"]
    finally:
        fresh.close()


@pytest.mark.parametrize("handover", [True, False])
def test_router_handover_decides_who_gets_a_routing_id_in_use(ctx: zmq.Context, handover: bool) -> None:
    # Why a secured broker passes router_handover=False: with handover, a second
    # peer presenting a worker's routing id receives what was meant for the worker.
    router = make_socket(ctx, zmq.ROUTER, linger_ms=0, router_handover=handover)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker = make_socket(ctx, zmq.DEALER, linger_ms=0, routing_id=b"Wsame")
    worker.connect(f"tcp://127.0.0.1:{port}")
    worker.send(b"hello")
    assert router.poll(10_000) and router.recv_multipart() == [b"Wsame", b"hello"]
    impostor = make_socket(ctx, zmq.DEALER, linger_ms=0, routing_id=b"Wsame")
    watch = HandshakeWatch(impostor)
    impostor.connect(f"tcp://127.0.0.1:{port}")
    assert watch.wait(10)  # the impostor's connection is up before the router sends
    watch.close()
    impostor.send(b"me too")
    if handover:
        assert router.poll(10_000) and router.recv_multipart() == [b"Wsame", b"me too"]
    router.send_multipart([b"Wsame", b"dispatch"])
    winner, loser = (impostor, worker) if handover else (worker, impostor)
    assert winner.poll(10_000) and winner.recv() == b"dispatch"
    assert not loser.poll(0)
    for s in (impostor, worker, router):
        s.close(0)
