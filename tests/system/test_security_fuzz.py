"""CI-sized live fuzz (``python -m bench.fuzz --live N``): a secured and an insecure sqm,
real processes, random and mutated multi-frame messages from authenticated and
unauthenticated peers; then a real Sender still gets correct replies."""

from __future__ import annotations

from pathlib import Path

from bench.live_fuzz import live_fuzz


def test_ci_sized_live_fuzz_leaves_sqm_serving(tmp_path: Path) -> None:
    report = live_fuzz(6000, seed=3, workdir=str(tmp_path))
    secured, insecure = report["secured"], report["insecure"]
    assert secured["sent"] == insecure["sent"] == 6000
    assert secured["rpc"] == insecure["rpc"] == "20/20 correct"
    # the messages got in where they should: counted as malformed or refused by role
    assert secured["malformed_total"] > 500 and secured["denied_total"] > 50
    assert insecure["malformed_total"] > 1000 and insecure["denied_total"] == 0
