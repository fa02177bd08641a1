"""A small app shipped with sqm, so the README's commands work from any directory.

``sqm worker sqm.examples:callbacks --queue myqueue`` serves these methods;
``sqm submit myqueue add '{"a": 1, "b": 2}'`` prints 3.
"""

from __future__ import annotations

import threading
from typing import Any

_wait = threading.Event().wait  # simulated work


def add(worker: Any, originator: bytes, payload: dict[str, float]) -> float:
    """``{"a": x, "b": y}`` -> x + y."""
    return payload["a"] + payload["b"]


def echo(worker: Any, originator: bytes, payload: Any) -> Any:
    """The payload, unchanged."""
    return payload


def square(worker: Any, originator: bytes, payload: float) -> float:
    """A number -> its square."""
    return payload * payload


def sleep(worker: Any, originator: bytes, payload: float) -> float:
    """Wait ``payload`` seconds (a slow job), then reply with it."""
    _wait(float(payload))
    return payload


callbacks = {"add": add, "echo": echo, "square": square, "sleep": sleep}
