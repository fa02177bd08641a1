"""Retry and the worker's retry policy: which exceptions retry, and the backoff."""

from __future__ import annotations

import random

import pytest

from worker import Retry
from worker.retry import RetryPolicy


def test_nth_retry_waits_the_doubling_base_less_at_most_half_of_it():
    policy = RetryPolicy(retry_on=(ConnectionError,), backoff=(0.5, 3.0))
    rand = random.Random(7)
    for n, base in enumerate([0.5, 1.0, 2.0, 3.0, 3.0], 1):
        waits = [policy.delay(n, rand) for _ in range(200)]
        assert all(base / 2 <= w <= base for w in waits), (n, min(waits), max(waits))
        assert max(waits) - min(waits) > base / 4  # jittered, not constant


def test_decide_retries_listed_exceptions_and_retry_itself_only():
    policy = RetryPolicy(retry_on=(ConnectionError,), backoff=(1.0, 10.0))
    r = policy.decide(ConnectionError("down"), attempts=2)
    assert r is not None and 2.0 <= r.delay <= 4.0  # the 3rd retry
    assert r.last_error() == ("ConnectionError", "down")
    assert policy.decide(ValueError("no"), attempts=0) is None
    own = Retry(delay=5, max_retries=9)
    assert policy.decide(own, attempts=0) is own and own.last_error() == ("Retry", "retry requested")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(backoff=(2.0, 1.0))
    with pytest.raises(TypeError):
        RetryPolicy(retry_on=("ConnectionError",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Retry(delay=-1)
