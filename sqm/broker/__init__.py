"""The broker: :class:`Broker` (the process loop) over :class:`QueueServer`\\ s.

- :mod:`.server`: one queue's socket, input handlers table, outbox sender, hooks;
- :mod:`.control`: the operators' command table;
- :mod:`.loop`: :class:`Broker`, the one-thread event loop(s).
"""

from __future__ import annotations

from .control import CONTROL, CONTROL_COMMANDS
from .loop import Broker
from .server import ACK_BATCH, ACK_IDLE_MS, BATCH, BrokerOptions, QueueServer

__all__ = [
    "ACK_BATCH",
    "ACK_IDLE_MS",
    "BATCH",
    "CONTROL",
    "CONTROL_COMMANDS",
    "Broker",
    "BrokerOptions",
    "QueueServer",
]
