"""Outstanding messages, oneway, FIFO, errors, timeouts and serializers end to end."""

from __future__ import annotations

import pytest

from sender import RemoteError, Sender, SerializerError, SQMError, Timeout
from sqm import serializers
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(60)


def test_many_outstanding_replies_kept_while_waiting_for_one(cluster):
    cluster.serve("q")
    cluster.worker("q", processes=2)
    with Sender("q") as s:
        ids = [s.submit("add", {"a": i, "b": 1000}) for i in range(300)]
        assert len(set(ids)) == 300
        # Wait for the last one first: replies for the others must be kept.
        assert s.receive(id=ids[-1]) == 299 + 1000
        got = {mid: s.receive(id=mid) for mid in ids[:-1]}
        assert got == {mid: i + 1000 for i, mid in enumerate(ids[:-1])}
        assert s.outstanding == 0
        with pytest.raises(SQMError, match="unknown message id"):
            s.receive(id=ids[0])


def test_receive_any_returns_every_result_once(cluster):
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        for i in range(50):
            s.submit("add", {"a": i, "b": 0})
        assert sorted(s.receive() for _ in range(50)) == list(range(50))
        with pytest.raises(SQMError, match="nothing to receive"):
            s.receive(timeout=0.2)


def test_oneway_is_handled_and_gets_no_reply(cluster):
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        for i in range(5):
            s.submit("record", {"oneway": i}, oneway=True)
        wait_for(lambda: len(read_log(cluster.log)) == 5, 10, "5 oneway messages handled")
        assert s.outstanding == 0
        with pytest.raises(SQMError, match="nothing to receive"):
            s.receive(timeout=0.2)
    assert [e["payload"]["oneway"] for e in read_log(cluster.log)] == [0, 1, 2, 3, 4]
    wait_for(lambda: cluster.status("q")["completed_total"] == 5, 5, "completed_total 5")


