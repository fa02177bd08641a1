"""Child processes that run this very sqm: the worker fleet and its command line.

``sqm worker --processes N`` runs its children as tasks of a pool
(:class:`sqm.taskpool.fleet.WorkerFleet`, started by :func:`run_fleet`);
:func:`sqm_command` says how to start an sqm child safely.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("sqm.pool")


def sqm_command(*args: str) -> list[str]:
    """The argv that runs this very sqm's CLI with ``args`` in a child process.

    Not ``python -m sqm``: that puts the current directory first on
    sys.path, so a user's own ``sqm.py``, ``worker.py`` or ``sender.py``
    there would be imported instead of ours. The child puts the directory
    holding this sqm first instead (``sqm worker`` still imports the user's
    MODULE from the current directory).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    boot = (f"import sys; sys.path[0] = {root!r}; sys.argv[0] = 'sqm'; "
            "from sqm.cli import main; main()")
    return [sys.executable, "-c", boot, *args]


def run_fleet(target: str, queue: str, processes: int, worker_args: Sequence[str], *,
              pool_path: str | None = None, autoscale: tuple[int, int] | None = None,
              endpoint: str | None = None, config: str | None = None) -> int:
    """``sqm worker --processes N``: N workers as tasks of a pool, until SIGTERM/SIGINT.

    The workers' output goes to their tasks' output files and to this
    process's stderr. Returns the exit status: 0 once every worker stopped
    cleanly (on SIGTERM/SIGINT, or each asked to stop by sqm).
    """
    from .admin import fetch_status
    from .config import resolve
    from .taskpool import TaskPool, default_pool_path
    from .taskpool.autoscale import Autoscaler
    from .taskpool.fleet import StatusSource, WorkerFleet

    pool = TaskPool(pool_path or default_pool_path(), create=True)
    scaler = Autoscaler(maximum=autoscale[0], minimum=autoscale[1]) if autoscale else None
    status: StatusSource | None = None
    if scaler is not None:
        settings = resolve(queue, endpoint=endpoint, config=config)

        def status() -> dict[str, Any]:
            return fetch_status(settings, timeout=1.0)

    fleet = WorkerFleet(pool, queue, target, processes, worker_args=worker_args,
                        autoscaler=scaler, status=status, echo=True)
    log.info("worker pool of %d process(es) started (tasks of %s)", fleet.desired, pool.path)
    return fleet.run()
