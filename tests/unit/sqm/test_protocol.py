"""Mailbox addresses: parsing and the policy deciding where workers may connect."""

from __future__ import annotations

import os

import pytest

from sqm import protocol
from sqm.config import resolve
from sqm.protocol import MailboxPolicy, decode_envelope, encode_envelope, parse_mailbox

pytestmark = pytest.mark.timeout(30)

RUN = "/run/sqm-test"
EXTRA = "/srv/mailboxes"
IPC_PEER = "localhost:0:0:123"  # what a sender connected over ipc looks like


@pytest.fixture
def policy() -> MailboxPolicy:
    return MailboxPolicy([RUN, EXTRA])


def allowed(policy: MailboxPolicy, addr: str, peer: str | None = None) -> bool:
    reason = policy.check(addr, peer)
    assert reason is None or (isinstance(reason, str) and reason), reason
    return reason is None


# --------------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    ("addr", "parsed"),
    [
        ("ipc:///run/sqm/m.sock", ("ipc", "/run/sqm/m.sock", 0)),
        ("tcp://10.1.2.3:5000", ("tcp", "10.1.2.3", 5000)),
        ("tcp://127.0.0.1:1", ("tcp", "127.0.0.1", 1)),
        ("tcp://[::1]:65535", ("tcp", "::1", 65535)),
        ("tcp://[fe80::1]:80", ("tcp", "fe80::1", 80)),
    ],
)
def test_parse_mailbox(addr, parsed):
    assert parse_mailbox(addr) == parsed


@pytest.mark.parametrize(
    "addr",
    [
        "ipc://relative.sock",
        "ipc://./m.sock",
        "ipc://",
        "ipc:///run/sqm/../etc/m.sock",
        "ipc:///run/sqm/./m.sock",
        "ipc:///run/sqm//m.sock",
        "ipc:///run/sqm/m\x00.sock",
        "tcp://localhost:5000",
        "tcp://example.com:5000",
        "tcp://10.1.2.3",
        "tcp://10.1.2.3:",
        "tcp://10.1.2.3:0",
        "tcp://10.1.2.3:65536",
        "tcp://10.1.2.3:http",
        "tcp://10.1.2.3:-1",
        "tcp://*:5000",
        "tcp://:5000",
        "inproc://mailbox",
        "pgm://10.1.2.3;239.192.1.1:5555",
        "epgm://eth0;239.192.1.1:5555",
        "udp://10.1.2.3:5000",
        "ws://10.1.2.3:5000",
        "10.1.2.3:5000",
        "",
    ],
)
def test_parse_mailbox_refuses(addr):
    with pytest.raises(ValueError):
        parse_mailbox(addr)


def test_parse_mailbox_port_must_be_ascii_digits():
    # fullwidth / Arabic-Indic digits: str.isdigit() and int() accept them, but
    # ZeroMQ cannot connect to such an address ("Invalid argument")
    for port in ("\uff15\uff10\uff10\uff10", "\u0665\u0660\u0660\u0660"):
        with pytest.raises(ValueError):
            parse_mailbox(f"tcp://10.1.2.3:{port}")
        assert MailboxPolicy().check(f"tcp://10.1.2.3:{port}") is not None


# --------------------------------------------------------------------------- ipc


@pytest.mark.parametrize("d", [RUN, EXTRA])
def test_ipc_inside_allowed_dirs_ok(policy, d):
    assert allowed(policy, f"ipc://{d}/mbox-1.sock")
    assert allowed(policy, f"ipc://{d}/mbox-1.sock", peer=IPC_PEER)


@pytest.mark.parametrize(
    "addr",
    [
        "ipc:///tmp/mbox.sock",
        "ipc:///run/mbox.sock",  # the parent of an allowed dir
        f"ipc://{RUN}/sub/mbox.sock",  # a subdirectory: not *directly* inside
        f"ipc://{RUN}-evil/mbox.sock",  # a prefix look-alike
        "ipc:///var/run/docker.sock",
    ],
)
def test_ipc_outside_allowed_dirs_refused(policy, addr):
    assert not allowed(policy, addr)


