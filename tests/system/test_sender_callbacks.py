"""Task callbacks (on_start, on_status, on_complete, on_fail), poll(), ACCEPTED and ttl.

The first tests feed frames straight into the correlator (no sockets); the
rest run real sqm and worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from sender import AsyncSender, Expired, RemoteError, Sender, SQMError
from sender._correlator import ID_IN_USE, Correlator
from sender._hooks import Hooks, run_calls
from sqm.config import resolve
from sqm.protocol import (
    ACCEPTED,
    ACK,
    ERROR,
    PROGRESS,
    RESULT,
    SIGNATURE,
    decode_envelope,
    pack_ids,
)
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

APPS = "tests.apps.batch:callbacks"


# ---------------------------------------------------------------- the correlator alone


@pytest.fixture
def core(rundir):
    c = Correlator(resolve("q"), serializer="json", allow_pickle=False, max_message_size=1 << 20)
    c.set_mailbox("ipc:///tmp/mbox-test.sock")
    return c


def submit(core, hooks=None, **kw):
    kw.setdefault("oneway", False)
    kw.setdefault("timeout", None)
    kw.setdefault("retries", 0)
    mid, frames = core.encode_submit("m", {"x": 1}, **kw)
    if hooks is not None:
        core.watch(mid, hooks)
    return mid, frames


def record():
    events = []
    hooks = Hooks.make(
        lambda: events.append("start"),
        lambda done, total: events.append(("status", done, total)),
        lambda value: events.append(("complete", value)),
        lambda exc: events.append(("fail", exc)),
    )
    return events, hooks


def test_callbacks_are_queued_in_arrival_order_and_run_only_when_asked(core):
    events, hooks = record()
    mid, _ = submit(core, hooks)
    m = mid.encode()
    core.feed([SIGNATURE, ACK, m], False)
    for i in range(1, 51):
        core.feed([SIGNATURE, PROGRESS, m, b"%d" % i, b"50"], False)
    assert core.feed([SIGNATURE, RESULT, m, b'{"ok": true}'], False) is None  # consumed
    assert events == []  # nothing runs while frames are taken in
    run_calls(core)
    assert events[0] == "start"
    assert events[1:51] == [("status", i, 50) for i in range(1, 51)]
    assert events[51:] == [("complete", {"ok": True})]
    # consumed by on_complete: nothing left for receive()
    assert core.take(None) is None and not core.outstanding and not core.receivable()
    assert core.consuming == 0 and not core.hooks


def test_on_fail_gets_the_exception_and_a_duplicate_ack_is_ignored(core):
    events, hooks = record()
    mid, _ = submit(core, hooks)
    m = mid.encode()
    core.feed([SIGNATURE, ACK, m], False)
    core.feed([SIGNATURE, ACK, m], False)  # e.g. a re-sent copy also started
    core.feed([SIGNATURE, ERROR, m, b"KeyError", b"'a'", b"tb"], False)
    run_calls(core)
    assert events[0] == "start" and len(events) == 2
    exc = events[1][1]
    assert isinstance(exc, RemoteError) and (exc.type, exc.message) == ("KeyError", "'a'")


def test_messages_without_consuming_callbacks_stay_receivable(core):
    events = []
    mid, _ = submit(core, Hooks.make(lambda: events.append("start"), None, None, None))
    plain, _ = submit(core)
    core.feed([SIGNATURE, ACK, mid.encode()], False)
    core.feed([SIGNATURE, RESULT, mid.encode(), b"1"], False)
    core.feed([SIGNATURE, RESULT, plain.encode(), b"2"], False)
    run_calls(core)
    assert events == ["start"]
    assert core.result(core.take(mid)) == 1 and core.result(core.take(plain)) == 2


def test_accepted_is_tracked_and_never_counts_as_dropped(core):
    mid, _ = submit(core)
    assert mid not in core.accepted
    core.feed([SIGNATURE, ACCEPTED, pack_ids([mid.encode()])], True)
    assert mid in core.accepted
    core.feed([SIGNATURE, ACCEPTED, pack_ids([mid.encode()])], False)  # only sqm's count
    for i in range(1000):  # unsolicited: answered already, or not ours
        core.feed([SIGNATURE, ACCEPTED, pack_ids([b"%016x:%d" % (7, i)])], True)
    assert core.dropped == 0
    core.feed([SIGNATURE, RESULT, mid.encode(), b"3"], False)
    assert mid not in core.accepted  # answered: no longer tracked
    core.feed([SIGNATURE, ACCEPTED, pack_ids([mid.encode()])], True)  # ACCEPTED after the reply
    assert core.dropped == 0 and mid not in core.accepted
    core.feed([SIGNATURE, RESULT, mid.encode(), b"3"], False)  # a duplicate reply
    assert core.dropped == 1 and core.result(core.take(mid)) == 3 and core.take(mid) is None


def test_a_resent_copy_meeting_its_original_is_not_an_error(core):
    mid, _ = submit(core)
    core.feed([SIGNATURE, ERROR, mid.encode(), b"Malformed", ID_IN_USE.encode(), b"{}"], True)
    assert mid in core.outstanding and mid in core.accepted and core.take(mid) is None
    other, _ = submit(core)
    core.feed([SIGNATURE, ERROR, other.encode(), b"Malformed", b"bad envelope", b"{}"], True)
    with pytest.raises(SQMError):
        core.result(core.take(other))


def test_ttl_and_timeout_make_the_envelope_deadline(core):
    def deadline(**kw):
        _, frames = submit(core, **kw)
        return decode_envelope(frames[2]).deadline

    now = time.time()
    assert deadline() == 0.0  # a plain submit has none
    assert now + 29 < deadline(timeout=30) <= time.time() + 30
    assert now + 4 < deadline(ttl=5) <= time.time() + 5
    assert deadline(timeout=30, ttl=5) <= time.time() + 5  # the smaller one
    assert deadline(timeout=2, ttl=50) <= time.time() + 2
    mid, _ = submit(core, ttl=5)
    assert core.outstanding[mid] is None  # ttl does not bound the wait for the reply
    with pytest.raises(ValueError, match="ttl"):
        submit(core, ttl=0)


# ---------------------------------------------------------------- end to end


def test_sync_callbacks_run_in_poll_in_order_and_consume_the_reply(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS)
    events = []
    threads = set()

    def note(*what):
        threads.add(threading.get_ident())
        events.append(what)

    with Sender("q") as s:
        mid = s.submit("steps", {"n": 40},
                       on_start=lambda: note("start"),
                       on_status=lambda d, t: note("status", d, t),
                       on_complete=lambda v: note("complete", v),
                       on_fail=lambda e: note("fail", e))
        # The worker answers; with no call into the Sender, nothing runs.
        wait_for(lambda: cluster.status("q")["completed_total"] == 1, 10, "the reply")
        assert events == []
        wait_for(lambda: s.poll(timeout=0.5) and ("complete", {"steps": 40}) in events, 10,
                 "poll to run the callbacks")
        assert s.poll() == 0  # nothing more to handle
        assert threads == {threading.get_ident()}
        assert events[0] == ("start",)
        assert events[1:41] == [("status", i, 40) for i in range(1, 41)]
        assert events[41:] == [("complete", {"steps": 40})]
        # consumed: receive() neither returns it nor waits for it
        with pytest.raises(SQMError, match="nothing to receive"):
            s.receive(timeout=0.2)
        assert s.outstanding == 0
        assert not s.started(mid)


def test_sync_on_start_fires_before_the_reply_and_callbacks_run_inside_receive(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)
    gate = cluster.rundir / "gate"
    events = []
    with Sender("q") as s:
        mid = s.submit("gated", {"gate": str(gate)}, on_start=lambda: events.append("start"),
                       on_status=lambda d, t: events.append((d, t)))
        wait_for(lambda: s.poll(timeout=0.2) >= 0 and events == ["start", (1, 2)], 10,
                 "the acknowledgement and the first progress report")
        assert not s.poll()  # nothing new while the worker waits at the gate
        # Callbacks of other messages run inside receive() too.
        other = s.submit("steps", {"n": 3}, on_complete=lambda v: events.append(("other", v)))
        with pytest.raises(SQMError, match="callbacks"):
            s.receive(id=other)  # its outcome goes to on_complete
        assert s.rpc("add", {"a": 1, "b": 2}) == 3
        wait_for(lambda: s.poll(timeout=0.2) >= 0 and ("other", {"steps": 3}) in events, 10,
                 "the other message's callback")
        gate.touch()
        assert s.receive(id=mid) == "opened"  # no on_complete: receive() gets it
        assert events[:2] == ["start", (1, 2)] and (2, 2) in events
        with pytest.raises(SQMError, match="unknown message id"):
            s.receive(id=other)  # consumed
        assert s.outstanding == 0


def test_on_fail_and_a_raising_callback_do_not_stop_the_sender(cluster, caplog):
    cluster.serve("q")
    cluster.worker("q", target=APPS)
    failures = []
    with Sender("q") as s, caplog.at_level(logging.ERROR, logger="sender"):
        s.submit("boom", 1, on_fail=failures.append)
        s.submit("add", {"a": 1, "b": 1}, on_complete=lambda v: 1 / 0)
        s.submit("boom", 2, on_complete=lambda v: None)  # no on_fail: logged as a warning
        wait_for(lambda: s.poll(timeout=0.2) >= 0 and s.outstanding == 0, 10, "all three")
        assert s.rpc("add", {"a": 2, "b": 2}) == 4
        assert s._core.callback_errors == 1
    assert len(failures) == 1 and isinstance(failures[0], RemoteError)
    assert failures[0].message == "bad things: 1"
    assert "ZeroDivisionError" in caplog.text


def test_callbacks_refused_for_oneway(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        with pytest.raises(ValueError, match="oneway"):
            s.submit("add", {}, oneway=True, on_complete=print)
        with pytest.raises(TypeError, match="on_status"):
            s.submit("add", {}, on_status="not callable")


def test_accepted_acknowledgement_end_to_end(cluster):
    cluster.serve("q")  # no worker: the message stays pending, accepted
    with Sender("q") as s:
        mid = s.submit("add", {"a": 1, "b": 2}, timeout=30)
        wait_for(lambda: s.accepted(mid), 10, "sqm's ACCEPTED")
        assert not s.started(mid)
        cluster.worker("q")
        assert s.receive(id=mid) == 3
        assert not s.accepted(mid)
        # many messages: every ACCEPTED is absorbed, none counts as dropped
        for _ in range(3):
            assert list(s.map("add", [{"a": i, "b": 0} for i in range(300)])) == list(range(300))
        assert s._core.dropped == 0


def test_ttl_expires_a_message_no_worker_took(cluster):
    cluster.serve("q")  # no worker
    with Sender("q") as s:
        t0 = time.monotonic()
        mid = s.submit("add", {"a": 1, "b": 2}, ttl=0.3)
        with pytest.raises(Expired):
            s.receive(id=mid, timeout=10)
        assert time.monotonic() - t0 < 5


def test_async_callbacks_run_on_the_loop_without_anyone_awaiting(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)

    async def main():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        events = []

        async def later(value):  # an async def callback runs as a task
            await asyncio.sleep(0)
            events.append(("async", value))
            done.set()

        async with AsyncSender("q") as s:
            await s.submit("steps", {"n": 30},
                           on_start=lambda: events.append("start"),
                           on_status=lambda d, t: events.append((d, t)),
                           on_complete=later)
            failed = loop.create_future()
            await s.submit("boom", 3, on_fail=failed.set_result)
            await asyncio.wait_for(done.wait(), 10)
            exc = await asyncio.wait_for(failed, 10)
            assert isinstance(exc, RemoteError) and exc.type == "ValueError"
            assert events[0] == "start"
            assert events[1:31] == [(i, 30) for i in range(1, 31)]
            assert events[31:] == [("async", {"steps": 30})]
            with pytest.raises(SQMError, match="nothing to receive"):
                await s.receive(timeout=0.2)
            mid = await s.submit("add", {"a": 1, "b": 1}, timeout=10)
            assert await s.receive(id=mid) == 2
            assert s.outstanding == 0

    asyncio.run(asyncio.wait_for(main(), 40))


def test_async_accepted(cluster):
    cluster.serve("q")

    async def main():
        async with AsyncSender("q") as s:
            mid = await s.submit("add", {"a": 1, "b": 2}, timeout=30)
            for _ in range(500):
                if s.accepted(mid):
                    break
                await asyncio.sleep(0.01)
            assert s.accepted(mid) and not s.started(mid)

    asyncio.run(asyncio.wait_for(main(), 20))
