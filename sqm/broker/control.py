"""Operators' commands (``sqm drain|resume|purge|stop-worker|cancel|shutdown|workers|status``).

One handler per command in :data:`CONTROL`; plugins add theirs through
:meth:`sqm.plugins.Plugin.control_commands`. A handler gets the server, the
time and the request object and returns the JSON reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.stats import workers_status

if TYPE_CHECKING:
    from ..plugins import ControlHandler
    from .server import QueueServer

#: Commands that only read: not logged (monitoring polls them).
READ_ONLY = frozenset({"status", "workers", "dead-list"})


def _status(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "status": server.status(now)}


def _workers(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "workers": workers_status(server.core, now)}


def _drain(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    server.core.drain()
    return {"ok": True, "pending": server.core.pending}


def _resume(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    held = server.core.pending
    server.core.resume(now)
    return {"ok": True, "pending": held}


def _purge(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "purged": server.core.purge(now)}


def _stop_worker(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    core = server.core
    wid = str(request.get("id", ""))
    if not core.stop_worker(wid):
        known = ", ".join(w.id for w in core.workers.values()) or "none"
        return {
            "ok": False,
            "error": f"no worker {wid!r} on queue {server.name!r} (workers: {known})",
        }
    return {"ok": True, "id": wid}


def _cancel(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    """End one message (scheduled, pending or running) with Cancelled (``sqm cancel``)."""
    mid = str(request.get("id", ""))
    found = server.core.cancel(now, mid.encode("utf-8", "replace"), None,
                               "cancelled by an operator")
    return {"ok": True, "id": mid, "cancelled": found}


def _shutdown(server: QueueServer, now: float, request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "shutdown": True}  # the server stops the broker once it has replied


#: The built-in commands, in the order the "unknown command" error lists them.
CONTROL: dict[str, ControlHandler] = {
    "status": _status,
    "workers": _workers,
    "drain": _drain,
    "resume": _resume,
    "purge": _purge,
    "stop-worker": _stop_worker,
    "cancel": _cancel,
    "shutdown": _shutdown,
}

CONTROL_COMMANDS = tuple(CONTROL)  # kept for callers of the former constant