@pytest.mark.parametrize(
    "addr",
    [
        f"ipc://{RUN}/../../tmp/mbox.sock",
        f"ipc://{RUN}/../sqm-test/mbox.sock",  # resolves inside, still refused
        f"ipc://{RUN}/sub/../mbox.sock",
        f"ipc://{RUN}/./mbox.sock",
    ],
)
def test_ipc_dot_dot_refused(policy, addr):
    assert not allowed(policy, addr)


@pytest.mark.parametrize("addr", ["ipc://mbox.sock", "ipc://run/sqm-test/mbox.sock", "ipc://~/m"])
def test_ipc_relative_refused(policy, addr):
    assert not allowed(policy, addr)


def test_no_ipc_dirs_refuses_every_ipc_mailbox():
    assert not allowed(MailboxPolicy(), f"ipc://{RUN}/m.sock")
    assert not allowed(MailboxPolicy(["", None]), "ipc:///m.sock")  # empty entries ignored


def test_ipc_dirs_are_normalised():
    p = MailboxPolicy([RUN + "/", RUN + "/x/..", RUN])
    assert p.ipc_dirs == (RUN,)
    assert allowed(p, f"ipc://{RUN}/m.sock")


# --------------------------------------------------------------------------- other transports


@pytest.mark.parametrize(
    "addr",
    [
        "inproc://mailbox",
        "pgm://eth0;239.192.1.1:5555",
        "epgm://eth0;239.192.1.1:5555",
        "vmci://1:5000",
        "udp://10.1.2.3:5000",
        "ws://10.1.2.3:5000",
        "TCP://10.1.2.3:5000",
    ],
)
def test_other_transports_refused(policy, addr):
    assert not allowed(policy, addr)
    assert not allowed(policy, addr, peer="10.1.2.3")


@pytest.mark.parametrize(
    "addr", ["tcp://localhost:5000", "tcp://example.com:5000", "tcp://my-host:1", "tcp://[host]:1"]
)
def test_host_names_refused(policy, addr):
    assert not allowed(policy, addr)
    assert not allowed(policy, addr, peer="127.0.0.1")


def test_overlong_address_refused(policy):
    addr = f"ipc://{RUN}/" + "m" * (protocol.MAX_MAILBOX + 1) + ".sock"
    assert not allowed(policy, addr)


# --------------------------------------------------------------------------- tcp vs peer


def test_tcp_mailbox_must_match_peer_ip(policy):
    assert allowed(policy, "tcp://10.1.2.3:5000", peer="10.1.2.3")
    assert not allowed(policy, "tcp://10.1.2.4:5000", peer="10.1.2.3")
    assert not allowed(policy, "tcp://192.168.0.1:5000", peer="10.1.2.3")
    assert allowed(policy, "tcp://[2001:db8::5]:5000", peer="2001:db8::5")
    assert not allowed(policy, "tcp://[2001:db8::6]:5000", peer="2001:db8::5")


def test_remote_peer_cannot_aim_workers_at_loopback(policy):
    assert not allowed(policy, "tcp://127.0.0.1:22", peer="10.1.2.3")
    assert not allowed(policy, "tcp://[::1]:22", peer="10.1.2.3")


def test_loopback_peer_must_name_its_own_loopback_address(policy):
    assert allowed(policy, "tcp://127.0.0.1:5000", peer="127.0.0.1")
    assert allowed(policy, "tcp://[::1]:5000", peer="::1")
    assert not allowed(policy, "tcp://127.0.0.2:5000", peer="127.0.0.1")
    assert not allowed(policy, "tcp://[::1]:5000", peer="127.0.0.1")


def test_loopback_mailboxes_refused_on_queues_reached_over_the_network(tmp_path):
    from sqm.config import resolve

    remote = MailboxPolicy.for_settings(resolve("q", endpoint="tcp://10.0.0.5:5555"))
    assert not allowed(remote, "tcp://127.0.0.1:5000")
    assert not allowed(remote, "tcp://[::1]:5000")
    assert allowed(remote, "tcp://10.0.0.9:5000")
    for local in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", f"ipc://{tmp_path}/q.sock"):
        policy = MailboxPolicy.for_settings(resolve("q", endpoint=local))
        assert allowed(policy, "tcp://127.0.0.1:5000"), local


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [("ipc:///tmp/x.sock", True), ("tcp://127.0.0.1:1", True), ("tcp://[::1]:1", True),
     ("tcp://localhost:1", True), ("tcp://10.0.0.5:1", False), ("tcp://example.org:1", False)],
)
def test_endpoint_is_local(endpoint, local):
    from sqm.protocol import endpoint_is_local

    assert endpoint_is_local(endpoint) is local


