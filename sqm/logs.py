"""Logging set-up for the command-line programs (stderr, one line per record)."""

from __future__ import annotations

import logging
import sys

LEVELS = ["debug", "info", "warning", "error"]


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
