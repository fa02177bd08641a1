"""Bookkeeping of one ``map()`` call, shared by Sender.map and AsyncSender.map.

A batch keeps at most ``max_concurrent`` messages outstanding, turns each
outcome into an item (the result, or the SQMError in its place, like
``asyncio.gather(return_exceptions=True)``), expires items whose deadline
passed, and hands items out in input order or as they complete.

:meth:`Batch.step` is the whole loop as a state machine: it says what the
façade must do next (NEED a payload, EMIT the items in ``out``, WAIT until
:meth:`Batch.next_deadline`, or DONE). The façades only fetch payloads,
submit, yield and wait, each in its own style.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqm.errors import SQMError, Timeout

#: What :meth:`Batch.step` asks of the façade.
NEED, EMIT, WAIT, DONE = 0, 1, 2, 3


class BatchSink:
    """Stands in for a message's callbacks: collects its outcome for the batch."""

    __slots__ = ("done", "notify")
    consumes = True

    def __init__(self) -> None:
        self.done: deque[tuple[str, Any]] = deque()
        self.notify: Callable[[], None] | None = None  # AsyncSender: wake the map

    def started(self, core: Any, mid: str) -> None:
        pass

    def status(self, core: Any, mid: str, done: int, total: int) -> None:
        pass

    def finish(self, core: Any, mid: str, outcome: Any) -> None:
        self.done.append((mid, outcome))
        if self.notify is not None:
            self.notify()


def check_map_args(max_concurrent: int, retries: int, timeout: float | None) -> None:
    """Refuse bad arguments when map() is called, not at the first item."""
    if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool) \
            or max_concurrent < 1:
        raise ValueError("max_concurrent must be an int >= 1")
    if not isinstance(retries, int) or not 0 <= retries <= 255:
        raise ValueError("retries must be an int between 0 and 255")
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive")


class Batch:
    """The window, per-item deadlines and output order of one map().

    ``grace(mid, now)``: how much longer to wait for sqm's verdict on an item
    whose deadline just passed (0: none; see SenderBase._verdict_grace);
    ``timeout_error(mid)``: the Timeout an item that got no reply becomes.
    """

    def __init__(self, core: Any, max_concurrent: int, ordered: bool,
                 grace: Callable[[str, float], float] | None = None,
                 timeout_error: Callable[[str], Timeout] | None = None) -> None:
        self.core = core
        self.grace = grace
        self.timeout_error = timeout_error  # the sender's Timeout, naming unreached brokers
        self.exhausted = False  # the input has no more payloads
        self._extended: dict[str, float] = {}  # id -> end of its grace (monotonic)
        self.sink = BatchSink()
        self.max_concurrent = max_concurrent
        self.ordered = ordered
        self.inflight: dict[str, int] = {}  # id -> input index, in submission order
        self.count = 0  # items taken from the input so far
        self.out: deque[Any] = deque()  # items ready to hand out
        self._held: dict[int, Any] = {}  # ordered mode: finished, waiting for earlier ones
        self._next = 0

    def room(self) -> bool:
        return len(self.inflight) < self.max_concurrent

    def step(self) -> int:
        """What the façade does next: NEED (take a payload, then call
        :meth:`sent`/:meth:`failed`, or set ``exhausted``), EMIT (hand out
        ``out``), WAIT (until :meth:`next_deadline` or an outcome), DONE."""
        if not self.exhausted and self.room():
            return NEED
        self.collect()
        if self.out:
            return EMIT
        if self.exhausted and not self.inflight:
            return DONE
        if not self.exhausted and self.room():
            return NEED
        return WAIT

    def sent(self, mid: str) -> None:
        self.inflight[mid] = self.count
        self.count += 1

    def failed(self, exc: SQMError) -> None:
        """The item could not even be submitted (encoding, size, sqm unreachable)."""
        self._put(self.count, exc)
        self.count += 1

    def collect(self) -> None:
        """Turn arrived outcomes and passed deadlines into items."""
        core = self.core
        done = self.sink.done
        inflight = self.inflight
        while done:
            mid, outcome = done.popleft()
            index = inflight.pop(mid, None)
            if index is None:
                continue
            late = False
            if self._extended:
                # In its verdict grace: only sqm's verdict counts; a worker's
                # reply is late (see SenderBase._late).
                late = self._extended.pop(mid, None) is not None and not outcome.from_broker
            item: Any
            if late:
                item = (self.timeout_error(mid) if self.timeout_error is not None
                        else Timeout(f"no reply for message {mid} in time (map item)"))
            else:
                try:
                    item = core.result(outcome)
                except SQMError as exc:
                    item = exc
            self._put(index, item)
        if inflight:
            now = time.monotonic()
            expired = []
            extended = self._extended
            # Every item has the same timeout and was submitted in order, so
            # deadlines grow along the dict: stop at the first one still alive.
            for mid in inflight:
                deadline = core.outstanding.get(mid)
                if deadline is None or deadline > now:
                    break
                until = extended.get(mid)
                if until is None and self.grace is not None:
                    extra = self.grace(mid, now)
                    if extra > 0:
                        extended[mid] = now + extra  # sqm accepted it: await its verdict
                        continue
                elif until is not None and until > now:
                    continue
                expired.append(mid)
            for mid in expired:
                extended.pop(mid, None)
                core.forget(mid)
                error = (self.timeout_error(mid) if self.timeout_error is not None
                         else Timeout(f"no reply for message {mid} in time (map item)"))
                self._put(inflight.pop(mid), error)

    def next_deadline(self) -> float:
        """When the oldest outstanding item (or a grace) ends (monotonic), or inf."""
        extended = self._extended
        nxt = min(extended.values()) if extended else float("inf")
        for mid in self.inflight:
            if mid in extended:
                continue
            deadline = self.core.outstanding.get(mid)
            return nxt if deadline is None else min(nxt, deadline)
        return nxt

    def close(self) -> None:
        """The consumer stopped early: forget what is still outstanding."""
        for mid in self.inflight:
            self.core.forget(mid)
        self.inflight.clear()
        self._extended.clear()

    def _put(self, index: int, item: Any) -> None:
        if not self.ordered:
            self.out.append((index, item))
            return
        if index != self._next:
            self._held[index] = item
            return
        self.out.append(item)
        self._next += 1
        held = self._held
        while self._next in held:
            self.out.append(held.pop(self._next))
            self._next += 1
