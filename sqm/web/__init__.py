"""HTTP for sqm: Prometheus /metrics, JSON status and history, and a live dashboard.

``start(bind, port, snapshot)`` runs it in daemon threads beside the broker;
see :mod:`sqm.web.server`. Imported only when ``--metrics-port`` is given, so
the plain broker never loads prometheus_client.
"""

from __future__ import annotations

from .collector import SqmCollector
from .server import WebServer, start

__all__ = ["SqmCollector", "WebServer", "start"]
