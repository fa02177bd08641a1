"""A deadline that passes before a worker is free ends as Expired at the
caller too, as sqm counts it (issue 17, point 5 / the Sender's part).

Before: ``rpc(timeout=...)`` raised ``Timeout`` while ``sqm status``
counted the message in ``expired_total``.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sender import AsyncSender, Expired, Sender, Timeout
from tests.conftest import Cluster, read_log


def test_rpc_whose_deadline_passes_while_pending_raises_expired(cluster: Cluster) -> None:
    cluster.serve("q")  # no worker: the message stays pending
    with Sender("q") as s:
        t0 = time.monotonic()
        with pytest.raises(Expired):
            s.rpc("record", "never-run", timeout=0.5)
        elapsed = time.monotonic() - t0
        assert s.outstanding == 0
    assert 0.45 <= elapsed < 2.5, f"Expired after {elapsed:.2f} s for a 0.5 s deadline"
    st = cluster.status("q")
    assert st["expired_total"] == 1 and st["pending"] == 0
    cluster.worker("q")
    with Sender("q") as s:
        assert s.rpc("record", "later", timeout=10)["payload"] == "later"
    assert [e["payload"] for e in read_log(cluster.log)] == ["later"]


def test_receive_with_its_own_shorter_wait_is_still_a_timeout(cluster: Cluster) -> None:
    cluster.serve("q")
    with Sender("q") as s:
        mid = s.submit("record", "x", timeout=1.0)
        with pytest.raises(Timeout) as waited:
            s.receive(id=mid, timeout=0.1)  # the caller's wait, not the message's deadline
        assert not isinstance(waited.value, Expired)
        with pytest.raises(Expired):
            s.receive(id=mid)


def test_map_item_that_expires_in_sqm_is_expired(cluster: Cluster) -> None:
    cluster.serve("q")
    with Sender("q") as s:
        items = list(s.map("record", ["a", "b"], timeout=0.4))
    assert all(isinstance(item, Expired) for item in items), items
    assert cluster.status("q")["expired_total"] == 2


def test_async_rpc_whose_deadline_passes_while_pending_raises_expired(cluster: Cluster) -> None:
    cluster.serve("q")

    async def main() -> None:
        async with AsyncSender("q") as s:
            with pytest.raises(Expired):
                await s.rpc("record", "never-run", timeout=0.5)

    asyncio.run(main())
    assert cluster.status("q")["expired_total"] == 1


def test_a_started_message_still_times_out(cluster: Cluster) -> None:
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        with pytest.raises(Timeout) as info:
            s.rpc("sleep", {"s": 2}, timeout=0.5)
    assert not isinstance(info.value, Expired)
