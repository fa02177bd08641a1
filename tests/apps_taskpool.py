"""Helpers run as real processes by the task pool tests.

``python -m tests.apps_taskpool spawn POOL BEHAVIOR`` spawns ``sleep 60`` in
POOL, prints ``<task pid> <own sid>`` and then either exits (background,
daemon) or blocks reading stdin (foreground, so the test can kill it).

``python -m tests.apps_taskpool trap`` prints "ready", and on SIGINT prints
"got INT" and exits 7 (a child whose signals the tests check).

``python -m tests.apps_taskpool lines N`` prints N numbered lines, flushing
each, then "done", then sleeps unless ``--exit``.
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
        def on_int(_signum: int, _frame: object) -> None:
            print("got INT", flush=True)
            os._exit(7)

        signal.signal(signal.SIGINT, on_int)
        if "--ignore-term" in argv:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        threading.Event().wait(60)
        return 0
    if what == "lines":
        for i in range(int(argv[1])):
            print(f"line {i:05d}", flush=True)
        print("done", flush=True)
        if "--exit" not in argv:
            threading.Event().wait(60)
        return 0
    raise SystemExit(f"unknown helper {what}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