def test_fifo_when_no_worker_is_up(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        ids = [s.submit("record", {"n": i}, timeout=30) for i in range(40)]
        wait_for(lambda: cluster.status("q")["pending"] == 40, 10, "40 pending")
        cluster.worker("q")
        results = [s.receive(id=mid) for mid in ids]
    assert [r["payload"]["n"] for r in results] == list(range(40))
    assert [e["payload"]["n"] for e in read_log(cluster.log)] == list(range(40))


def test_unknown_method_and_raising_callback(cluster):
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        with pytest.raises(RemoteError) as info:
            s.rpc("no_such_method", {})
        assert info.value.type == "UnknownMethod"
        assert "no_such_method" in info.value.message
        with pytest.raises(RemoteError) as info:
            s.rpc("boom", "x")
        assert (info.value.type, info.value.message) == ("ValueError", "bad things: x")
        assert 'raise ValueError(f"bad things: {payload}")' in info.value.traceback
        assert isinstance(info.value.traceback, str)
        # the worker keeps running after both
        assert s.rpc("add", {"a": 1, "b": 1}) == 2
    # DONE reaches sqm just after the reply reaches us: wait for the counts
    wait_for(lambda: cluster.status("q")["completed_total"] == 1, 5, "completed_total 1")
    assert cluster.status("q")["failed_total"] == 2


def test_rpc_timeout(cluster):
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        with pytest.raises(Timeout) as info:
            s.rpc("sleep", {"s": 2}, timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        # the late reply is dropped, not delivered to the next call
        assert s.rpc("add", {"a": 2, "b": 2}, timeout=5) == 4
        assert s.outstanding == 0


def test_receive_timeout_keeps_message_outstanding(cluster):
    cluster.serve("q")
    cluster.worker("q")
    with Sender("q") as s:
        mid = s.submit("sleep", {"s": 0.5})
        with pytest.raises(Timeout):
            s.receive(id=mid, timeout=0.05)
        assert s.receive(id=mid, timeout=5)["slept"] == 0.5


def test_working_acknowledgement_arrives_before_the_reply(cluster):
    cluster.serve("q")
    with Sender("q") as s:
        mid = s.submit("sleep", {"s": 0.5}, timeout=30, ack=True)
        assert not s.started(mid)  # no worker yet: still pending in sqm
        cluster.worker("q")
        wait_for(lambda: s.started(mid), 10, "the worker's working acknowledgement")
        assert s.outstanding == 1  # acknowledged, not answered yet
        assert s.receive(id=mid)["slept"] == 0.5
        assert not s.started(mid)  # answered: no longer tracked


def test_without_ack_a_long_callback_is_acknowledged_by_the_worker_s_next_beat(cluster):
    """No ACK at the start unless asked for (one mailbox message less per task):
    the heartbeat thread sends the first one while the callback runs."""
    cluster.serve("q")
    cluster.worker("q", "--heartbeat", "0.5")
    with Sender("q") as s:
        mid = s.submit("sleep", {"s": 3}, timeout=30)
        wait_for(lambda: s.started(mid), 2.5, "the worker's first beat-time ACK")
        assert s.outstanding == 1  # acknowledged, not answered yet
        assert s.receive(id=mid)["slept"] == 3


@pytest.mark.parametrize("name", ["cbor", "json", "yaml", "pickle"])
def test_mixed_serializers(cluster, name):
    cluster.serve("q")
    cluster.worker("q", "--allow-pickle")
    payload = {"text": "héllo", "n": [1, 2.5, None, True]}
    with Sender("q", serializer=name, allow_pickle=(name == "pickle")) as s, \
            Sender("q") as other:
        assert s.rpc("types", payload) == {"echo": payload, "type": "dict"}
        assert other.rpc("types", [1, "x"]) == {"echo": [1, "x"], "type": "list"}


def test_pickle_refused_unless_both_ends_opt_in(cluster):
    cluster.serve("q")
    cluster.worker("q")  # no --allow-pickle
    with pytest.raises(SerializerError, match="allow_pickle"):
        Sender("q", serializer="pickle")
    with Sender("q", serializer="pickle", allow_pickle=True) as s:
        with pytest.raises(RemoteError) as info:
            s.rpc("echo", {"a": 1})
        assert info.value.type == "SerializerError"


def test_custom_serializer_registered_on_both_ends(cluster):
    cluster.serve("q")
    cluster.worker("q", target="tests.apps.custom:callbacks")
    serializers.register("rev-json", *_rev_json())
    with Sender("q", serializer="rev-json") as s:
        assert s.rpc("echo", {"k": "v"}) == {"k": "v"}


def _rev_json():
    import json

    return (lambda o: json.dumps(o).encode()[::-1], lambda b: json.loads(b[::-1]))


def test_sender_is_bound_to_its_thread(cluster):
    import threading

    cluster.serve("q")
    with Sender("q") as s:
        errors = []

        def use():
            try:
                s.submit("echo", 1)
            except SQMError as exc:
                errors.append(str(exc))

        t = threading.Thread(target=use)
        t.start()
        t.join(10)
        assert errors and "one Sender per thread" in errors[0]


def test_a_reply_after_the_deadline_is_a_timeout_even_without_an_ack(cluster):
    """The message started unacknowledged (no FLAG_ACK) and its deadline passed:
    the Sender waits briefly for sqm's verdict (Expired), and a worker's reply
    arriving in that grace is late: Timeout, as when an ACK had said "started"."""
    cluster.serve("q")
    cluster.worker("q", "--heartbeat", "5")  # no beat-time ACK while the 0.6 s callback runs
    with Sender("q") as s:
        assert s.rpc("add", {"a": 1, "b": 1}) == 2
        with pytest.raises(Timeout):
            s.rpc("sleep", {"s": 0.6}, timeout=0.2)
        items = list(s.map("sleep", [{"s": 0.6}], timeout=0.2))
        assert len(items) == 1 and isinstance(items[0], Timeout), items
