"""Autoscaler: bounded, grows on waiting messages, shrinks on idling, with hysteresis."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sqm.taskpool.autoscale import Autoscaler, parse_autoscale

steps = st.lists(
    st.tuples(st.floats(0, 3, allow_nan=False), st.integers(0, 30), st.integers(0, 10)),
    max_size=80,
)
bounds = st.integers(1, 12).flatmap(lambda hi: st.tuples(st.just(hi), st.integers(0, hi)))


def simulate(scaler: Autoscaler, start: int, trace: list[tuple[float, int, int]]):
    now, current = 0.0, start
    for dt, pending, idle in trace:
        now += dt
        new = scaler.decide(now, current, pending, idle)
        yield now, current, pending, idle, new
        current = new


def run_start(history: list[tuple[float, int, int]],
              holds: Callable[[int, int], bool]) -> float | None:
    """When the unbroken run of samples, up to the last, for which ``holds`` began."""
    start = None
    for t, pending, idle in reversed(history):
        if not holds(pending, idle):
            break
        start = t
    return start


@given(bounds, st.integers(0, 15), steps)
def test_always_within_bounds_and_in_the_right_direction(hl, start, trace):
    hi, lo = hl
    scaler = Autoscaler(hi, lo, up_after=0.5, down_after=2.0, cooldown=1.0)
    for _now, current, pending, _idle, new in simulate(scaler, start, trace):
        assert lo <= new <= hi
        if lo <= current <= hi:
            if pending > 0:
                assert new >= current  # never shrinks while messages wait
            else:
                assert new <= current  # never grows when nothing waits


@given(bounds, steps)
@example((1, 0), [(3.732283434717898e-166, 1, 0), (0.5, 1, 0)])  # 1e-166 + 0.5 == 0.5
def test_changes_respect_cooldown_and_delays(hl, trace):
    hi, lo = hl
    scaler = Autoscaler(hi, lo, up_after=0.5, down_after=2.0, cooldown=1.0)
    last_change = None
    history: list[tuple[float, int, int]] = []
    for now, current, pending, idle, new in simulate(scaler, lo, trace):
        history.append((now, pending, idle))
        if new != current:
            if last_change is not None:
                assert now - last_change >= 1.0  # hysteresis: no flapping within the cooldown
            last_change = now
            # Elapsed time is ``now - since``, as the autoscaler computes it: with floats,
            # ``since <= now - delay`` is not the same test (0.5 - 1e-166 rounds to 0.5).
            if new > current:  # messages have been waiting, unbroken, for up_after
                since = run_start(history, lambda p, _i: p > 0)
                assert since is not None and now - since >= 0.5
            else:  # workers idled with nothing waiting, unbroken, for down_after
                since = run_start(history, lambda p, i: p == 0 and i > 0)
                assert since is not None and now - since >= 2.0
                assert new == current - 1  # shrinks one at a time


def test_grows_to_the_backlog_then_shrinks_to_minimum():
    scaler = Autoscaler(maximum=8, minimum=2, up_after=0.5, down_after=5.0, cooldown=1.0)
    assert scaler.decide(0.0, 2, pending=5, idle=0) == 2  # not yet: a blip is not a backlog
    assert scaler.decide(0.6, 2, pending=5, idle=0) == 7  # one worker per waiting message
    assert scaler.decide(1.2, 7, pending=50, idle=0) == 7  # cooldown
    assert scaler.decide(1.7, 7, pending=50, idle=0) == 8  # capped at the maximum
    sizes = []
    size, now = 8, 2.0
    while now < 60:
        size = scaler.decide(now, size, pending=0, idle=size)
        sizes.append(size)
        now += 0.5
    assert sizes[-1] == 2 and sizes == sorted(sizes, reverse=True)
    assert scaler.decide(now, 1, pending=0, idle=0) == 2  # below the minimum: back up at once


def test_parse_autoscale():
    assert parse_autoscale("10,3") == (10, 3)
    assert parse_autoscale(" 4 , 0") == (4, 0)
    for bad in ("3", "2,5", "0,0", "a,b", "1,2,3"):
        with pytest.raises(ValueError):
            parse_autoscale(bad)
