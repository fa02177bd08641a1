"""A worker with no broker (issue 17): a quiet log, and a prompt exit in every state.

Real ``sqm worker`` processes, both runners (plain; asyncio via
``--concurrency 2``). Heartbeats are 0.2 s here, so a worker gives up on a
silent broker after 0.6 s and reconnects every 0.6 s: the old worker logged
each attempt and needed heartbeat x liveness plus a second of linger to exit.
"""

from __future__ import annotations

import signal
import time

import pytest
import zmq

from sqm.config import resolve
from sqm.protocol import HELLO
from tests.conftest import Cluster, Proc, wait_for

pytestmark = pytest.mark.timeout(60)

RUNNERS = {"plain": (), "asyncio": ("--concurrency", "2")}
SILENT = "silent"  # in the first-failure line (and in the old per-attempt line)
EXIT_BOUND_S = 0.5


def start_worker(cluster: Cluster, runner: str, heartbeat: float = 0.2) -> Proc:
    return cluster.worker("q", *RUNNERS[runner], "--log-level", "debug", wait=False,
                          heartbeat=heartbeat)


def lines(proc: Proc, word: str) -> list[str]:
    return [line for line in proc.stderr.splitlines() if word in line]


def exit_time(proc: Proc, sig: int) -> float:
    """Seconds from ``sig`` to the process having exited."""
    t0 = time.monotonic()
    proc.signal(sig)
    proc.wait(10)
    return time.monotonic() - t0


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_a_silent_broker_is_reported_once_then_backs_off(cluster, rundir, runner):
    """A socket that never answers stands in for the broker, so the test can count
    the worker's attempts (each one says HELLO again) while reading its log."""
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.linger = 0
    fake.bind(resolve("q").endpoint)
    hellos = 0

    def hello_count(n: int) -> bool:
        nonlocal hellos
        while fake.poll(0):
            hellos += fake.recv_multipart()[2] == HELLO
        return hellos >= n

    try:
        w = start_worker(cluster, runner)
        wait_for(lambda: hello_count(6), 20, "five reconnect attempts (HELLO each)")
        assert len(lines(w, SILENT)) == 1, w.stderr
        assert " WARNING " in lines(w, SILENT)[0], w.stderr
    finally:
        fake.close(0)
        ctx.term()
    # The broker comes: the worker says so (info) and registers.
    cluster.serve("q")
    wait_for(lambda: lines(w, "answers again"), 10, "the worker to notice the broker")
    assert " INFO " in lines(w, "answers again")[0], w.stderr
    wait_for(lambda: cluster.status("q")["workers_current"] == 1, 10, "the worker registered")
    assert w.popen.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_exit_is_prompt_while_waiting_for_a_broker(cluster, runner, sig):
    w = start_worker(cluster, runner, heartbeat=1.0)  # the default: a 3 s silence
    wait_for(lambda: lines(w, "serving queue"), 10, "the worker to start")
    assert exit_time(w, sig) <= EXIT_BOUND_S, w.stderr
    assert lines(w, "stopped after 0 task(s)"), w.stderr


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_exit_is_prompt_between_reconnects(cluster, runner):
    w = start_worker(cluster, runner, heartbeat=1.0)
    wait_for(lambda: lines(w, SILENT), 10, "the first reconnect")
    assert exit_time(w, signal.SIGTERM) <= EXIT_BOUND_S, w.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_exit_is_prompt_when_idle_with_a_broker(cluster, runner, sig):
    cluster.serve("q")
    w = start_worker(cluster, runner, heartbeat=1.0)
    wait_for(lambda: cluster.status("q")["workers_current"] == 1, 10, "the worker registered")
    assert exit_time(w, sig) <= EXIT_BOUND_S, w.stderr
    wait_for(lambda: cluster.status("q")["workers_current"] == 0, 5, "the broker to see it leave")


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_exit_is_prompt_after_the_broker_went_away(cluster, runner):
    broker = cluster.serve("q")
    w = start_worker(cluster, runner, heartbeat=1.0)
    wait_for(lambda: cluster.status("q")["workers_current"] == 1, 10, "the worker registered")
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    assert exit_time(w, signal.SIGINT) <= EXIT_BOUND_S, w.stderr
