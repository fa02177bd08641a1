"""bench.hops: each rpc split into its six segments, from real processes' records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from bench.hops import (
    BASELINE_MARKS,
    LOOKED,
    NOT_LOOKED,
    RESULT_HEAD,
    SEGMENTS,
    SUBMIT_HEAD,
    _tag,
    segments,
)
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)


def test_segments_pair_the_kth_message_of_each_process() -> None:
    # Two rpcs at 0 and 1000 ns; sqm also reads a DONE, which is no segment's mark.
    sender = [(0, "s", SUBMIT_HEAD), (100, "r", RESULT_HEAD),
              (1000, "s", SUBMIT_HEAD), (1300, "r", RESULT_HEAD)]
    broker = [(10, "r", SUBMIT_HEAD), (20, "s", SUBMIT_HEAD), (95, "r", b"SQM1r"),
              (1010, "r", SUBMIT_HEAD), (1030, "s", SUBMIT_HEAD)]
    worker = [(40, "r", SUBMIT_HEAD), (90, "s", RESULT_HEAD),
              (1100, "r", SUBMIT_HEAD), (1200, "s", RESULT_HEAD)]
    segs = segments(sender, broker, worker, since=0)
    assert [segs[name] for name in SEGMENTS] == [
        [10, 10], [10, 20], [20, 70], [50, 100], [10, 100], [900]]
    assert segs["the rpc (SUBMIT sent -> reply read)"] == [100, 300]
    assert segments(sender, broker, worker, since=500)[SEGMENTS[0]] == [10]  # warm-up left out


def test_the_baseline_s_marks_are_its_sockets_and_frame_counts() -> None:
    """The baseline's request, dispatch and reply, told apart by socket type and
    frames; its READY (a 1-frame DEALER send, a 2-frame ROUTER read) marks nothing."""
    request, read, reply, back = (_tag(zmq.DEALER, 2), _tag(zmq.ROUTER, 3),
                                  _tag(zmq.PUSH, 1), _tag(zmq.PULL, 1))
    sender = [(0, "s", request), (100, "r", back)]
    broker = [(5, "r", _tag(zmq.ROUTER, 2)), (10, "r", read), (20, "s", read)]
    worker = [(40, "r", request), (90, "s", reply), (92, "s", _tag(zmq.DEALER, 1))]
    segs = segments(sender, broker, worker, 0, BASELINE_MARKS)
    assert [segs[name] for name in SEGMENTS[:-1]] == [[10], [10], [20], [50], [10]]


@pytest.mark.parametrize("system", ["sqm", "baseline"])
def test_a_real_run_marks_every_rpc_in_all_three_processes(tmp_path: Path, system: str) -> None:
    """python -m bench.hops in a process of its own (it patches sqm.zmqfast, or
    pyzmq's socket methods for the baseline, there)."""
    out = tmp_path / "hops.json"
    subprocess.run([sys.executable, "-m", "bench.hops", "--n", "200", "--warmup", "20",
                    "--runs", "2", "--system", system, "--json", str(out)], cwd=REPO,
                   check=True, timeout=100, stdout=subprocess.DEVNULL)
    first, result = json.loads(out.read_text())  # the second run: the patch is not doubled
    assert first["system"] == result["system"] == system
    segs = result["segments"]
    assert result["rpc_per_s"] > 0
    assert all(len(segs[name]) == 200 for name in SEGMENTS[:-1]), {k: len(v) for k, v in segs.items()}
    assert len(segs[SEGMENTS[-1]]) == 199
    # In order in every rpc: each mark after the one before (a misplaced pairing goes negative).
    assert all(v > 0 for name in SEGMENTS for v in segs[name])
    # And they account for the run: an rpc plus the Sender's turn-around is one rpc's share of it.
    rpc = segs["the rpc (SUBMIT sent -> reply read)"]
    per_rpc_ns = (sum(rpc) + sum(segs[SEGMENTS[-1]])) / 200
    assert 0.5 < per_rpc_ns * result["rpc_per_s"] / 1e9 < 1.5, (per_rpc_ns, result["rpc_per_s"])
    if system == "sqm":  # every rpc on one side of the split by the Sender's looks at sqm
        looked, others = segs[LOOKED], segs[NOT_LOOKED]
        assert len(looked) + len(others) == 200
        assert looked, "a Sender looks at sqm every 20 ms: some rpc must hold one"
        assert sorted(looked + others) == sorted(rpc)
