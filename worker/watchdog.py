"""The time-limit watchdog of a fleet child (``sqm worker --processes``).

sqm fails a message back with ``TimeLimitExceeded`` at its limit, whatever
the callback does; but a stuck callback would keep its worker busy for
ever. Python cannot kill a thread, so a worker the fleet runs ends its own
process instead, with :data:`TIME_LIMITED`, and its supervisor starts a
fresh one (Celery's hard time limit). A worker in the user's own process
(``Worker.run()``) has no watchdog: the callback runs to its end, its late
answer is dropped, and the worker stays busy until then.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("sqm.worker")

#: Exit status of a fleet child that ended itself over a callback past its time limit.
TIME_LIMITED = 124  # as timeout(1)


class Watchdog:
    """Ends the process when a watched callback passes its limit (one thread, no polling)."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._due: dict[bytes, float] = {}  # message id -> monotonic limit
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"sqm-watchdog-{self.worker_id}")
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def watch(self, msg_id: bytes, limit_at: float) -> None:
        with self._cond:
            self._due[msg_id] = limit_at
            self._cond.notify()

    def unwatch(self, msg_id: bytes) -> None:
        with self._cond:
            self._due.pop(msg_id, None)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._due:
                    self._cond.wait()
                    continue
                msg_id, at = min(self._due.items(), key=lambda kv: kv[1])
                left = at - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                log.error("worker %s: callback for message %s still running past its time "
                          "limit: ending this process (exit %d) for the fleet to replace",
                          self.worker_id, msg_id.decode("ascii", "replace"), TIME_LIMITED)
                for handler in logging.getLogger().handlers + log.handlers:
                    handler.flush()
                os._exit(TIME_LIMITED)
