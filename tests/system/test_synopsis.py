"""The Spread::Queue synopsis end to end, with real sqm and worker processes."""

from __future__ import annotations

import pytest

from sender import RemoteError, Sender
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(60)


def test_zero_config_ipc_default(cluster, rundir):
    """No endpoint anywhere: sqm, worker and sender meet at ipc://$SQM_RUNDIR/myqueue.sock."""
    cluster.serve("myqueue", heartbeat=1.0)
    assert (rundir / "myqueue.sock").exists()
    cluster.worker("myqueue", heartbeat=1.0)
    with Sender("myqueue") as s:
        assert s.endpoint == f"ipc://{rundir}/myqueue.sock"
        mid = s.submit("myfunc", {"name": "value"})
        assert isinstance(mid, str) and mid
        assert s.receive(timeout=5) == {"response": "I heard you!"}
        assert s.rpc("myfunc", {"name": "value"}, timeout=5) == {"response": "I heard you!"}
        s.submit("record", {"log": "line"}, oneway=True)
        assert s.rpc("add", {"a": 20, "b": 22}) == 42


def test_explicit_tcp_endpoint(cluster):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cluster.serve("tq", endpoint=endpoint)
    cluster.worker("tq", endpoint=endpoint)
    with Sender("tq", endpoint=endpoint) as s:
        assert s.mailbox.startswith("tcp://127.0.0.1:")
        assert s.rpc("echo", {"k": [1, 2, 3]}) == {"k": [1, 2, 3]}
        with pytest.raises(RemoteError) as info:
            s.rpc("boom", 7)
        assert info.value.type == "ValueError"
        assert "bad things: 7" in info.value.message
        assert "Traceback" in info.value.traceback


def test_sqm_endpoint_environment(cluster, monkeypatch):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("SQM_ENDPOINT", endpoint)
    cluster.env["SQM_ENDPOINT"] = endpoint
    cluster.serve("envq")
    cluster.worker("envq")
    with Sender("envq") as s:
        assert s.endpoint == endpoint
        assert s.rpc("add", {"a": 1, "b": 2}) == 3
