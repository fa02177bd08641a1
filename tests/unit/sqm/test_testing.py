"""sqm.testing.InProcessBroker: the real broker over inproc://, with a real Worker and Sender."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from sender import Sender
from sqm.testing import InProcessBroker
from tests.conftest import wait_for
from worker import Worker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def broker() -> Iterator[InProcessBroker]:
    with InProcessBroker("q") as b:
        yield b


def _serve(b: InProcessBroker, **callbacks) -> tuple[Worker, threading.Thread]:
    w = Worker("q", endpoint=b.endpoint, context=b.context, callbacks=callbacks)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    wait_for(lambda: b.status()["workers_current"] == 1, 10, "the worker to register")
    return w, t


def _stop(w: Worker, t: threading.Thread) -> None:
    w.terminate()
    t.join(10)
    assert not t.is_alive()


def test_endpoint_is_inproc_and_status_answers(broker):
    assert broker.endpoint.startswith("inproc://sqm-q-")
    st = broker.status()
    assert st["queue"] == "q" and st["endpoint"] == broker.endpoint
    assert st["workers_current"] == 0 and st["pending"] == 0


def test_sender_rpc_through_a_worker(broker):
    w, t = _serve(broker, double=lambda w, o, x: 2 * x)
    try:
        with Sender("q", endpoint=broker.endpoint, context=broker.context) as s:
            assert [s.rpc("double", i, timeout=10) for i in range(5)] == [0, 2, 4, 6, 8]
        wait_for(lambda: broker.status()["completed_total"] == 5, 10, "five completions")
    finally:
        _stop(w, t)


def test_control_drain_holds_messages_until_resume(broker):
    w, t = _serve(broker, echo=lambda w, o, x: x)
    try:
        assert broker.control("drain")["ok"] is True
        with Sender("q", endpoint=broker.endpoint, context=broker.context) as s:
            mid = s.submit("echo", "held")
            wait_for(lambda: broker.status()["pending"] == 1, 10, "the message to wait")
            assert broker.status()["assigned_total"] == 0  # drained: not dispatched
            assert broker.control("resume") == {"ok": True, "pending": 1}
            assert s.receive(id=mid, timeout=10) == "held"
    finally:
        _stop(w, t)


def test_raw_dealer_submit_is_refused_with_a_reason_when_malformed(broker):
    d = broker.context.socket(zmq.DEALER)
    d.linger = 0
    try:
        d.connect(broker.endpoint)
        d.send_multipart([b"SQM1", b"S", b"not an envelope", b"payload"])
        wait_for(lambda: broker.status()["malformed_total"] == 1, 10, "the malformed count")
    finally:
        d.close()


def test_stop_fails_pending_back_and_leaves_a_shared_context_usable():
    ctx = zmq.Context()
    try:
        b = InProcessBroker("q", context=ctx).start()
        with Sender("q", endpoint=b.endpoint, context=ctx) as s:
            mid = s.submit("nobody", 1)
            wait_for(lambda: b.status()["pending"] == 1, 10, "the message to be pending")
            b.stop()
            with pytest.raises(Exception, match="BrokerShutdown|stopped"):
                s.receive(id=mid, timeout=10)
        probe = ctx.socket(zmq.PAIR)  # the context was not terminated by the broker
        probe.close()
    finally:
        ctx.term()
