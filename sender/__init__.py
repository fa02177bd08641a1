"""Clients that submit messages to an sqm queue and receive workers' replies.

>>> from sender import Sender
>>> with Sender("myqueue") as s:                      # doctest: +SKIP
...     s.rpc("myfunc", {"name": "value"}, timeout=5)
"""

from sqm.errors import (
    AuthError,
    BrokerShutdown,
    BrokerUnreachable,
    Cancelled,
    Expired,
    HopLimitExceeded,
    KeyFileError,
    LockHeld,
    MessageTooLarge,
    ProtocolError,
    Purged,
    QueueFull,
    RemoteError,
    SerializerError,
    SQMError,
    TimeLimitExceeded,
    Timeout,
    WorkerLost,
)

from .aio import AsyncSender
from .sync import Sender

__all__ = [
    "AsyncSender",
    "AuthError",
    "BrokerShutdown",
    "BrokerUnreachable",
    "Cancelled",
    "Expired",
    "HopLimitExceeded",
    "KeyFileError",
    "LockHeld",
    "MessageTooLarge",
    "ProtocolError",
    "Purged",
    "QueueFull",
    "RemoteError",
    "SQMError",
    "Sender",
    "SerializerError",
    "TimeLimitExceeded",
    "Timeout",
    "WorkerLost",
]
