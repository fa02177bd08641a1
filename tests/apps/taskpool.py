"""Helpers run as real processes by the task pool tests.

``python -m tests.apps.taskpool spawn POOL BEHAVIOR`` spawns ``sleep 60`` in
POOL, prints ``<task pid> <own sid>`` and then either exits (background,
daemon) or blocks reading stdin (foreground, so the test can kill it).

``python -m tests.apps.taskpool trap`` prints "ready", and on SIGINT prints
"got INT" and exits 7 (a child whose signals the tests check).

``python -m tests.apps.taskpool lines N`` prints N numbered lines, flushing
each, then "done", then sleeps unless ``--exit``.

``python -m tests.apps.taskpool fleet POOL QUEUE N`` runs a WorkerFleet of N
``tests.apps:callbacks`` workers until SIGTERM; ``autostart QUEUE`` calls
``autostart_broker`` and prints the broker task's pid (or "none").
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def main(argv: list[str]) -> int:
    what = argv[0]
    if what == "spawn":
        from sqm.taskpool import TaskPool

        pool, behavior = argv[1], argv[2]
        task = TaskPool(pool).spawn(exec=["sleep", "60"], behavior=behavior, meta={"by": "helper"})
        print(task.pid, os.getsid(0), flush=True)
        if behavior == "foreground":
            sys.stdin.read()
        return 0
    if what == "trap":
        # One write(2) per line: under PYTHONUNBUFFERED print() writes the text and its
        # newline separately, and a SIGINT between the two (the handler exits) lost "\n".
        def on_int(_signum: int, _frame: object) -> None:
            os.write(1, b"got INT\n")
            os._exit(7)

        signal.signal(signal.SIGINT, on_int)
        if "--ignore-term" in argv:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(1, b"ready\n")
        threading.Event().wait(60)
        return 0
    if what == "lines":
        for i in range(int(argv[1])):
            print(f"line {i:05d}", flush=True)
        print("done", flush=True)
        if "--exit" not in argv:
            threading.Event().wait(60)
        return 0
    if what == "fleet":
        from sqm.taskpool import TaskPool
        from sqm.taskpool.fleet import WorkerFleet

        pool, queue, n = argv[1], argv[2], int(argv[3])
        fleet = WorkerFleet(TaskPool(pool), queue, "tests.apps:callbacks", n, interval=0.1,
                            worker_args=["--heartbeat", "0.2"])
        print(os.getpid(), flush=True)
        return fleet.run()
    if what == "autostart":
        from sqm.taskpool.autostart import autostart_broker

        task = autostart_broker(argv[1], timeout=30)
        print("none" if task is None else task.pid, flush=True)
        return 0
    raise SystemExit(f"unknown helper {what}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
