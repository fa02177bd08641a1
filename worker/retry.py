"""Retries a worker asks sqm for: :class:`Retry` and the worker's :class:`RetryPolicy`.

A callback that raises :class:`Retry` (or an exception listed in the
worker's ``retry_on``) does not answer its caller: the worker tells sqm
(RETRY), which holds the message for the delay and then hands it to any
worker serving its method, with one more attempt counted in its envelope.
sqm fails it back as ``RetriesExhausted`` once the attempts reach the
limit the worker sent. Deciding here, in the worker, keeps sqm blind to
what a callback raised beyond its type and message.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF = (1.0, 300.0)  # (initial_s, max_s) for retry_on exceptions


class Retry(Exception):  # noqa: N818 - the name users raise, as in Celery and dramatiq
    """Raise from a callback to run its message again after ``delay`` seconds.

    ``max_retries`` overrides the worker's limit for this message. The
    caller waits on; after the last allowed retry it gets
    ``RemoteError(type="RetriesExhausted")`` naming the last error
    (``error``, or this Retry's own message).
    """

    def __init__(self, message: str = "retry requested", *, delay: float = 0.0,
                 max_retries: int | None = None, error: BaseException | None = None) -> None:
        super().__init__(message)
        if not 0 <= delay < 1e9:
            raise ValueError("Retry delay must be between 0 and 1e9 seconds")
        if max_retries is not None and not 0 <= max_retries <= 255:
            raise ValueError("Retry max_retries must be between 0 and 255")
        self.delay = float(delay)
        self.max_retries = max_retries
        self.error = error

    def last_error(self) -> tuple[str, str]:
        """``(type, message)`` of what made the callback retry."""
        if self.error is not None:
            return type(self.error).__name__, str(self.error)
        return "Retry", str(self)


@dataclass(frozen=True)
class RetryPolicy:
    """A worker's retry settings (``Worker(max_retries=, retry_on=, backoff=)``)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    retry_on: tuple[type[BaseException], ...] = ()
    backoff: tuple[float, float] = DEFAULT_BACKOFF

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or not 0 <= self.max_retries <= 255:
            raise ValueError("max_retries must be an int between 0 and 255")
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise TypeError("retry_on must be a tuple of exception classes")
        initial, most = self.backoff
        if not 0 < initial <= most:
            raise ValueError("backoff must be (initial_s, max_s) with 0 < initial_s <= max_s")

    def decide(self, exc: BaseException, attempts: int) -> Retry | None:
        """The Retry to ask sqm for after ``exc`` (``attempts`` retries done), or None."""
        if isinstance(exc, Retry):
            return exc
        if self.retry_on and isinstance(exc, self.retry_on):
            return Retry(str(exc), delay=self.delay(attempts + 1), error=exc)
        return None

    def delay(self, n: int, rand: random.Random | None = None) -> float:
        """The wait before the ``n``-th retry: ``min(max_s, initial_s * 2**(n-1))``
        less a random jitter of at most half of it."""
        initial, most = self.backoff
        base = min(most, initial * 2 ** max(0, n - 1))
        jitter = rand.uniform(0, base / 2) if rand is not None else random.uniform(0, base / 2)
        return float(base - jitter)
