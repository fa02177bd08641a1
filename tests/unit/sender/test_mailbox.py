"""Where a Sender's ipc mailbox goes, and that it fails at once when no path fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from sender import Sender
from sqm.errors import ConfigError


def test_mailbox_goes_beside_the_queue_socket(rundir: Path) -> None:
    with Sender("q") as s:
        assert s.mailbox.startswith(f"ipc://{rundir}/mbox-")


def test_a_long_queue_directory_falls_back_to_the_run_directory(rundir: Path) -> None:
    deep = rundir / ("d" * (95 - len(str(rundir))))  # q.sock fits, mbox-<hex>.sock not
    with Sender("q", endpoint=f"ipc://{deep}/q.sock") as s:
        assert s.mailbox.startswith(f"ipc://{rundir}/mbox-")


def test_no_directory_that_fits_is_a_clear_error(rundir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    long_rundir = rundir / ("r" * 90)
    monkeypatch.setenv("SQM_RUNDIR", str(long_rundir))
    with pytest.raises(ConfigError, match="SQM_RUNDIR"):
        Sender("q", endpoint=f"ipc://{long_rundir}/q.sock")
    assert not long_rundir.exists() or not list(long_rundir.glob("mbox-*"))
