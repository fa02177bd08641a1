"""A process of many Workers, one thread each, sharing one ZeroMQ context (as W4's).

``python -m tests.apps.many_workers QUEUE N HEARTBEAT [ENDPOINT]``. SIGTERM
ends them all and the process; SIGUSR1 makes the first one still serving
leave (terminate: it says BYE). Used by tests/system/test_process_beats.py.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import zmq

from worker import Worker


def echo(_worker: Any, _originator: Any, payload: Any) -> Any:
    return payload


def main(argv: list[str]) -> None:
    queue, n, heartbeat = argv[0], int(argv[1]), float(argv[2])
    endpoint = argv[3] if len(argv) > 3 else None
    ctx = zmq.Context()
    ctx.max_sockets = 8 * n + 64
    workers = [Worker(queue, endpoint=endpoint, heartbeat=heartbeat, context=ctx,
                      callbacks={"echo": echo}) for _ in range(n)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    done = threading.Event()
    serving = list(workers)

    def leave_one(*_: Any) -> None:
        if serving:
            serving.pop(0).terminate()

    def stop(*_: Any) -> None:
        for w in workers:
            w.terminate()
        done.set()

    signal.signal(signal.SIGUSR1, leave_one)
    signal.signal(signal.SIGTERM, stop)
    for t in threads:
        t.start()
    done.wait()
    for t in threads:
        t.join(10)
    ctx.term()


if __name__ == "__main__":
    main(sys.argv[1:])
