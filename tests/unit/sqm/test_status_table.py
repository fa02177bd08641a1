"""``sqm status``'s table: every counter an operator acts on is printed."""

from __future__ import annotations

from typing import Any

from sqm.cli.admin import format_status


def _status(**extra: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "queue": "q", "endpoint": "ipc:///x", "uptime_s": 3.0, "pending": 1, "in_flight": 2,
        "workers_current": 1, "workers_ever": 1, "utilization": 0.5, "assigned_total": 7,
        "completed_total": 5, "failed_total": 1, "workers": [],
    }
    st.update(extra)
    return st


def test_denied_and_dead_letters_are_printed_when_there_are_any() -> None:
    out = format_status(_status(denied_total=4, dead_letters=2, dead_total=9))
    assert "denied 4   dead letters 2 (ever 9)" in out


def test_quiet_queue_has_no_denied_line() -> None:
    out = format_status(_status(denied_total=0, dead_letters=0, dead_total=0))
    assert "denied" not in out and "dead letters" not in out
    assert "assigned 7   completed 5   failed 1" in out
