"""Where a Sender's ipc mailbox goes, and that it fails at once when no path fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from sender import Sender
from sqm.errors import ConfigError


def test_mailbox_goes_beside_the_queue_socket(rundir: Path) -> None:
    with Sender("q") as s:
        assert s.mailbox.startswith(f"ipc://{rundir}/mbox-")


def test_a_long_queue_directory_falls_back_to_the_run_directory(rundir: Path) -> None:
    deep = rundir / ("d" * (95 - len(str(rundir))))  # q.sock fits, mbox-<hex>.sock not
    with Sender("q", endpoint=f"ipc://{deep}/q.sock") as s:
        assert s.mailbox.startswith(f"ipc://{rundir}/mbox-")


def test_no_directory_that_fits_is_a_clear_error(rundir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    long_rundir = rundir / ("r" * 90)
    monkeypatch.setenv("SQM_RUNDIR", str(long_rundir))
    with pytest.raises(ConfigError, match="SQM_RUNDIR"):
        Sender("q", endpoint=f"ipc://{long_rundir}/q.sock")
    assert not long_rundir.exists() or not list(long_rundir.glob("mbox-*"))


# --------------------------------------------------------------------------- tcp, several brokers

ROUTES = {"127.0.0.1": "127.0.0.1", "10.0.0.2": "10.0.0.1", "10.0.0.3": "10.0.0.1",
          "192.168.5.9": "192.168.5.1"}


def tcp_mailbox(monkeypatch: pytest.MonkeyPatch, *hosts: str, **options: object) -> str:
    """The mailbox a sender would bind for brokers on ``hosts`` (routes faked)."""
    from sender import _correlator
    from sqm.config import QueueSettings

    monkeypatch.setattr(_correlator, "local_address_towards", ROUTES.__getitem__)
    endpoints = tuple(f"tcp://{h}:5555" for h in hosts)
    settings = QueueSettings("q", endpoints[0], "/tmp", dict(options), endpoints)
    core = _correlator.Correlator(settings, serializer="cbor", allow_pickle=False,
                                  max_message_size=1 << 20)
    return core.mailbox_bind_address()


def test_a_loopback_broker_listed_first_does_not_pick_the_mailbox(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert tcp_mailbox(monkeypatch, "127.0.0.1", "10.0.0.2") == "tcp://10.0.0.1:*"
    assert tcp_mailbox(monkeypatch, "10.0.0.2", "127.0.0.1") == "tcp://10.0.0.1:*"
    assert tcp_mailbox(monkeypatch, "10.0.0.2", "10.0.0.3") == "tcp://10.0.0.1:*"
    assert tcp_mailbox(monkeypatch, "127.0.0.1") == "tcp://127.0.0.1:*"


def test_brokers_needing_different_addresses_is_a_prompt_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sqm.errors import SQMError

    with pytest.raises(SQMError, match="mailbox_bind"):
        tcp_mailbox(monkeypatch, "10.0.0.2", "192.168.5.9")
    # mailbox_networks settles which one, when only one is inside them.
    assert tcp_mailbox(monkeypatch, "10.0.0.2", "192.168.5.9",
                       mailbox_networks=["192.168.5.0/24"]) == "tcp://192.168.5.1:*"


def test_a_mailbox_outside_mailbox_networks_is_a_prompt_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sqm.errors import SQMError

    with pytest.raises(SQMError, match="mailbox_networks"):
        tcp_mailbox(monkeypatch, "10.0.0.2", mailbox_networks=["172.16.0.0/12"])
    assert tcp_mailbox(monkeypatch, "127.0.0.1", "10.0.0.2",
                       mailbox_networks=["10.0.0.0/8"]) == "tcp://10.0.0.1:*"
