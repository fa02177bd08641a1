"""The benchmark suite's own runs at CI size: W8 and W9 on sqm, the NATS peer.

Each run is a real ``bench.cli.run_one`` (broker, worker processes and
senders over real sockets) with small counts; the tests check that figures
came back and make sense, not only that nothing crashed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest

from bench import cli, nats_peer
from bench.common import W8_SLOW_S, make_workloads

WORKLOADS = make_workloads(quick=True)


def _args(*extra: str) -> Any:
    return cli.build_parser().parse_args(["--rpc-timeout", "20", "--warmup-timeout", "60",
                                          "--timeout", "120", *extra])


def _run(system: str, wl: Any) -> dict[str, Any]:
    row = cli.run_one(cli._systems()[system], wl, _args())
    assert row["status"] == "ok", (row["error"], row["warnings"])
    return row


def _small_w9(name: str, senders: int) -> Any:
    return dataclasses.replace(WORKLOADS[name], n=senders * 4, senders=senders, sender_procs=2,
                               warmup=2 * senders)


@pytest.mark.timeout(240)
def test_w8_and_w9_on_sqm() -> None:
    rows = []
    for name in ("W8", "W8-p1"):
        wl = dataclasses.replace(WORKLOADS[name], n=300, rate=500.0)
        row = _run("sqm", wl)
        m = row["metrics"]
        # 3 slow messages (n % 100 == 50) really took W8_SLOW_S in a worker.
        assert row["details"]["slow_n"] == 3
        assert W8_SLOW_S * 1000 <= m["slow_p50_ms"] < 20 * W8_SLOW_S * 1000
        assert 0 < m["short_p50_ms"] <= m["short_p99_ms"] < 20 * W8_SLOW_S * 1000
        assert sum(row["details"]["per_worker_measured"].values()) == 300
        rows.append(row)
    assert rows[1]["details"]["prefetch"] == 1
    assert isinstance(rows[0]["details"]["prefetch"], int)  # the Worker default, recorded

    for name, senders in (("W9", 16), ("W9-64", 8)):
        row = _run("sqm", _small_w9(name, senders))
        m = row["metrics"]
        assert m["errors"] == 0 and m["rpc_per_s"] > 0 and m["p99_us"] > 0
        assert row["details"]["warmup_n"] == 2 * senders
        assert sum(row["details"]["per_worker_measured"].values()) == senders * 4
        assert row["details"]["cpu_s"]["sender"] > 0  # the sender processes' CPU came back
        rows.append(row)

    cli.add_ratios(rows)
    by = {r["workload"]: r["metrics"] for r in rows}
    assert by["W9"]["x_w9_64"] == pytest.approx(by["W9"]["rpc_per_s"] / by["W9-64"]["rpc_per_s"])
    assert by["W8"]["x_p1_short_p99"] == pytest.approx(
        by["W8"]["short_p99_ms"] / by["W8-p1"]["short_p99_ms"])
    checked = {(t["workload"], t["metric"]) for t in cli.check_targets(rows)}
    assert {("W8", "x_p1_short_p99"), ("W9", "x_w9_64")} <= checked


@pytest.mark.timeout(240)
def test_w2_map_the_throughput_setting_on_sqm() -> None:
    """W2-map pipelines through Sender.map() to workers of prefetch 32, and its
    target is the one against NATS's W2."""
    wl = dataclasses.replace(WORKLOADS["W2-map"], n=600, warmup=50)
    assert wl.via == "map" and wl.prefetch == 32
    row = _run("sqm", wl)
    assert row["metrics"]["tasks_per_s"] > 0 and row["details"]["via"] == "map"
    per_worker = row["details"]["per_worker_measured"]
    assert len(per_worker) == 2 and sum(per_worker.values()) == 600
    nats_w2: dict[str, Any] = {"system": "nats", "workload": "W2", "status": "ok",
                               "metrics": {"tasks_per_s": row["metrics"]["tasks_per_s"] / 2}}
    rows = [row, nats_w2]
    cli.add_ratios(rows)
    assert row["metrics"]["x_nats_tasks_per_s"] == pytest.approx(2.0)
    checked = {(t["workload"], t["metric"]) for t in cli.check_targets(rows)}
    assert ("W2-map", "x_nats_tasks_per_s") in checked


@pytest.mark.timeout(240)
def test_nats_peer() -> None:
    assert nats_peer.unavailable() is None, "bash .ci/install-test-deps; pip install -e '.[test]'"
    rows = [
        _run("nats", dataclasses.replace(WORKLOADS["W1"], n=200, warmup=20)),
        _run("nats", dataclasses.replace(WORKLOADS["W2"], n=600, warmup=50, window=50)),
        _run("nats", _small_w9("W9", 16)),
    ]
    w1, w2, w9 = (r["metrics"] for r in rows)
    assert w1["rpc_per_s"] > 0 and 0 < w1["p50_us"] <= w1["p99_us"]
    assert w2["tasks_per_s"] > 0
    assert w9["rpc_per_s"] > 0 and w9["errors"] == 0
    # The queue group spread the work: both W2 workers ran some, all ran every message.
    per_worker = rows[1]["details"]["per_worker_measured"]
    assert len(per_worker) == 2 and sum(per_worker.values()) == 600
    assert rows[0]["details"]["cpu_s"]["broker"] >= 0  # nats-server's pid was measured

    # Ratios to NATS land on the sqm rows only.
    sqm_w1: dict[str, Any] = {"system": "sqm", "workload": "W1", "status": "ok",
              "metrics": {"rpc_per_s": 2 * w1["rpc_per_s"]}}
    cli.add_ratios([*rows, sqm_w1])
    assert sqm_w1["metrics"]["x_nats_rpc_per_s"] == pytest.approx(2.0)
    assert "x_nats_rpc_per_s" not in rows[0]["metrics"]


@pytest.mark.timeout(120)
def test_peers_nats_skipped_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nats_peer, "server_path", lambda: None)
    out = tmp_path / "r.json"
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        rc = cli.main(["--only", "W8", "--systems", "sqm", "--peers", "nats", "--quick",
                       "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() turns SIGTERM into Ctrl-C
    err = capsys.readouterr().err
    assert rc == 0
    notes = [ln for ln in err.splitlines() if "--peers nats skipped" in ln]
    assert len(notes) == 1 and "nats-server is not installed" in notes[0]
    report = json.loads(out.read_text())
    assert "nats" not in report["config"]["systems"]
    (row,) = report["results"]
    assert row["status"] == "ok" and not math.isnan(row["metrics"]["short_p99_ms"])
