""""No broker" is noticed by the Sender, not only by the CLI (issue 17, point 2).

Before: ``Sender("nosuchq").rpc(..., timeout=3)`` waited 3 s and raised a
bare ``Timeout``. Now an ipc endpoint with no listener fails at once with
``BrokerUnreachable``, and a tcp one ends in a Timeout naming the endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from sender import AsyncSender, BrokerUnreachable, Sender, SQMError, Timeout
from tests.conftest import Cluster, free_port, read_log


def test_rpc_with_no_socket_file_fails_promptly(rundir: Path) -> None:
    assert not (rundir / "nosuchq.sock").exists()
    with Sender("nosuchq") as s:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnreachable) as info:
            s.rpc("add", {"a": 1, "b": 2}, timeout=3)
        elapsed = time.monotonic() - t0
        assert s.outstanding == 0
    assert elapsed < 1.5, f"took {elapsed:.2f} s for a broker that is not there"
    assert isinstance(info.value, SQMError)
    assert f"no broker reached at ipc://{rundir}/nosuchq.sock" in str(info.value)


def test_stale_socket_file_with_nobody_listening_fails_promptly(rundir: Path) -> None:
    path = rundir / "stale.sock"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.bind(str(path))
    probe.close()  # the file stays, nobody listens: ECONNREFUSED
    assert path.exists()
    with Sender("stale") as s:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnreachable):
            s.receive(id=s.submit("add", {"a": 1, "b": 2}, timeout=3))
        assert time.monotonic() - t0 < 1.5


def test_async_rpc_with_no_broker_fails_promptly(rundir: Path) -> None:
    async def main() -> float:
        async with AsyncSender("nosuchq") as s:
            t0 = time.monotonic()
            with pytest.raises(BrokerUnreachable, match="no broker reached"):
                await s.rpc("add", {"a": 1, "b": 2}, timeout=3)
            return time.monotonic() - t0

    assert asyncio.run(main()) < 1.5


def test_tcp_with_no_broker_times_out_naming_the_endpoint(rundir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Sender("q", endpoint=endpoint) as s:
        with pytest.raises(Timeout) as info:
            s.rpc("add", {"a": 1, "b": 2}, timeout=0.5)
    assert f"no broker reached at {endpoint}" in str(info.value)


def test_a_reachable_broker_is_not_mistaken_for_none(cluster: Cluster) -> None:
    cluster.serve("q")
    with Sender("q") as s:
        with pytest.raises(SQMError) as info:
            s.rpc("add", {"a": 1, "b": 2}, timeout=0.3)  # no worker: it expires in sqm
    assert not isinstance(info.value, BrokerUnreachable)
    assert "no broker reached" not in str(info.value)


def test_unreachable_message_is_not_run_by_a_broker_started_later(cluster: Cluster) -> None:
    with Sender("late") as s:
        with pytest.raises(BrokerUnreachable):
            s.rpc("record", "told-unreachable", timeout=10)
        cluster.serve("late")
        cluster.worker("late")
        assert s.rpc("record", "after-start", timeout=10) is not None
    assert [e["payload"] for e in read_log(cluster.log)] == ["after-start"]


def test_map_items_with_no_broker_say_so(rundir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Sender("q", endpoint=endpoint) as s:
        items = list(s.map("add", [{"a": 1, "b": 1}], timeout=0.3))
    assert isinstance(items[0], Timeout)
    assert f"no broker reached at {endpoint}" in str(items[0])
