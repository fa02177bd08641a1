"""Live fuzz: random and mutated multi-frame messages at a running sqm, secured and not.

Each sqm (a real ``sqm serve`` process on tcp, 127.0.0.1) with a real worker
(``sqm worker sqm.examples:callbacks``) gets ``messages`` messages from
several peers: a plain (unauthenticated) one, a CURVE one with an unknown
key, and CURVE ones with a sender's and a worker's key (the secured sqm);
plain ones only for the insecure sqm. Messages are random frames, or real
sqm messages (SUBMIT, HELLO, DONE, HEARTBEAT with reports, CONTROL, ...)
with bytes flipped, frames added or dropped. Afterwards the sqm process
must still run, its fake workers must have expired, and a real Sender must
get correct replies. Admin keys are not used: an admin may legitimately
shut sqm down.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from sender import Sender
from sqm import protocol
from sqm.admin import AdminClient
from sqm.config import resolve
from sqm.security.keys import KeyPair, generate_keypair, load_keypair, load_public_key

REPO = Path(__file__).resolve().parent.parent
_pause = threading.Event().wait
QUEUE = "fz"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        _pause(0.05)  # the polling interval of a condition with a deadline
    raise TimeoutError(f"timed out waiting for {what}")


class Keys:
    def __init__(self, root: Path) -> None:
        self.root = root
        for name in ("broker", "sender", "worker", "stranger"):
            generate_keypair(name, root)
        for role in ("sender", "worker"):
            d = root / "clients" / f"{role}s"
            d.mkdir(parents=True)
            (d / f"{role}.key").write_bytes((root / f"{role}.key").read_bytes())

    def pair(self, name: str) -> KeyPair:
        return load_keypair(self.root / f"{name}.key_secret")

    @property
    def server(self) -> bytes:
        return load_public_key(self.root / "broker.key")


def _samples(rng: random.Random) -> list[list[bytes]]:
    """Real sqm messages to mutate."""
    env = protocol.pack_envelope(0, 0, 1, 0.0, b"m1", b"tcp://127.0.0.1:9", b"echo", b"cbor")
    return [
        [protocol.SIGNATURE, protocol.SUBMIT, env, b"\xa0"],
        [protocol.SIGNATURE, protocol.HELLO, json.dumps({"id": "fz", "slots": 2,
                                                          "methods": ["echo"]}).encode()],
        [protocol.SIGNATURE, protocol.DONE, b"m1"],
        [protocol.SIGNATURE, protocol.NACK, b"m1"],
        [protocol.SIGNATURE, protocol.CREDIT, b"1"],
        [protocol.SIGNATURE, protocol.HEARTBEAT],
        [protocol.SIGNATURE, protocol.HEARTBEAT, b"fz", json.dumps({"rss": 1}).encode()],
        [protocol.SIGNATURE, protocol.CONTROL, json.dumps({"cmd": "workers"}).encode()],
        [protocol.SIGNATURE, protocol.CONTROL, json.dumps({"cmd": "drain"}).encode()],
        [protocol.SIGNATURE, protocol.STATUS],
        [protocol.SIGNATURE, protocol.BYE],
    ]


def _message(rng: random.Random, samples: list[list[bytes]]) -> list[bytes]:
    if rng.random() < 0.3:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 6))]
    frames = list(rng.choice(samples))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(frames))
        f = bytearray(frames[i])
        if op == 0 and f:
            f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
        elif op == 1:
            f[rng.randrange(len(f) + 1):0] = rng.randbytes(rng.randrange(1, 8))
        elif op == 2 and len(frames) > 1:
            del frames[i]
            continue
        elif op == 3:
            frames.insert(i, rng.randbytes(rng.randrange(0, 16)))
            continue
        frames[i] = bytes(f)
    return frames


def _peer(ctx: zmq.Context[Any], endpoint: str, pair: KeyPair | None, server: bytes | None,
          rng: random.Random) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 1000
    sock.routing_id = b"F" + rng.randbytes(8)
    if pair is not None and server is not None:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = (
            pair.secret, pair.public, server)
    sock.connect(endpoint)
    return sock  # type: ignore[no-any-return]


def _fuzz_one(name: str, messages: int, seed: int, workdir: Path, keys: Keys | None,
              env: dict[str, str]) -> dict[str, Any]:
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "sqm", "serve", QUEUE, "--endpoint", endpoint,
             "--heartbeat", "0.2", "--log-level", "error"]
    client: list[str] = []
    curve: tuple[KeyPair, bytes] | None = None
    if keys is not None:
        serve += ["--secret-key", str(keys.root / "broker.key_secret"),
                  "--clients", str(keys.root / "clients")]
        client = ["--secret-key", str(keys.root / "worker.key_secret"),
                  "--server-key", str(keys.root / "broker.key")]
        # sqm status and the final check read status with a worker key (no admin here)
        curve = (keys.pair("worker"), keys.server)
    procs: list[subprocess.Popen[bytes]] = []
    log = open(workdir / f"{name}.log", "wb")
    try:
        procs.append(subprocess.Popen(serve, cwd=REPO, env=env, stdout=log, stderr=log,
                                      start_new_session=True))
        admin = AdminClient(resolve(QUEUE, endpoint=endpoint), 1.0, curve=curve)

        def status() -> dict[str, Any] | None:
            if procs[0].poll() is not None:
                raise RuntimeError(f"sqm ({name}) exited: {(workdir / f'{name}.log').read_text()}")
            try:
                return admin.status()
            except Exception:
                return None

        _wait(status, 15, f"sqm ({name}) up")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sqm", "worker", "sqm.examples:callbacks", "--queue", QUEUE,
             "--endpoint", endpoint, "--heartbeat", "0.2", "--log-level", "error", *client],
            cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True))
        _wait(lambda: (st := status()) and st["workers_current"] == 1, 20, "the real worker")
        rng = random.Random(seed)
        ctx: zmq.Context[Any] = zmq.Context()
        peers = [_peer(ctx, endpoint, None, None, rng)]
        if keys is not None:
            peers.append(_peer(ctx, endpoint, keys.pair("stranger"), keys.server, rng))
            peers.append(_peer(ctx, endpoint, keys.pair("sender"), keys.server, rng))
            peers.append(_peer(ctx, endpoint, keys.pair("worker"), keys.server, rng))
        else:
            peers += [_peer(ctx, endpoint, None, None, rng) for _ in range(2)]
        samples = _samples(rng)
        sent = 0
        for i in range(messages):
            sock = peers[i % len(peers)]
            try:
                sock.send_multipart(_message(rng, samples), zmq.NOBLOCK)
            except zmq.Again:  # an unauthenticated peer's queue fills: nobody reads it
                pass
            sent += 1
            if i % 64 == 0:
                for p in peers:
                    while p.poll(0):
                        p.recv_multipart()
                if procs[0].poll() is not None:
                    raise RuntimeError(f"sqm ({name}) died during the fuzz")
        for p in peers:
            p.close(0)
        ctx.term()
        # sqm still serves; the fuzz's fake workers expire (3 heartbeats); a draining
        # request from the fuzz (insecure sqm) is undone as an operator would
        last: list[Any] = [None]

        def settled() -> bool:
            """sqm has read the whole fuzz (its counts stopped moving), the fuzz's
            drain requests are undone as an operator would, its fake workers expired."""
            st = status()
            if st is None:
                return False
            if st.get("draining"):
                admin.resume()
                return False
            seen = (st["malformed_total"], st.get("denied_total"), st["workers_ever"])
            stable, last[0] = seen == last[0], seen
            return bool(stable and st["workers_current"] == 1)

        _wait(settled, 30, f"sqm ({name}) settled after the fuzz")
        kw: dict[str, Any] = {}
        if keys is not None:
            kw = {"secret_key": str(keys.root / "sender.key_secret"),
                  "server_key": str(keys.root / "broker.key")}
        with Sender(QUEUE, endpoint=endpoint, timeout=10, **kw) as s:
            try:
                ok = all(s.rpc("add", {"a": i, "b": 1}) == i + 1 for i in range(20))
            except Exception as exc:
                raise RuntimeError(f"sqm ({name}): {exc!r} after the fuzz; status {status()}") from exc
        if not ok:
            raise RuntimeError(f"sqm ({name}): wrong replies after the fuzz")
        final = status() or {}
        return {"sent": sent, "peers": len(peers), "rpc": "20/20 correct",
                "malformed_total": final.get("malformed_total"),
                "denied_total": final.get("denied_total"),
                "workers_ever": final.get("workers_ever")}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        log.close()


def live_fuzz(messages: int, seed: int, workdir: str) -> dict[str, Any]:
    """Fuzz a secured and an insecure sqm with ``messages`` messages each."""
    root = Path(workdir)
    keys = Keys(root / "keys")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["SQM_RUNDIR"] = str(root / "run")
    for var in ("SQM_SECRET_KEY", "SQM_SERVER_KEY", "SQM_ENDPOINT", "SQM_CONFIG"):
        env.pop(var, None)
    return {
        "secured": _fuzz_one("secured", messages, seed, root, keys, env),
        "insecure": _fuzz_one("insecure", messages, seed + 1, root, None, env),
    }
