"""CURVE + ZAP + roles with real processes: sqm serve, sqm worker, Sender, the CLI.

Keys are made by ``sqm keygen``; every broker here listens on tcp on
127.0.0.1 so the loopback capture sees the bytes that cross.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq

from sender import Sender
from sqm.admin import AdminClient
from sqm.config import resolve
from sqm.errors import AuthError, KeyFileError
from sqm.protocol import ERROR, HEARTBEAT, HELLO, SIGNATURE
from sqm.security.keys import load_keypair, load_public_key
from tests.conftest import REPO, Cluster, free_port, wait_for
from tests.system.capture import LoopbackCapture

ROLES = {"sender": "senders", "worker": "workers", "admin": "admins"}


class Keys:
    """A broker key pair, a clients dir with one key per role, and a stranger's key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for name in ("broker", "sender", "worker", "admin", "stranger"):
            done = subprocess.run([sys.executable, "-m", "sqm", "keygen", name, "--dir", str(root)],
                                  cwd=REPO, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
        self.clients = root / "clients"
        for role, folder in ROLES.items():
            (self.clients / folder).mkdir(parents=True)
            (self.clients / folder / f"{role}.key").write_bytes((root / f"{role}.key").read_bytes())

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    @property
    def server(self) -> str:
        return str(self.root / "broker.key")

    def client_args(self, name: str) -> list[str]:
        return ["--secret-key", self.secret(name), "--server-key", self.server]

    def curve(self, name: str) -> tuple[Any, bytes]:
        return load_keypair(self.secret(name)), load_public_key(self.server)


@pytest.fixture
def keys(rundir: Path) -> Keys:
    return Keys(rundir / "keys")


def secured(cluster: Cluster, keys: Keys, queue: str = "q") -> str:
    """Start a secured sqm on a fresh tcp port; its endpoint."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = cluster.sqm("serve", queue, "--heartbeat", "0.2", "--endpoint", endpoint,
                       "--secret-key", keys.secret("broker"), "--clients", str(keys.clients),
                       name=f"serve-{queue}")
    admin(keys, queue, endpoint, proc=proc)
    return endpoint


def admin(keys: Keys, queue: str, endpoint: str, name: str = "admin",
          proc: Any = None, timeout: float = 15.0) -> dict[str, Any]:
    """Wait for the secured sqm's status, asked with ``name``'s key."""
    client = AdminClient(resolve(queue, endpoint=endpoint), 0.5, curve=keys.curve(name))

    def ready() -> dict[str, Any] | None:
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited early:\n{proc.stderr}")
        try:
            return client.status()
        except AuthError:
            raise
        except Exception:
            return None

    st: dict[str, Any] = wait_for(ready, timeout, f"secured sqm at {endpoint}")
    return st


def secured_worker(cluster: Cluster, keys: Keys, endpoint: str, queue: str = "q",
                   name: str = "worker") -> Any:
    proc = cluster.sqm("worker", "tests.apps:callbacks", "--queue", queue, "--endpoint", endpoint,
                       "--heartbeat", "0.2", *keys.client_args(name), name=f"worker-{name}")
    wait_for(lambda: admin(keys, queue, endpoint)["workers_current"] == 1, 20,
             "the secured worker registered")
    return proc


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


# ------------------------------------------------------------ end to end


def test_secured_rpc_end_to_end(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    secured_worker(cluster, keys, endpoint)
    with Sender("q", endpoint=endpoint, secret_key=keys.secret("sender"),
                server_key=keys.server, timeout=10) as s:
        assert s.rpc("add", {"a": 2, "b": 40}) == 42
        assert s.rpc("echo", "x" * 1000) == "x" * 1000
        assert " " not in s.mailbox  # the key travels in the envelope, not in the address
    # The reply reaches the sender first; the worker's DONE may reach sqm a moment later.
    wait_for(lambda: admin(keys, "q", endpoint)["completed_total"] == 2, 10, "2 DONEs at sqm")
    st = admin(keys, "q", endpoint)
    assert st["completed_total"] == 2 and st["denied_total"] == 0 and st["secured"] is True


def test_secured_cli_submit_and_status(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    secured_worker(cluster, keys, endpoint)
    done = run_cli("submit", "q", "add", '{"a": 1, "b": 2}', "--endpoint", endpoint,
                   *keys.client_args("sender"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    done = run_cli("status", "q", "--endpoint", endpoint, "--json", *keys.client_args("sender"))
    assert done.returncode == 0, done.stderr
    assert '"completed_total": 1' in done.stdout


# ------------------------------------------------------------ on the wire

MARK_REQ = "REQ-MARKER-4f1c9a"
MARK_REP = "REP-MARKER-77d20e"


def test_capture_finds_no_plaintext_on_a_secured_sqm(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    secured_worker(cluster, keys, endpoint)
    with Sender("q", endpoint=endpoint, timeout=10, serializer="json",
                secret_key=keys.secret("sender"), server_key=keys.server) as s:
        assert s.mailbox.startswith("tcp://127.0.0.1:")  # the reply hop crosses lo too
        with LoopbackCapture() as cap:
            assert s.rpc("echo", {"m": MARK_REQ, "r": MARK_REP}) == {"m": MARK_REQ, "r": MARK_REP}
    assert cap.packets >= 4
    assert not cap.contains(MARK_REQ.encode())
    assert not cap.contains(MARK_REP.encode())
    assert not cap.contains(b"echo")  # the method name is in the (encrypted) envelope


def test_capture_finds_plaintext_on_an_insecure_sqm(cluster: Cluster) -> None:
    """The same probe on a plain sqm does see the markers: it works."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cluster.serve("q", endpoint=endpoint)
    cluster.worker("q", endpoint=endpoint)
    with Sender("q", endpoint=endpoint, timeout=10, serializer="json") as s:
        assert s.mailbox.startswith("tcp://127.0.0.1:")
        with LoopbackCapture() as cap:
            assert s.rpc("echo", {"m": MARK_REQ, "r": MARK_REP}) == {"m": MARK_REQ, "r": MARK_REP}
    assert cap.contains(MARK_REQ.encode())
    assert cap.contains(MARK_REP.encode())


# ------------------------------------------------------------ who may connect


def test_unknown_key_is_auth_error_promptly(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    started = time.monotonic()
    with pytest.raises(AuthError, match="refused our key"):
        with Sender("q", endpoint=endpoint, timeout=30, secret_key=keys.secret("stranger"),
                    server_key=keys.server) as s:
            s.rpc("echo", 1)
    assert time.monotonic() - started < 3.0
    # a plain client against a secured sqm: AuthError too, not a 30 s Timeout
    started = time.monotonic()
    with pytest.raises(AuthError):
        with Sender("q", endpoint=endpoint, timeout=30) as s:
            s.rpc("echo", 1)
    assert time.monotonic() - started < 3.0
    # the CLI: one line, non-zero exit, fast
    started = time.monotonic()
    done = run_cli("status", "q", "--endpoint", endpoint, "--timeout", "30",
                   *keys.client_args("stranger"))
    assert done.returncode != 0
    assert time.monotonic() - started < 10.0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: AuthError:"), done.stderr
    # the same for a worker: run() raises AuthError, sqm worker exits non-zero
    done = run_cli("worker", "tests.apps:callbacks", "--queue", "q", "--endpoint", endpoint,
                   *keys.client_args("stranger"))
    assert done.returncode != 0 and "AuthError" in done.stderr, done.stderr


def test_wrong_server_key_is_auth_error(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    with pytest.raises(AuthError):
        with Sender("q", endpoint=endpoint, timeout=30, secret_key=keys.secret("sender"),
                    server_key=str(keys.root / "stranger.key")) as s:
            s.rpc("echo", 1)


# ------------------------------------------------------------ roles


def _raw(keys: Keys, name: str, endpoint: str) -> zmq.Socket:
    pair, server = keys.curve(name)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = pair.secret, pair.public, server
    sock.connect(endpoint)
    return sock


def test_sender_key_as_a_worker_gets_nothing(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    # sqm worker with a sender's key: AuthError at start, non-zero exit
    done = run_cli("worker", "tests.apps:callbacks", "--queue", "q", "--endpoint", endpoint,
                   "--heartbeat", "0.2", *keys.client_args("sender"))
    assert done.returncode != 0 and "AuthError" in done.stderr, done.stderr
    # a hand-made peer with a sender's key saying HELLO: refused, never dispatched to
    rogue = _raw(keys, "sender", endpoint)
    try:
        rogue.send_multipart([SIGNATURE, HELLO, b'{"id": "rogue", "slots": 5}'])
        assert rogue.poll(5000)
        frames = rogue.recv_multipart()
        assert frames[:2] == [SIGNATURE, ERROR] and frames[3] == b"AuthError", frames
        with Sender("q", endpoint=endpoint, timeout=10, secret_key=keys.secret("sender"),
                    server_key=keys.server) as s:
            s.submit("echo", "for a real worker only")
            wait_for(lambda: admin(keys, "q", endpoint)["pending"] == 1, 10, "the message pending")
            rogue.send_multipart([SIGNATURE, HEARTBEAT])
            assert not rogue.poll(1000) or rogue.recv_multipart()[1] != b"D"
        st = admin(keys, "q", endpoint)
        assert st["workers_current"] == 0 and st["assigned_total"] == 0
        assert st["denied_total"] >= 2  # HELLO and the heartbeat, both counted
    finally:
        rogue.close(0)


def test_sender_key_cannot_drain(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    done = run_cli("drain", "q", "--endpoint", endpoint, *keys.client_args("sender"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: AuthError:") and "admin" in lines[0]
    st = admin(keys, "q", endpoint)
    assert st["draining"] is False and st["denied_total"] == 1
    # worker keys neither; admin keys may
    assert run_cli("drain", "q", "--endpoint", endpoint, *keys.client_args("worker")).returncode != 0
    done = run_cli("drain", "q", "--endpoint", endpoint, *keys.client_args("admin"))
    assert done.returncode == 0, done.stderr
    assert admin(keys, "q", endpoint)["draining"] is True


def test_worker_key_may_submit_follow_up_work(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    secured_worker(cluster, keys, endpoint)
    with Sender("q", endpoint=endpoint, timeout=10, secret_key=keys.secret("worker"),
                server_key=keys.server) as s:
        assert s.rpc("add", {"a": 20, "b": 3}) == 23
    assert admin(keys, "q", endpoint)["denied_total"] == 0


# ------------------------------------------------------------ secure default


def test_serve_refuses_a_plain_network_endpoint(cluster: Cluster) -> None:
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    done = run_cli("serve", "q", "--endpoint", endpoint, timeout=20)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--insecure" in lines[0] and "--secret-key" in lines[0]
    proc = cluster.sqm("serve", "q", "--endpoint", endpoint, "--insecure", "--heartbeat", "0.2")
    cluster.wait_status("q", endpoint=endpoint.replace("0.0.0.0", "127.0.0.1"), proc=proc)


def test_ipc_socket_files_are_owner_only_unless_widened(cluster: Cluster, rundir: Path) -> None:
    cluster.serve("a")
    assert stat.S_IMODE(os.stat(rundir / "a.sock").st_mode) == 0o600
    cluster.serve("b", "--ipc-mode", "0660")
    assert stat.S_IMODE(os.stat(rundir / "b.sock").st_mode) == 0o660
    done = run_cli("serve", "c", "--ipc-mode", "999")
    assert done.returncode != 0 and "--ipc-mode" in done.stderr


# ------------------------------------------------------------ env and config


def test_keys_from_env_and_config(cluster: Cluster, keys: Keys, rundir: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    conf = rundir / "sqm.yaml"
    conf.write_text(yaml.safe_dump({
        "endpoint": endpoint,
        "security": {"secret_key": keys.secret("broker"), "clients": str(keys.clients)},
        "queues": {"q": {"secret_key": keys.secret("worker"), "server_key": keys.server}},
    }))
    proc = cluster.sqm("serve", "q", "--config", str(conf), "--heartbeat", "0.2")
    admin(keys, "q", endpoint, proc=proc)
    # a worker whose keys come from the config file (per queue)
    cluster.sqm("worker", "tests.apps:callbacks", "--queue", "q", "--config", str(conf),
                "--heartbeat", "0.2", name="worker-config")
    wait_for(lambda: admin(keys, "q", endpoint)["workers_current"] == 1, 20, "config worker")
    # a Sender whose keys come from the environment
    monkeypatch.setenv("SQM_SECRET_KEY", keys.secret("sender"))
    monkeypatch.setenv("SQM_SERVER_KEY", keys.server)
    with Sender("q", endpoint=endpoint, timeout=10) as s:
        assert s.rpc("add", {"a": 1, "b": 1}) == 2
    # and the CLI from the environment
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = run_cli("submit", "q", "add", '{"a": 2, "b": 2}', "--endpoint", endpoint, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "4", done.stderr


# ------------------------------------------------------------ key file errors


def test_key_file_errors_are_one_line(cluster: Cluster, keys: Keys, rundir: Path) -> None:
    loose = rundir / "loose.key_secret"
    loose.write_bytes(Path(keys.secret("sender")).read_bytes())
    loose.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by group or others"):
        Sender("q", endpoint="tcp://127.0.0.1:1", secret_key=str(loose), server_key=keys.server)
    with pytest.raises(KeyFileError, match="no secret-key"):
        Sender("q", endpoint="tcp://127.0.0.1:1", secret_key=keys.server, server_key=keys.server)
    with pytest.raises(KeyFileError, match="without --server-key"):
        Sender("q", endpoint="tcp://127.0.0.1:1", secret_key=keys.secret("sender"))
    missing = str(rundir / "nope.key_secret")
    done = run_cli("serve", "q", "--endpoint", f"tcp://127.0.0.1:{free_port()}",
                   "--secret-key", missing, "--clients", str(keys.clients))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and missing in lines[0] and "not found" in lines[0]
    done = run_cli("serve", "q", "--endpoint", f"tcp://127.0.0.1:{free_port()}",
                   "--secret-key", keys.secret("broker"), "--clients", str(rundir / "none"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "clients directory" in lines[0]
    done = run_cli("status", "q", "--secret-key", str(loose), "--server-key", keys.server)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and str(loose) in lines[0]


# ------------------------------------------------------------ garbage


def test_unauthenticated_garbage_gets_nothing_into_sqm(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    before = admin(keys, "q", endpoint)
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    stranger = _raw(keys, "stranger", endpoint)
    plain.linger = 0
    plain.connect(endpoint)
    try:
        for i in range(200):
            for sock in (plain, stranger):
                # A refused handshake tears the pipe down: then libzmq has nowhere
                # to queue the garbage (EAGAIN), which is also "nothing got in".
                try:
                    sock.send_multipart([SIGNATURE, b"S", os.urandom(40), b"x" * i], zmq.NOBLOCK)
                    sock.send_multipart([os.urandom(i % 17)], zmq.NOBLOCK)
                except zmq.Again:
                    pass
        # a raw tcp client writing junk bytes, no ZMTP at all
        import socket as _socket

        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        with _socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(os.urandom(4096))
        assert not plain.poll(500) and not stranger.poll(10)
    finally:
        plain.close(0)
        stranger.close(0)
    after = admin(keys, "q", endpoint)
    for key in ("pending", "malformed_total", "assigned_total", "rejected_total", "workers_ever"):
        assert after[key] == before[key], key
    # an admitted sender's garbage does get in, and is counted: the probe above can see
    rogue = _raw(keys, "sender", endpoint)
    try:
        rogue.send_multipart([SIGNATURE, b"S", b"junk", b"x"])
        wait_for(lambda: admin(keys, "q", endpoint)["malformed_total"] == before["malformed_total"] + 1,
                 10, "the admitted sender's junk counted")
    finally:
        rogue.close(0)


@pytest.fixture(autouse=True)
def _no_client_keys_from_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("SQM_SECRET_KEY", "SQM_SERVER_KEY"):
        monkeypatch.delenv(var, raising=False)
    yield


# ------------------------------------------------------------ Python API: Worker and AsyncSender


def test_worker_and_async_sender_keywords(cluster: Cluster, keys: Keys) -> None:
    import asyncio
    import threading

    from sender import AsyncSender
    from worker import Worker

    endpoint = secured(cluster, keys)
    w = Worker("q", endpoint=endpoint, heartbeat=0.2, callbacks={"twice": lambda w, o, p: 2 * p},
               secret_key=keys.secret("worker"), server_key=keys.server)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: admin(keys, "q", endpoint)["workers_current"] == 1, 20, "the worker")

        async def main() -> None:
            async with AsyncSender("q", endpoint=endpoint, timeout=10,
                                   secret_key=keys.secret("sender"), server_key=keys.server) as s:
                assert await s.rpc("twice", 21) == 42
            started = time.monotonic()
            with pytest.raises(AuthError):
                async with AsyncSender("q", endpoint=endpoint, timeout=30,
                                       secret_key=keys.secret("stranger"),
                                       server_key=keys.server) as s:
                    await s.rpc("twice", 1)
            assert time.monotonic() - started < 3.0

        asyncio.run(main())
    finally:
        w.terminate()
        t.join(10)
    # Worker.run() itself raises AuthError for a refused key
    bad = Worker("q", endpoint=endpoint, heartbeat=0.2, callbacks={"twice": lambda w, o, p: p},
                 secret_key=keys.secret("stranger"), server_key=keys.server)
    started = time.monotonic()
    with pytest.raises(AuthError):
        bad.run()
    assert time.monotonic() - started < 3.0


def test_denied_total_in_metrics(cluster: Cluster, keys: Keys) -> None:
    import urllib.request

    port = free_port()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = cluster.sqm("serve", "q", "--heartbeat", "0.2", "--endpoint", endpoint,
                       "--secret-key", keys.secret("broker"), "--clients", str(keys.clients),
                       "--metrics-port", str(port), name="serve-metrics")
    admin(keys, "q", endpoint, proc=proc)
    assert run_cli("purge", "q", "--endpoint", endpoint, *keys.client_args("sender")).returncode != 0

    def scraped() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return 'sqm_denied_total{queue="q"} 1.0' in r.read().decode()

    wait_for(scraped, 15, "sqm_denied_total 1 in /metrics")


# ------------------------------------------------------------ key changes


def test_key_changes_apply_to_new_connections_and_sighup(cluster: Cluster, keys: Keys) -> None:
    import signal

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = cluster.sqm("serve", "q", "--heartbeat", "0.2", "--endpoint", endpoint,
                       "--secret-key", keys.secret("broker"), "--clients", str(keys.clients),
                       name="serve-reload")
    admin(keys, "q", endpoint, proc=proc)
    stranger = keys.curve("stranger")
    client = AdminClient(resolve("q", endpoint=endpoint), 3.0, curve=stranger)
    with pytest.raises(AuthError):
        client.status()
    # added: a new connection is admitted (SIGHUP re-reads at once; sqm survives it)
    target = keys.clients / "senders" / "stranger.key"
    target.write_bytes((keys.root / "stranger.key").read_bytes())
    proc.signal(signal.SIGHUP)

    def admitted() -> bool:
        try:
            return client.status()["queue"] == "q"
        except AuthError:
            return False  # the signal not handled yet: a new connection tries again

    wait_for(admitted, 5, "the added key admitted")
    assert proc.popen.poll() is None
    # removed: an admitted connection keeps its role, a new one is refused
    kept = _raw(keys, "stranger", endpoint)
    try:
        kept.send_multipart([SIGNATURE, b"?"])
        assert kept.poll(5000) and kept.recv_multipart()[1] == b"?"
        target.unlink()
        proc.signal(signal.SIGHUP)

        def refused() -> bool:
            try:
                AdminClient(resolve("q", endpoint=endpoint), 3.0, curve=stranger).status()
            except AuthError:
                return True
            return False

        wait_for(refused, 5, "the removed key refused to new connections")
        kept.send_multipart([SIGNATURE, b"?"])
        assert kept.poll(5000) and kept.recv_multipart()[1] == b"?"
    finally:
        kept.close(0)
    assert proc.popen.poll() is None


def test_no_key_against_a_secured_sqm_is_auth_error(cluster: Cluster, keys: Keys) -> None:
    endpoint = secured(cluster, keys)
    started = time.monotonic()
    done = run_cli("status", "q", "--endpoint", endpoint, "--timeout", "30")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "AuthError" in lines[0], done.stderr
    done = run_cli("worker", "tests.apps:callbacks", "--queue", "q", "--endpoint", endpoint)
    assert done.returncode != 0 and "AuthError" in done.stderr, done.stderr
    assert time.monotonic() - started < 15
