"""The fault-injection soak (bench/soak.py), CI-sized: 2,000 messages, 2 senders,
2 workers, exactly one worker SIGKILL and one sqm SIGKILL at fixed counts of
settled messages (1/3 and 2/3 of the run), so every run meets the same faults.

Real ``sqm serve`` and ``sqm worker`` processes on ipc sockets in a private
run directory; senders are threads of this process. Every message is tallied
from the caller's side, and the workers' own execution logs are read too.
"""

from __future__ import annotations

import json

import pytest

from bench.soak import EXPECTED_FAILURES, markdown_table, run_soak

pytestmark = pytest.mark.timeout(240)

MESSAGES = 2000
KILLS = {"worker": 1, "sqm": 1}


def soak(mode: str) -> tuple[dict, str]:
    figures = run_soak(mode, MESSAGES, senders=2, workers=2, kill_every=0.0, seed=7, kills=KILLS)
    report = "\n".join([
        markdown_table({mode: figures}),
        "kills: " + json.dumps(figures["kill_log"]),
        "samples: " + json.dumps(figures["samples"]),
        "notes: " + json.dumps(figures["notes"]),
        "log findings: " + json.dumps(figures["log_findings"]),
        "final sqm status: " + json.dumps(figures["final_sqm_status"]),
        f"logs kept in: {figures.get('rundir')}",
    ])
    return figures, report


def check_common(f: dict, report: str) -> None:
    assert not f["aborted"], report
    assert f["sender_crashes"] == [], report
    assert f["worker_kills"] == 1 and f["sqm_kills"] == 1, report
    assert f["not_sent"] == 0, report
    assert f["lost"] == 0, report
    assert f["duplicated_replies"] == 0, report
    assert f["wrong_value"] == 0, report
    assert f["ok_never_executed"] == 0, report
    assert f["executed_unknown_values"] == 0, report


def test_journal_mode_survives_a_worker_and_an_sqm_sigkill_with_every_message_replied_once():
    f, report = soak("journal")
    check_common(f, report)
    # accepted messages are journaled; what sqm had not accepted yet the
    # Sender re-sends after the reconnect: nothing may end in an error
    assert f["ok"] == MESSAGES and f["failed"] == 0, report


def test_memory_mode_loses_only_to_errors_never_to_silence():
    f, report = soak("memory")
    check_common(f, report)
    # what sqm held when it died is gone, but each of those senders hears of it
    assert f["ok"] + f["failed"] == MESSAGES, report
    assert set(f["failed_by_type"]) <= set(EXPECTED_FAILURES), report