def test_loopback_peer_with_other_mailbox_refused(policy):
    assert not allowed(policy, "tcp://10.1.2.3:5000", peer="127.0.0.1")


def test_ipc_peer_with_non_loopback_tcp_mailbox_refused(policy):
    assert not allowed(policy, "tcp://10.1.2.3:5000", peer=IPC_PEER)
    assert not allowed(policy, "tcp://10.1.2.3:5000", peer="")


def test_ipc_peer_must_use_an_ipc_mailbox(policy):
    # a local sender on an ipc connection could otherwise aim workers at any local port
    assert not allowed(policy, "tcp://127.0.0.1:5000", peer=IPC_PEER)
    assert allowed(policy, f"ipc://{RUN}/m.sock", peer=IPC_PEER)


def test_without_peer_any_ip_literal_is_allowed(policy):
    assert allowed(policy, "tcp://10.1.2.3:5000")
    assert allowed(policy, "tcp://127.0.0.1:5000")


# --------------------------------------------------------------------------- networks


def test_mailbox_networks_allow_list():
    p = MailboxPolicy([RUN], networks=["10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32"])
    assert allowed(p, "tcp://10.200.3.4:5000")
    assert allowed(p, "tcp://10.200.3.4:5000", peer="10.200.3.4")
    assert allowed(p, "tcp://192.168.1.77:5000", peer="192.168.1.77")
    assert allowed(p, "tcp://[2001:db8::1]:5000", peer="2001:db8::1")
    # outside every listed network: refused even when it is the sender's own address
    assert not allowed(p, "tcp://192.168.2.1:5000", peer="192.168.2.1")
    assert not allowed(p, "tcp://172.16.0.1:5000")
    assert not allowed(p, "tcp://127.0.0.1:5000", peer="127.0.0.1")
    # the peer rule still applies inside the networks
    assert not allowed(p, "tcp://10.0.0.2:5000", peer="10.0.0.1")
    # ipc is governed by the directories, not the networks
    assert allowed(p, f"ipc://{RUN}/m.sock")


def test_networks_not_strict_about_host_bits():
    p = MailboxPolicy(networks=["10.1.2.3/16"])
    assert allowed(p, "tcp://10.1.99.99:1")
    assert not allowed(p, "tcp://10.2.0.1:1")


def test_policy_for_settings(monkeypatch, tmp_path):
    for name in ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    extra = tmp_path / "extra"
    monkeypatch.setenv("SQM_RUNDIR", str(run))
    cfg = {
        "queues": {
            "q": {
                "endpoint": f"ipc://{tmp_path}/sock/q.sock",
                "mailbox_dirs": [str(extra)],
                "mailbox_networks": ["10.0.0.0/8"],
            }
        }
    }
    p = MailboxPolicy.for_settings(resolve("q", config=cfg))
    assert set(p.ipc_dirs) == {str(run), str(tmp_path / "sock"), str(extra)}
    for d in (run, tmp_path / "sock", extra):
        assert allowed(p, f"ipc://{d}/m.sock")
    assert not allowed(p, f"ipc://{tmp_path}/m.sock")
    assert allowed(p, "tcp://10.3.3.3:9", peer="10.3.3.3")
    assert not allowed(p, "tcp://11.3.3.3:9", peer="11.3.3.3")
    # no mailbox_networks: no network restriction
    p2 = MailboxPolicy.for_settings(resolve("other", config={"endpoint": "tcp://10.0.0.1:5"}))
    assert p2.networks is None
    assert p2.ipc_dirs == (os.path.abspath(str(run)),)
    assert allowed(p2, "tcp://172.16.0.1:9", peer="172.16.0.1")


# --------------------------------------------------------------------------- meta


