"""Callbacks for the reliability tests: the standard ones plus a poison message."""

from __future__ import annotations

import os

from tests.apps import _log
from tests.apps import callbacks as standard


def die(worker, originator, payload):
    """A poison message: kills the worker process that runs it."""
    _log("die", payload)
    os._exit(3)


callbacks = {**standard, "die": die}
