"""An in-process broker for fast tests (like dramatiq's StubBroker, but the real one).

:class:`InProcessBroker` runs the real :class:`~sqm.broker.Broker` in a
thread over ``inproc://``, on a ZeroMQ context it shares with the test::

    with InProcessBroker("q") as b:
        worker = Worker("q", endpoint=b.endpoint, context=b.context)   # in a thread
        with Sender("q", endpoint=b.endpoint, context=b.context) as s:
            ...
        assert b.status()["completed_total"] == 1

No process, no socket file, no port: a test starts one in milliseconds.
Everything the broker does is what ``sqm serve`` does (same server, same
core); only the transport differs (senders bind ``inproc://`` mailboxes,
which the broker allows on an in-process queue only).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import zmq

from .broker import Broker, BrokerOptions
from .config import QueueSettings, default_rundir
from .journal import Journal
from .plugins import Plugin
from .protocol import CONTROL, SIGNATURE, STATUS


class InProcessBroker:
    """The real broker serving ``queue`` at ``inproc://sqm-<queue>-<hex>``, in a thread.

    ``context`` is the shared ZeroMQ context (created, and terminated on
    :meth:`stop`, unless given). ``opts``, ``plugins`` and ``journal`` are
    passed to :class:`~sqm.broker.Broker`.
    """

    def __init__(
        self,
        queue: str = "q",
        *,
        opts: BrokerOptions | None = None,
        plugins: Iterable[Plugin] = (),
        journal: Journal | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.queue = queue
        self._own_ctx = context is None
        self.context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self.endpoint = f"inproc://sqm-{queue}-{os.urandom(6).hex()}"
        self.settings = QueueSettings(queue, self.endpoint, default_rundir())
        self.broker = Broker(
            [self.settings], opts, journal=journal, plugins=plugins, context=self.context
        )
        self._thread: threading.Thread | None = None
        self._admin: zmq.Socket[bytes] | None = None
        self._admin_lock = threading.Lock()

    # -------------------------------------------------------------- lifetime

    def start(self) -> InProcessBroker:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.broker.run, name=f"sqm-{self.queue}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving as SIGTERM would (pending messages failed back), wait, clean up."""
        if self._admin is not None:
            self._admin.close(0)
            self._admin = None
        thread = self._thread
        if thread is not None:
            self.broker.stop()
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"in-process broker {self.queue!r} did not stop in {timeout} s")
            self._thread = None
        else:
            self.broker.close()
        if self._own_ctx:
            self.context.term()

    def __enter__(self) -> InProcessBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- admin

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The queue's status, asked over the wire like ``sqm status --json``."""
        return self._request([SIGNATURE, STATUS], timeout)

    def control(self, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
        """An operator's command (``drain``, ``resume``, ``purge``...), over the wire."""
        body = json.dumps({"cmd": cmd, **args}).encode()
        return self._request([SIGNATURE, CONTROL, body], timeout)

    def _request(self, frames: list[bytes], timeout: float) -> dict[str, Any]:
        with self._admin_lock:
            if self._admin is None:
                self._admin = self.context.socket(zmq.DEALER)
                self._admin.linger = 0
                self._admin.connect(self.endpoint)
            sock = self._admin
            sock.send_multipart(frames)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    raise TimeoutError(f"no reply from in-process broker {self.queue!r}")
                reply = sock.recv_multipart()
                if len(reply) == 3 and reply[0] == SIGNATURE and reply[1] == frames[1]:
                    data = json.loads(reply[2])
                    if not isinstance(data, dict):
                        raise ValueError(f"unexpected reply {data!r}")
                    return data
