"""AsyncSender: the same calls as coroutines, many at once from one instance."""

from __future__ import annotations

import asyncio

import pytest

from sender import AsyncSender, RemoteError, SQMError, Timeout
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 40))


def test_async_rpc_submit_receive(cluster):
    cluster.serve("q")
    cluster.worker("q")

    async def main():
        async with AsyncSender("q") as s:
            assert await s.rpc("myfunc", {"name": "value"}) == {"response": "I heard you!"}
            mid = await s.submit("add", {"a": 1, "b": 2})
            assert await s.receive(id=mid) == 3
            await s.submit("add", {"a": 5, "b": 5})
            assert await s.receive() == 10
            with pytest.raises(RemoteError) as info:
                await s.rpc("boom", 1)
            assert info.value.type == "ValueError"

    run(main())


def test_many_concurrent_rpcs_no_crossed_replies(cluster):
    cluster.serve("q")
    cluster.worker("q", processes=2)

    async def main():
        async with AsyncSender("q", timeout=30) as s:
            results = await asyncio.gather(
                *(s.rpc("add", {"a": i, "b": 1}) for i in range(500))
            )
            assert results == [i + 1 for i in range(500)]

    run(main())


def test_cancelled_rpc_leaves_sender_healthy(cluster):
    cluster.serve("q")
    cluster.worker("q")

    async def main():
        async with AsyncSender("q") as s:
            task = asyncio.ensure_future(s.rpc("sleep", {"s": 0.5}))
            # cancel while the rpc is really waiting: once the worker has started it
            await asyncio.to_thread(
                wait_for, lambda: read_log(cluster.log), 10, "the worker to start the task"
            )
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert s.outstanding == 0
            assert await s.rpc("add", {"a": 2, "b": 3}) == 5
            with pytest.raises(Timeout):
                await s.rpc("sleep", {"s": 1}, timeout=0.1)
            assert await s.rpc("add", {"a": 4, "b": 3}) == 7

    run(main())


def test_closed_sender_refuses(cluster):
    cluster.serve("q")

    async def main():
        s = AsyncSender("q")
        await s.close()
        with pytest.raises(SQMError, match="closed"):
            await s.submit("add", {})

    run(main())


def test_async_ack_true_reports_the_start_before_the_reply(cluster):
    """``submit(ack=True)``: the worker acknowledges at the start (flag ACK), so
    ``started()`` turns true while a 1 s callback runs, well before its reply."""
    cluster.serve("q")
    cluster.worker("q", "--heartbeat", "5")  # a beat-time ACK could not come in time

    async def main():
        async with AsyncSender("q", timeout=30) as s:
            mid = await s.submit("sleep", {"s": 1.0}, ack=True)
            reply = asyncio.ensure_future(s.receive(id=mid))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not s.started(mid):
                assert loop.time() < deadline, "no ACK"
                assert not reply.done(), "the reply came first"
                await asyncio.sleep(0.01)  # yields to the sender's reader task
            assert (await reply)["slept"] == 1.0

    run(main())