def test_envelope_round_trip():
    env = encode_envelope(b"id:1", b"ipc:///x/m.sock", "méthode".encode(), b"cbor",
                          oneway=True, retries=3, priority=0, deadline=1234.5)
    d = decode_envelope(env)
    assert (d.flags, d.retries, d.priority, d.deadline) == (protocol.FLAG_ONEWAY, 3, 0, 1234.5)
    assert (d.id, d.mailbox, d.method, d.serializer) == (
        b"id:1", b"ipc:///x/m.sock", "méthode".encode(), b"cbor")
    assert d.oneway
    plain = decode_envelope(encode_envelope(b"i", b"", b"m", b"json"))
    assert (plain.flags, plain.retries, plain.priority, plain.deadline) == (0, 0, 1, 0.0)
    assert not plain.oneway


@pytest.mark.parametrize("retries", [-1, 256])
def test_envelope_rejects_bad_retries(retries):
    with pytest.raises(ValueError):
        encode_envelope(b"i", b"", b"m", b"json", retries=retries)


@pytest.mark.parametrize(
    "fields", [(b"", b"", b"m", b"s"), (b"i", b"", b"", b"s"), (b"i", b"", b"m", b""),
               (b"i" * 129, b"", b"m", b"s"), (b"i", b"", b"m" * 257, b"s")],
)
def test_envelope_rejects_empty_or_long_fields(fields):
    with pytest.raises(ValueError):
        encode_envelope(*fields)


@pytest.mark.parametrize("cut", [0, 5, 17, 18, 25])
def test_truncated_or_padded_envelopes_are_refused(cut):
    env = encode_envelope(b"id:1", b"ipc:///x", b"echo", b"cbor")
    with pytest.raises(ValueError):
        decode_envelope(env[:cut])
    with pytest.raises(ValueError):
        decode_envelope(env + b"!")



def test_priority_names():
    assert protocol.PRIORITIES == {"high": 0, "normal": 1, "low": 2}


def test_packed_ids_round_trip():
    from sqm.protocol import pack_ids, unpack_ids

    ids = [b"a", b"0123456789abcdef:42", b"x" * 128, b""]
    assert unpack_ids(pack_ids(ids)) == ids
    assert unpack_ids(b"") == []


def test_inproc_mailbox_only_on_an_in_process_queue():
    inproc = protocol.MailboxPolicy(allow_inproc=True)
    assert inproc.check("inproc://sqm-mbox-0123") is None
    assert inproc.check("inproc://") is not None
    for policy in (protocol.MailboxPolicy(), protocol.MailboxPolicy(["/tmp"])):
        assert "in process" in policy.check("inproc://sqm-mbox-0123")


def test_for_settings_allows_inproc_mailboxes_for_an_inproc_endpoint(tmp_path):
    from sqm.config import QueueSettings

    served = protocol.MailboxPolicy.for_settings(QueueSettings("q", "inproc://q", str(tmp_path)))
    assert served.check("inproc://sqm-mbox-1") is None
    over_ipc = QueueSettings("q", f"ipc://{tmp_path}/q.sock", str(tmp_path))
    assert protocol.MailboxPolicy.for_settings(over_ipc).check("inproc://sqm-mbox-1") is not None


def test_loopback_peer_may_name_an_address_of_this_host_but_no_other():
    """A sender beside the broker (loopback peer) whose mailbox is on this
    host's network address, so other brokers' workers reach it too."""
    import socket as _socket

    from sqm.protocol import is_own_address

    probe = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
        own = probe.getsockname()[0]
    except OSError:
        own = "127.0.0.1"
    finally:
        probe.close()
    policy = MailboxPolicy([RUN])
    if own != "127.0.0.1":
        assert is_own_address(own)
        assert allowed(policy, f"tcp://{own}:5000", peer="127.0.0.1")
    assert not is_own_address("192.0.2.77")
    assert not allowed(policy, "tcp://192.0.2.77:5000", peer="127.0.0.1")


def test_a_loopback_broker_anywhere_in_the_list_allows_loopback_mailboxes(tmp_path):
    from sqm.config import QueueSettings

    both = QueueSettings("q", "tcp://10.0.0.2:5555", str(tmp_path), {},
                         ("tcp://10.0.0.2:5555", "tcp://127.0.0.1:5555"))
    remote = QueueSettings("q", "tcp://10.0.0.2:5555", str(tmp_path), {},
                           ("tcp://10.0.0.2:5555",))
    assert MailboxPolicy.for_settings(both).check("tcp://127.0.0.1:5000") is None
    assert MailboxPolicy.for_settings(remote).check("tcp://127.0.0.1:5000") is not None
