"""One thread per process gives back the messages waiting behind a long callback.

With ``prefetch`` above 1, sqm hands a worker several messages at once and
the plain runner runs them one after another. Prefetch pays off while
callbacks are short: messages flow in batches, not one round trip each.
When one callback runs long, though, the messages behind it would wait for
it even if another worker is idle (head-of-line blocking), and sqm would go
on filling the worker's free slots.

So while a Worker with several slots serves, this thread looks at it every
``after`` seconds (only while its callbacks run; it sleeps when they stop).
Once a callback has run ``after`` seconds, the thread takes the runner's
lock (free while the callback runs: the runner holds it at every other
moment), reads what arrived on the broker link and sends GIVE_BACK with the
ids of the messages not started: sqm puts them back at the head of the
queue for any worker, and parks them and the worker's free slots, so no new
work goes to a worker busy with a long callback. When the callback ends,
the runner sends CREDIT and takes work again. A message is either started
by the runner or given back by this thread, under the lock, never both.

The cost is a wake-up every ``after`` seconds per process while messages
flow, and nothing per message but reading a flag.
"""

from __future__ import annotations

import logging
import os
import threading
from time import monotonic
from typing import Protocol

log = logging.getLogger("sqm.worker")

#: How long a callback runs before the messages behind it are given back (s).
RECLAIM_AFTER_S = 0.005
#: Wake-ups that find no callback running and none ended since the last one,
#: after which the thread sleeps until a callback starts again.
QUIET_TICKS = 2


class Holder(Protocol):
    """A runner whose unstarted messages the reclaimer may give back."""

    def started(self) -> float:
        """When the running callback started (monotonic), 0.0 when none runs."""
        ...

    def progress(self) -> int:
        """How many callbacks have ended so far."""
        ...

    def give_back(self, started: float) -> None:
        """Give back what waits, if the callback that started at ``started`` still runs."""
        ...


class Reclaimer:
    """The process's reclaim thread and the runners it watches."""

    def __init__(self, after: float = RECLAIM_AFTER_S) -> None:
        self.after = after
        self._cond = threading.Condition()
        self._holders: list[Holder] = []
        self._thread: threading.Thread | None = None
        #: The thread is watching (a runner that starts a callback calls :meth:`arm`
        #: when this is False: one attribute read per message).
        self.armed = False

    def watch(self, holder: Holder) -> None:
        with self._cond:
            self._holders.append(holder)

    def forget(self, holder: Holder) -> None:
        with self._cond:
            if holder in self._holders:
                self._holders.remove(holder)
            self._cond.notify()

    def arm(self) -> None:
        """A callback starts: watch from now on (starts the thread if needed)."""
        with self._cond:
            if self.armed or not self._holders:
                return
            self.armed = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="sqm-reclaim")
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        after = self.after
        done: dict[int, int] = {}  # id(holder) -> its progress at the last look
        quiet = 0
        while True:
            with self._cond:
                while not self.armed and self._holders:
                    self._cond.wait()
                if not self._holders:
                    self.armed = False
                    self._thread = None
                    return
                holders = list(self._holders)
            now = monotonic()
            wait = after
            active = False
            before, done = done, {}
            for h in holders:
                started = h.started()
                ended = done[id(h)] = h.progress()
                if started or before.get(id(h)) != ended:
                    active = True
                if not started:
                    continue
                due = started + after
                if due > now:
                    wait = min(wait, due - now)
                    continue
                try:
                    h.give_back(started)
                except Exception:  # the thread must go on for the other runners
                    log.exception("cannot give back the messages of a worker")
            if active:
                quiet = 0
            else:
                quiet += 1
                if quiet >= QUIET_TICKS:
                    quiet = 0
                    with self._cond:
                        self.armed = False
                    # A callback that started as we looked has seen armed True and
                    # not called arm(): look once more now that armed is False.
                    if any(h.started() for h in holders):
                        with self._cond:
                            self.armed = True
                    continue
            with self._cond:
                if self.armed and self._holders:
                    self._cond.wait(wait)


#: The process's reclaimer (a forked child starts with a fresh one).
RECLAIMER = Reclaimer()


def _after_fork() -> None:
    global RECLAIMER
    RECLAIMER = Reclaimer()


os.register_at_fork(after_in_child=_after_fork)


def reclaimer() -> Reclaimer:
    """The process's reclaimer (looked up at each use: a fork replaces it)."""
    return RECLAIMER


__all__ = ["QUIET_TICKS", "RECLAIMER", "RECLAIM_AFTER_S", "Holder", "Reclaimer", "reclaimer"]
