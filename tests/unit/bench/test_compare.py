"""bench.compare reads each results file's ratios: the throughput one, W1's tail too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compare import ratios

pytestmark = pytest.mark.timeout(30)


def test_ratios_give_w1_its_tail_and_w8_its_own_reference(tmp_path: Path) -> None:
    results = {"results": [
        {"system": "sqm", "status": "ok", "workload": "W1",
         "ratios": {"rpc_per_s": 0.9, "p50_us": 1.1, "p99_us": 1.18}, "metrics": {}},
        {"system": "baseline", "status": "ok", "workload": "W1",
         "ratios": {"rpc_per_s": 1.0, "p99_us": 1.0}, "metrics": {}},
        {"system": "sqm", "status": "ok", "workload": "W3",
         "ratios": {"tasks_per_s": 1.4}, "metrics": {}},
        {"system": "sqm", "status": "ok", "workload": "W8",
         "ratios": {}, "metrics": {"x_p1_short_p99": 0.95}},
        {"system": "sqm", "status": "failed", "workload": "W2",
         "ratios": {"tasks_per_s": 9.9}, "metrics": {}},
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert ratios(path, "sqm") == {"W1": 0.9, "W1 p99": 1.18, "W3": 1.4, "W8 p99/p1": 0.95}
