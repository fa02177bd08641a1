"""tests.conftest.read_log: the workers' log is read while they append to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_log

pytestmark = pytest.mark.timeout(30)


def test_a_line_still_being_written_waits_for_the_next_look(tmp_path: Path) -> None:
    log = tmp_path / "log"
    assert read_log(log) == []  # no worker has written yet
    log.write_text('{"kind": "end", "payload": 1}\n{"kind": "end", "payload": 2}\n{"pid": 6060, "kind"')
    assert [e["payload"] for e in read_log(log)] == [1, 2]  # (a torn line failed a CI run)
    with log.open("a") as fh:
        fh.write(': "end", "payload": 3}\n')
    assert [e["payload"] for e in read_log(log)] == [1, 2, 3]
