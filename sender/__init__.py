"""Clients that submit messages to an sqm queue and receive workers' replies.

>>> from sender import Sender
>>> with Sender("myqueue") as s:                      # doctest: +SKIP
...     s.rpc("myfunc", {"name": "value"}, timeout=5)
"""

from sqm.errors import (
    BrokerShutdown,
    BrokerUnreachable,
    Expired,
    MessageTooLarge,
    ProtocolError,
    Purged,
    QueueFull,
    RemoteError,
    SerializerError,
    SQMError,
    Timeout,
    WorkerLost,
)

from .aio import AsyncSender
from .sync import Sender

__all__ = [
    "AsyncSender",
    "BrokerShutdown",
    "BrokerUnreachable",
    "Expired",
    "MessageTooLarge",
    "ProtocolError",
    "Purged",
    "QueueFull",
    "RemoteError",
    "SQMError",
    "Sender",
    "SerializerError",
    "Timeout",
    "WorkerLost",
]
