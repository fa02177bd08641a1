"""The bench waits for an idle machine before each run and records the steal share."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from bench import cli

pytestmark = pytest.mark.timeout(30)


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_settle_waits_while_the_machine_is_busy_and_gives_up_at_its_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "SETTLE_MAX_S", 1.0)
    cores = multiprocessing.cpu_count()
    spinners = [multiprocessing.Process(target=_spin, args=(3.0,)) for _ in range(cores)]
    for p in spinners:
        p.start()
    try:
        waited, busy = cli.settle()  # every CPU spins: it waits its bound, and says so
        assert busy is not None and busy >= cli.SETTLE_BUSY
        assert waited >= 1.0
    finally:
        for p in spinners:
            p.terminate()
            p.join(10)
    waited, busy = cli.settle()  # the spinners are gone: soon idle enough
    assert busy is not None and busy < cli.SETTLE_BUSY and waited < cli.SETTLE_MAX_S


def test_steal_share_is_a_share_of_the_time_since_the_mark() -> None:
    mark = cli._cpu_times()
    assert mark is not None and mark[1] > 0
    _spin(0.2)
    share = cli.steal_share(mark)
    assert share is not None and 0.0 <= share <= 1.0
    assert cli.steal_share(None) is None
