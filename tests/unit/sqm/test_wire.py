"""sqm.wire: frames in, typed commands out; every malformed shape has its reason."""

from __future__ import annotations

import pytest
import zmq

from sqm import protocol, wire
from sqm.protocol import DISPATCH, SIGNATURE, SUBMIT, MailboxPolicy

pytestmark = pytest.mark.timeout(30)


class FakeFrame:
    """A routing-id frame with a Peer-Address property (what SubmitReader reads)."""

    def __init__(self, rid: bytes, peer: str | None = "1.2.3.4") -> None:
        self.bytes = rid
        self.peer = peer

    def get(self, name: str) -> str:
        if self.peer is None:
            raise zmq.ZMQError(zmq.EINVAL)
        return self.peer


def envelope(mailbox: str, mid: bytes = b"id1", method: bytes = b"echo", **kw) -> bytes:
    return protocol.encode_envelope(mid, mailbox.encode(), method, b"cbor", **kw)


def test_commands_table_names_every_input_command():
    assert wire.COMMANDS[SUBMIT] == "submit" and len(wire.COMMANDS) == 14  # + abilities, forward, retry, cancel


def test_check_signature():
    assert wire.check_signature([SIGNATURE, b"S"]) == b"S"
    for frames in ([], [SIGNATURE], [b"HTTP", b"S"]):
        with pytest.raises(wire.Malformed, match="signature"):
            wire.check_signature(frames)


def test_submit_reads_a_message_and_forwards_the_frames_as_dispatch(tmp_path):
    read = wire.SubmitReader(MailboxPolicy([str(tmp_path)])).read
    env = envelope(f"ipc://{tmp_path}/mbox-a.sock", retries=2, priority=protocol.PRIORITY_HIGH)
    frames = [SIGNATURE, SUBMIT, env, b"payload"]
    msg = read(FakeFrame(b"rid", peer=None), b"rid", frames)
    assert (msg.id, msg.origin, msg.size, msg.retries, msg.priority) == (b"id1", b"rid", 7, 2, 0)
    assert msg.method == b"echo" and msg.frames is frames and frames[1] == DISPATCH


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([SIGNATURE, SUBMIT, b"x"], "submit needs 4 frames, got 3"),
        ([SIGNATURE, SUBMIT, b"short", b"p"], "invalid submit envelope"),
    ],
)
def test_submit_malformed_shapes(frames, reason):
    read = wire.SubmitReader(MailboxPolicy()).read
    with pytest.raises(wire.Malformed) as exc:
        read(FakeFrame(b"r"), b"r", frames)
    assert exc.value.reason == reason


def test_submit_mailbox_checked_once_per_sender(tmp_path):
    class CountingPolicy(MailboxPolicy):
        checks = 0

        def check(self, addr, peer=None):
            CountingPolicy.checks += 1
            return super().check(addr, peer)

    read = wire.SubmitReader(CountingPolicy([str(tmp_path)])).read
    env = envelope(f"ipc://{tmp_path}/mbox-a.sock")
    for _ in range(3):
        read(FakeFrame(b"r", peer=None), b"r", [SIGNATURE, SUBMIT, env, b"p"])
    assert CountingPolicy.checks == 1
    with pytest.raises(wire.Malformed, match="mailbox refused"):
        read(FakeFrame(b"r", peer=None), b"r",
             [SIGNATURE, SUBMIT, envelope("ipc:///elsewhere/m.sock"), b"p"])


def test_small_readers():
    assert wire.read_message_id([SIGNATURE, b"R", b"id"], "done") == b"id"
    with pytest.raises(wire.Malformed, match="nack needs 3 frames"):
        wire.read_message_id([SIGNATURE, b"N"], "nack")
    assert wire.read_credit([SIGNATURE, b"C", b"3"]) == 3
    for bad in ([SIGNATURE, b"C"], [SIGNATURE, b"C", b"x"], [SIGNATURE, b"C", b"-1"]):
        with pytest.raises(wire.Malformed, match="credit needs 3 frames"):
            wire.read_credit(bad)
    assert wire.read_hello([SIGNATURE, b"W", b'{"slots": 2}']) == {"slots": 2}
    with pytest.raises(wire.Malformed, match="hello needs a JSON object"):
        wire.read_hello([SIGNATURE, b"W", b"[1]"])
    with pytest.raises(wire.Malformed, match="control needs 3 frames"):
        wire.read_control([SIGNATURE, b"!", b"x" * (wire.MAX_JSON + 1)])


def test_heartbeat_shapes():
    assert wire.read_heartbeat([SIGNATURE, b"H"]) == wire.Beat(None, None, False)
    assert wire.read_heartbeat([SIGNATURE, b"H", b"w1"]) == wire.Beat("w1", None, False)
    assert wire.read_heartbeat([SIGNATURE, b"H", b"w1", b'{"rss_bytes": 1}']) == wire.Beat(
        "w1", {"rss_bytes": 1}, False
    )
    assert wire.read_heartbeat([SIGNATURE, b"H", b"w1", b"nope"]) == wire.Beat("w1", None, True)
