"""Logging set-up for the command-line programs: stderr, one line per record.

``--log-format json`` makes every line one JSON object (``ts``, ``level``,
``logger``, ``message``, ``pid``, plus ``exc_info``/``stack_info`` text and
any ``extra=`` fields), for log shippers such as Loki, Vector or ELK.

The JSON formatter is the small class below rather than python-json-logger:
it is about thirty lines, fixes the key names this project documents, and
spares every install one more dependency for that.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any

LEVELS = ["debug", "info", "warning", "error"]
FORMATS = ["text", "json"]

TEXT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def _rfc3339(created: float) -> str:
    """UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z (what log stores parse)."""
    secs = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((created - secs) * 1000):03d}Z"


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send the root logger to stderr at ``level`` in ``fmt`` ("text" or "json").

    With json, uncaught exceptions (main thread and others) and warnings are
    logged too, so that no multi-line traceback breaks the one-object-per-line
    promise.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    if fmt == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught


def _log_uncaught(etype: type[BaseException], value: BaseException,
                  tb: TracebackType | None) -> None:
    logging.getLogger("sqm").critical("uncaught %s: %s", etype.__name__, value,
                                      exc_info=(etype, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    logging.getLogger("sqm").critical(
        "uncaught %s in thread %s: %s", args.exc_type.__name__, name, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )
