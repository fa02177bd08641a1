"""Follow-up work from callbacks (submit/receive/rpc) and forward chains, end to end.

Real ``sqm serve`` and ``sqm worker`` processes running
tests/apps/abilities.py; the workers log each step they ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sender import Sender
from sqm.errors import Expired, RemoteError
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.timeout(90)

APPS = "tests.apps.abilities"


def ran(cluster, method: str | None = None) -> list[dict]:
    return [r for r in read_log(Path(cluster.log)) if method is None or r["method"] == method]


# ----------------------------------------------------------------- submit / receive / rpc


def test_sub_rpc_and_submit_receive_from_a_sync_callback(cluster):
    cluster.serve("q")
    # plain runner; what sqm queues behind its waiting callback it gives back
    outer = cluster.worker("q", target=f"{APPS}:followers")
    cluster.worker("q", target=f"{APPS}:inner_only")
    with Sender("q", timeout=20) as s:
        # outer is busy waiting: its "inner" must run on the other worker
        assert s.rpc("outer", 3) == {"inner": 6, "pid": outer.pid}
        assert s.rpc("fan_out", [1, 2, 3]) == [2, 4, 6]
        assert s.rpc("unknown_inner", 1) == "UnknownMethod"  # sqm's answer reaches the callback
    inner_pids = {r["pid"] for r in ran(cluster, "inner")}
    assert len(ran(cluster, "inner")) == 4 and outer.pid not in inner_pids


def test_sub_rpc_and_submit_receive_from_async_and_threaded_callbacks(cluster):
    cluster.serve("q")
    w = cluster.worker("q", "--concurrency", "3", target=f"{APPS}:async_followers")
    with Sender("q", timeout=20) as s:
        assert s.rpc("a_outer", 1) == [2, 4]  # await worker.rpc / submit / receive
        assert s.rpc("outer", 5)["inner"] == 10  # a plain callback in the thread pool
        # two callbacks wait at once; the third slot runs their inner messages
        ids = [s.submit("fan_out_by_id", [n, n + 1]) for n in range(2)]
        assert sorted(tuple(s.receive(id=i)) for i in ids) == [(0, 2), (2, 4)]
    assert {r["pid"] for r in ran(cluster, "inner")} == {w.pid}  # it served itself


def test_rpc_to_another_queue_of_the_same_sqm(cluster):
    cluster.serve("q")
    cluster.serve("q2")
    cluster.env["SQM_OTHER_QUEUE"] = "q2"
    cluster.worker("q", target=f"{APPS}:followers")
    other = cluster.worker("q2", target=f"{APPS}:inner_only")
    with Sender("q", timeout=20) as s:
        assert s.rpc("other_queue", 21) == 42
    assert [r["pid"] for r in ran(cluster, "inner")] == [other.pid]
    wait_for(lambda: cluster.status("q2")["completed_total"] == 1, 10, "q2's DONE")
    assert cluster.status("q")["methods"].get("inner", {}).get("pending", 0) == 0


def test_every_worker_waiting_on_its_own_queue_times_out_and_keeps_heartbeating(cluster):
    cluster.serve("q")  # heartbeat 0.2 s: silent for 0.6 s means dead
    cluster.worker("q", "--prefetch", "1", target=f"{APPS}:followers")  # one slot: nobody
    # left for "inner" (with more, it would wait in that worker's own queue, alone)
    with Sender("q", timeout=20) as s:
        assert s.rpc("self_wait", 1) == "Timeout"  # the documented deadlock, bounded
    st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 1 and x, 10,
                  "self_wait's DONE")
    assert st["workers_current"] == 1
    assert st["redelivered_total"] == 0 and st["failed_total"] == 0  # never taken for dead


def test_concurrency_lets_a_worker_serve_its_own_sub_rpc(cluster):
    cluster.serve("q")
    cluster.worker("q", "--concurrency", "2", target=f"{APPS}:followers")
    with Sender("q", timeout=20) as s:
        assert s.rpc("self_wait", 4) == 8


# ----------------------------------------------------------------- forward


@pytest.mark.parametrize("runner", [(), ("--concurrency", "2")], ids=["plain", "asyncio"])
def test_three_step_chain_replies_to_the_caller_exactly_once(cluster, runner):
    cluster.serve("q")
    front = cluster.worker("q", *runner, target=f"{APPS}:chain_front")
    middle = cluster.worker("q", *runner, target=f"{APPS}:chain_middle")
    statuses: list[tuple[int, int]] = []
    started: list[str] = []
    with Sender("q", timeout=20) as s:
        mid = s.submit("step1", {"x": 1}, on_start=lambda: started.append(mid),
                       on_status=lambda d, t: statuses.append((d, t)))
        reply = s.receive(id=mid)
        assert reply == {"trail": ["step1", "step2", "step3"], "hops": 2, "pid": front.pid}
        st = wait_for(lambda: (x := cluster.status("q"))["completed_total"] == 1 and x, 10,
                      "the chain's last DONE")
    # Progress of different steps comes from different workers: no order between them.
    assert len(started) == 1 and sorted(statuses) == [(1, 3), (2, 3)]
    assert st["forwarded_total"] == 2 and st["failed_total"] == 0 and st["pending"] == 0
    steps = [(r["method"], r["pid"], r["hops"]) for r in ran(cluster)]
    assert steps == [("step1", front.pid, 0), ("step2", middle.pid, 1), ("step3", front.pid, 2)]


def test_chain_past_the_callers_deadline_fails_back_expired(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:chain_front")
    cluster.worker("q", target=f"{APPS}:chain_middle")
    with Sender("q", timeout=20) as s:
        mid = s.submit("step1", {"sleep": 1.5}, ttl=1.0)  # step1 forwards after the deadline
        with pytest.raises(Expired):
            s.receive(id=mid, timeout=10)
    assert len(ran(cluster, "step1")) == 1
    assert ran(cluster, "step2") == []  # never dispatched after its deadline


def test_forwarding_loop_is_refused_at_the_hop_limit(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:chain_front")
    with Sender("q", timeout=20) as s:
        with pytest.raises(RemoteError) as info:
            s.rpc("spin", 0)
    assert info.value.type == "HopLimitExceeded"
    hops = [r["hops"] for r in ran(cluster, "spin")]
    assert hops == list(range(33))  # max_hops=32 forwards, then refused


def test_a_chain_step_whose_worker_dies_is_retried_on_another(cluster):
    cluster.serve("q")
    cluster.worker("q", target=f"{APPS}:chain_front")
    doomed = cluster.worker("q", target=f"{APPS}:chain_middle_dies")
    with Sender("q", timeout=20) as s:
        mid = s.submit("step1", {"x": 1}, retries=1)
        wait_for(lambda: ran(cluster, "step2-dying"), 10, "step2 started on the doomed worker")
        doomed.popen.wait(10)  # it exits in its callback: the step is lost with it
        survivor = cluster.worker("q", target=f"{APPS}:chain_middle")
        reply = s.receive(id=mid)
    assert reply["trail"] == ["step1", "step2", "step3"]
    assert [r["pid"] for r in ran(cluster, "step2")] == [survivor.pid]
    assert cluster.status("q")["redelivered_total"] == 1


def test_follow_up_work_on_a_secured_sqm(cluster, rundir):
    from tests.system.test_security import Keys, admin, secured

    keys = Keys(rundir / "keys")
    endpoint = secured(cluster, keys)
    for target in ("followers", "inner_only"):
        cluster.sqm("worker", f"{APPS}:{target}", "--queue", "q", "--endpoint", endpoint,
                    "--heartbeat", "0.2", *keys.client_args("worker"), name=f"worker-{target}")
    wait_for(lambda: admin(keys, "q", endpoint)["workers_current"] == 2, 20, "2 secured workers")
    with Sender("q", endpoint=endpoint, secret_key=keys.secret("sender"),
                server_key=keys.server, timeout=20) as s:
        assert s.rpc("outer", 3)["inner"] == 6  # SUBMIT on the worker's secured link
    st = admin(keys, "q", endpoint)
    assert st["denied_total"] == 0 and len(ran(cluster, "inner")) == 1
