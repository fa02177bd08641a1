"""Task callbacks: on_start, on_status, on_complete, on_fail for one message.

The correlator never runs user code while it is taking frames in: it queues
calls (in arrival order, so progress reports keep their order) and the
Sender runs them inside receive/rpc/map/poll, the AsyncSender on its event
loop. A callback that raises is logged and counted; the sender carries on.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from sqm.errors import SQMError

log = logging.getLogger("sender")

OnStart = Callable[[], Any]
OnStatus = Callable[[int, int], Any]
OnComplete = Callable[[Any], Any]
OnFail = Callable[[SQMError], Any]


class Hooks:
    """The callbacks given to one ``submit``.

    ``consumes``: with on_complete or on_fail, the outcome goes to them and
    never to ``receive()``.
    """

    __slots__ = ("on_start", "on_status", "on_complete", "on_fail", "consumes")

    def __init__(
        self,
        on_start: OnStart | None,
        on_status: OnStatus | None,
        on_complete: OnComplete | None,
        on_fail: OnFail | None,
    ) -> None:
        self.on_start = on_start
        self.on_status = on_status
        self.on_complete = on_complete
        self.on_fail = on_fail
        self.consumes = on_complete is not None or on_fail is not None

    @staticmethod
    def make(
        on_start: OnStart | None,
        on_status: OnStatus | None,
        on_complete: OnComplete | None,
        on_fail: OnFail | None,
    ) -> Hooks | None:
        """A Hooks object, or None when no callback was given (the common case)."""
        if on_start is None and on_status is None and on_complete is None and on_fail is None:
            return None
        for name, fn in (("on_start", on_start), ("on_status", on_status),
                         ("on_complete", on_complete), ("on_fail", on_fail)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable")
        return Hooks(on_start, on_status, on_complete, on_fail)

    def started(self, core: Any, mid: str) -> None:
        if self.on_start is not None:
            core.calls.append((self.on_start, ()))

    def status(self, core: Any, mid: str, done: int, total: int) -> None:
        if self.on_status is not None:
            core.calls.append((self.on_status, (done, total)))

    def finish(self, core: Any, mid: str, outcome: Any) -> None:
        core.calls.append((self._finish, (core, mid, outcome)))

    def _finish(self, core: Any, mid: str, outcome: Any) -> Any:
        try:
            value = core.result(outcome)
        except SQMError as exc:
            if self.on_fail is not None:
                return self.on_fail(exc)
            log.warning("message %s failed and has no on_fail callback: %s", mid, exc)
            return None
        if self.on_complete is not None:
            return self.on_complete(value)
        return None


def run_calls(core: Any, spawn: Callable[[Any], None] | None = None) -> None:
    """Run the callbacks ``core`` has queued, oldest first.

    ``spawn`` (AsyncSender) receives what a callback returns when it is
    awaitable, so ``async def`` callbacks work there too.
    """
    calls = core.calls
    while calls:
        fn, args = calls.popleft()
        try:
            rv = fn(*args)
        except Exception:
            core.callback_errors += 1
            log.exception("a sender callback raised (%r); carrying on", fn)
            continue
        if rv is not None and inspect.isawaitable(rv):
            if spawn is not None:
                spawn(rv)
            else:
                core.callback_errors += 1
                log.error("callback %r returned an awaitable; the Sender runs plain functions", fn)
                if inspect.iscoroutine(rv):
                    rv.close()
