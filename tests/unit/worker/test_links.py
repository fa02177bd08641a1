"""worker.links.Outage: when a worker says its broker is unreachable (issue 17)."""

from __future__ import annotations

import pytest

from worker.links import Outage

pytestmark = pytest.mark.timeout(30)


def test_the_first_failure_is_reported_then_at_most_once_a_minute_with_a_count() -> None:
    out = Outage(every_s=60.0)
    assert out.attempt(100.0) == 0  # the first failure: report it
    said = [out.attempt(100.0 + 3 * k) for k in range(1, 60)]  # every 3 s for ~3 minutes
    reports = [(k, n) for k, n in enumerate(said, 1) if n is not None]
    # one line a minute (at attempts 20 and 40), each counting the attempts since the last
    assert reports == [(20, 20), (40, 20)]


def test_reports_count_the_attempts_in_between() -> None:
    out = Outage(every_s=60.0)
    out.attempt(0.0)
    assert [out.attempt(t) for t in (10.0, 20.0, 59.0)] == [None, None, None]
    assert out.attempt(61.0) == 4  # 10, 20, 59 and this one
    assert out.attempt(62.0) is None
    assert out.attempt(121.0) == 2


def test_over_says_how_long_and_forgets() -> None:
    out = Outage()
    assert out.over(5.0) is None  # nothing to end
    out.attempt(10.0)
    out.attempt(13.0)
    assert out.over(20.0) == (10.0, 2)
    assert out.over(21.0) is None
    assert out.attempt(30.0) == 0  # a new outage is reported at once again
