"""Task pools: a directory of supervised background processes (RapidApp::BgTask::TaskPool).

``TaskPool(path).spawn(cmd=...)`` starts a supervisor process that owns the
child, keeps its output, restarts it per policy, holds its lockfile and
answers queries on a unix socket in the directory. See README "Task pools".
"""

from ..errors import LockHeld
from .pool import Task, TaskPool, default_pool_path, matches

__all__ = ["LockHeld", "Task", "TaskPool", "default_pool_path", "matches"]
