"""Sender.map and AsyncSender.map: items in order or as they complete, failures in
place, a window measured at the workers, per-item timeouts; 1,000 async rpcs."""

from __future__ import annotations

import asyncio

import pytest

from sender import AsyncSender, RemoteError, Sender, SerializerError, Timeout
from tests.apps.batch import max_concurrency
from tests.conftest import read_log

pytestmark = pytest.mark.timeout(90)

APPS = "tests.apps.batch:callbacks"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_map_in_order_with_failures_in_place(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)
    xs = [3, -1, 4, 1, -5, 9, 2, 6] * 5
    with Sender("q") as s:
        items = list(s.map("square", xs, max_concurrent=7))
        assert len(items) == len(xs)
        for x, item in zip(xs, items, strict=True):
            if x < 0:
                assert isinstance(item, RemoteError), item
                assert (item.type, item.message) == ("ValueError", f"negative: {x}")
            else:
                assert item == x * x
        assert s.outstanding == 0
        # an empty batch is fine; the sender is still usable
        assert list(s.map("square", [])) == []
        assert s.rpc("square", 7) == 49


def test_map_unordered_yields_pairs_as_they_complete(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)
    # The first item takes long: in completion order it comes last.
    payloads = [{"x": 10, "s": 0.8}] + [{"x": i} for i in range(1, 8)]
    with Sender("q") as s:
        pairs = list(s.map("square", payloads, max_concurrent=8, ordered=False))
    assert sorted(i for i, _ in pairs) == list(range(8))
    assert dict(pairs) == {i: p["x"] ** 2 for i, p in enumerate(payloads)}
    assert pairs[-1] == (0, 100), pairs


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_map_never_exceeds_max_concurrent_at_the_workers(cluster, kind):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=6)
    payloads = [{"x": i, "s": 0.25} for i in range(15)]
    if kind == "sync":
        with Sender("q", timeout=30) as s:
            items = list(s.map("tracked", payloads, max_concurrent=3))
    else:
        async def main():
            async with AsyncSender("q", timeout=30) as s:
                return [item async for item in s.map("tracked", payloads, max_concurrent=3)]

        items = run(main())
    assert items == [i * i for i in range(15)]
    entries = read_log(cluster.log)
    assert len(entries) == 30
    # Six idle workers could run all of them at once: the window is the limit.
    assert max_concurrency(entries) == 3


def test_map_timeout_is_per_item(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)
    payloads = [{"x": 1}, {"x": 2, "s": 3}, {"x": 3}, {"x": 4}]
    with Sender("q") as s:
        items = list(s.map("square", payloads, timeout=0.6))
        assert items[0] == 1 and items[2:] == [9, 16]
        assert isinstance(items[1], Timeout) and isinstance(items[1], TimeoutError)
        assert s.outstanding == 0
        # the late reply of the timed-out item is dropped, not handed to the next call
        assert s.rpc("square", {"x": 5}, timeout=10) == 25


def test_map_items_that_cannot_be_sent_fail_in_place(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS)
    with Sender("q") as s:
        items = list(s.map("square", [2, object(), 3]))
    assert items[0] == 4 and items[2] == 9
    assert isinstance(items[1], SerializerError)


def test_map_reads_its_input_lazily_and_can_stop_early(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)
    taken = []

    def payloads():
        for i in range(10_000):
            taken.append(i)
            yield i

    with Sender("q") as s:
        it = s.map("square", payloads(), max_concurrent=5)
        first = [next(it) for _ in range(20)]
        assert first == [i * i for i in range(20)]
        assert len(taken) < 40  # read as the batch goes, not all 10,000 up front
        it.close()  # stop early: what is outstanding is forgotten
        assert s.outstanding == 0
        assert s.rpc("square", 12) == 144


def test_map_refuses_bad_arguments_at_the_call(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        with pytest.raises(ValueError, match="max_concurrent"):
            s.map("square", [1], max_concurrent=0)
        with pytest.raises(ValueError, match="method"):
            s.map("", [1])
        with pytest.raises(ValueError, match="timeout"):
            s.map("square", [1], timeout=0)


def test_async_map_ordered_unordered_and_async_input(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)

    async def gen(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i if i % 7 else -i - 1  # every 7th fails

    async def main():
        async with AsyncSender("q") as s:
            items = [x async for x in s.map("square", gen(50), max_concurrent=8)]
            for i, item in enumerate(items):
                if i % 7:
                    assert item == i * i
                else:
                    assert isinstance(item, RemoteError) and item.type == "ValueError"
            pairs = [p async for p in s.map("square", range(30), ordered=False)]
            assert dict(pairs) == {i: i * i for i in range(30)}
            assert s.outstanding == 0

    run(main())


def test_thousand_concurrent_async_rpcs_each_get_their_own_result(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)

    async def main():
        async with AsyncSender("q", timeout=45) as s:
            async def one(i):
                return i, await s.rpc("add", {"a": i, "b": 1_000_000})

            results = await asyncio.gather(*(one(i) for i in range(1000)))
            assert len(results) == 1000
            for i, value in results:
                assert value == i + 1_000_000, (i, value)
            assert s.outstanding == 0

    run(main())
