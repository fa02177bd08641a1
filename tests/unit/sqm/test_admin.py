"""sqm.admin.AdminClient against a scripted ROUTER (no broker process)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import zmq

from sqm import protocol
from sqm.admin import AdminClient, control_request, fetch_status
from sqm.config import resolve
from sqm.errors import AuthError, SQMError


@pytest.fixture
def fake_sqm() -> Iterator[tuple[str, list[list[bytes]]]]:
    """A ROUTER answering STATUS with {"queue": "q"} and CONTROL by echoing the request."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen: list[list[bytes]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(20):
                continue
            peer, *frames = router.recv_multipart()
            seen.append(frames)
            if frames[1] == protocol.STATUS:
                answer = {"queue": "q"}
            else:
                request = json.loads(frames[2])
                answer = ({"ok": False, "error": "no such worker"}
                          if request.get("id") == "ghost" else {"ok": True, "echo": request})
            router.send_multipart([peer, protocol.SIGNATURE, frames[1],
                                   json.dumps(answer).encode()])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}", seen
    finally:
        stop.set()
        thread.join(5)
        router.close(0)


def test_each_command_sends_its_control_request(fake_sqm):
    endpoint, seen = fake_sqm
    client = AdminClient(resolve("q", endpoint=endpoint), timeout=5)
    assert client.status() == {"queue": "q"}
    assert client.drain()["echo"] == {"cmd": "drain"}
    assert client.resume()["echo"] == {"cmd": "resume"}
    assert client.purge()["echo"] == {"cmd": "purge"}
    assert client.shutdown()["echo"] == {"cmd": "shutdown"}
    assert client.stop_worker("w1")["echo"] == {"cmd": "stop-worker", "id": "w1"}
    assert [f[1] for f in seen] == [protocol.STATUS] + [protocol.CONTROL] * 5
    assert all(f[0] == protocol.SIGNATURE for f in seen)


def test_a_refusal_raises_with_sqms_reason(fake_sqm):
    endpoint, _ = fake_sqm
    with pytest.raises(SQMError, match="no such worker"):
        AdminClient(resolve("q", endpoint=endpoint), timeout=5).stop_worker("ghost")


def test_module_functions_keep_their_old_signatures(fake_sqm):
    endpoint, _ = fake_sqm
    settings = resolve("q", endpoint=endpoint)
    assert fetch_status(settings, 5.0) == {"queue": "q"}
    assert control_request(settings, {"cmd": "drain"}, 5.0)["echo"] == {"cmd": "drain"}


def test_no_answer_is_an_error_within_the_timeout():
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(SQMError, match="no answer from sqm"):
            AdminClient(resolve("q", endpoint=f"tcp://127.0.0.1:{port}"), timeout=0.2).status()
    finally:
        silent.close(0)


def test_missing_ipc_broker_is_named_at_once(tmp_path):
    with pytest.raises(SQMError, match="no sqm is serving queue 'q'"):
        AdminClient(resolve("q", endpoint=f"ipc://{tmp_path}/q.sock")).status()


def test_curve_keys_reach_a_curve_server_and_plain_does_not():
    from sqm.security.keys import KeyPair
    from sqm.sockets import make_socket

    server = KeyPair(*zmq.curve_keypair())
    client = KeyPair(*zmq.curve_keypair())
    ctx = zmq.Context.instance()
    router = make_socket(ctx, zmq.ROUTER, linger_ms=0, curve_server=server)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    settings = resolve("q", endpoint=f"tcp://127.0.0.1:{port}")

    def answer_one() -> None:
        if router.poll(10_000):
            peer, *frames = router.recv_multipart()
            router.send_multipart([peer, protocol.SIGNATURE, frames[1], b'{"queue": "q"}'])

    try:
        # a plain client is never heard, and says why at once (SPEC: AuthError, not a wait)
        with pytest.raises(AuthError, match="one end uses CURVE"):
            AdminClient(settings, timeout=5).status()
        thread = threading.Thread(target=answer_one, daemon=True)
        thread.start()
        assert AdminClient(settings, timeout=10, curve=(client, server.public)).status() == {
            "queue": "q"}
        thread.join(10)
    finally:
        router.close(0)
