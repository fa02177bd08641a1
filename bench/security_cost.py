"""What the rights check costs sqm per message: ``python -m bench.security_cost``.

Over a real CURVE connection admitted by ZAP (so frames carry a User-Id),
times, per message: reading the User-Id (``frame.get("User-Id")``), and
:meth:`SecurityPlugin.admit` for SUBMIT (never reads it), DONE (rights
cached per routing id) and HELLO (reads it every time). Compare with the
~10-20 us sqm spends per message in total (BENCHMARKS.md).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import zmq

from sqm.broker.server import BrokerOptions, QueueServer
from sqm.config import resolve
from sqm.plugins import Hooks
from sqm.protocol import DONE, HELLO, SUBMIT
from sqm.security.keys import generate_keypair, load_keypair
from sqm.security.plugin import SecurityPlugin

N = 200_000


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="sqm-seccost-"))
    generate_keypair("broker", d)
    generate_keypair("w", d)
    (d / "clients" / "workers").mkdir(parents=True)
    (d / "clients" / "workers" / "w.key").write_bytes((d / "w.key").read_bytes())
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    plugin = SecurityPlugin(d / "clients")
    plugin.start_context(ctx)
    broker = load_keypair(d / "broker.key_secret")
    name = f"seccost{os.getpid()}"
    server = QueueServer(ctx, resolve(name, endpoint="tcp://127.0.0.1:*"),
                         BrokerOptions(curve_server=broker), time.time(), hooks=Hooks([plugin]))
    endpoint = str(server.sock.getsockopt_string(zmq.LAST_ENDPOINT))
    client = ctx.socket(zmq.DEALER)
    me = load_keypair(d / "w.key_secret")
    client.curve_secretkey, client.curve_publickey, client.curve_serverkey = (
        me.secret, me.public, broker.public)
    client.connect(endpoint)
    client.send_multipart([b"x"])
    rid = server.sock.recv(copy=False)
    server.sock.recv_multipart()
    assert rid.get("User-Id") == "worker", rid.get("User-Id")
    results = {}
    t0 = time.perf_counter()
    for _ in range(N):
        rid.get("User-Id")
    results["frame.get('User-Id')"] = (time.perf_counter() - t0) / N
    for label, cmd in (("admit SUBMIT", SUBMIT), ("admit DONE (cached)", DONE),
                       ("admit HELLO (reads it)", HELLO)):
        t0 = time.perf_counter()
        for _ in range(N):
            plugin.admit(server, rid, cmd)
        results[label] = (time.perf_counter() - t0) / N
    for label, s in results.items():
        print(f"{label:<28} {s * 1e9:7.0f} ns per message")
    client.close(0)
    server.close()
    plugin.stop_context()
    ctx.term()


if __name__ == "__main__":
    main()
