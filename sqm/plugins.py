"""The broker's plugin seam: features (journal, security, dead letters...) in rooms of their own.

A plugin subclasses :class:`Plugin` and overrides only the hooks it needs;
:class:`Hooks` collects, once at start, the bound methods that are
overridden, so a hook nobody implements costs nothing (no call, and for the
per-message hooks not even a loop). See docs/PLUGINS.md for when each hook
runs and what it may cost.

Hooks take the :class:`~sqm.broker.server.QueueServer` they run for (one
plugin instance may serve several queues).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import zmq

    from .broker.server import QueueServer
    from .core import Message

#: A control command: ``(server, now, request) -> reply`` (a JSON object).
ControlHandler = Callable[["QueueServer", float, dict[str, Any]], dict[str, Any]]


class Plugin:
    """Base class: every hook does nothing. Override the ones you need."""

    #: True when the plugin wants input handled in batches (poll loop, one
    #: :meth:`before_acks` per batch), e.g. one journal commit per batch.
    #: Otherwise a single queue runs the lower-latency one-message loop.
    batching = False
    #: True when pending messages outlive a stop (the journal keeps them for
    #: the next start), so sqm does not fail them back when it stops.
    keeps_pending = False

    def recover(self, server: QueueServer, now: float) -> None:
        """Once per queue at start, before serving: e.g. re-queue journaled messages."""

    def admit(self, server: QueueServer, peer: zmq.Frame, command: bytes) -> bool:
        """May this peer send ``command`` (a wire byte)? Called for every input.

        ``peer`` is the routing-id frame (its ``get("User-Id")`` is the ZAP
        identity). Cache per ``peer.bytes``: this runs once per message while
        registered. Return False to drop the input; reply first if the peer
        should be told.
        """
        return True

    def admit_control(self, server: QueueServer, peer: zmq.Frame, name: str) -> bool:
        """May this peer run control command ``name``? False answers "not allowed"."""
        return True

    def accepted(self, server: QueueServer, msg: Message) -> None:
        """A SUBMIT was accepted (also a sender's re-send of one sqm holds, and a
        retry's rewritten envelope: the latest frames win): per message."""

    def ended(self, server: QueueServer, msg: Message, outcome: str) -> None:
        """An accepted message ended (completed, failed, expired, purged...): per message."""

    def failed_back(self, server: QueueServer, msg: Message, error: str) -> None:
        """sqm failed an accepted message back to its caller (``error``: WorkerLost, Expired...).

        Only on failure: it costs the hot path nothing (unlike :meth:`ended`,
        which needs an ``Ended`` entry per message). Refusals at submit are
        not accepted and never come here.
        """

    def before_acks(self, server: QueueServer) -> None:
        """End of a batch of input, before its ACCEPTED notices go out (e.g. commit)."""

    def status(self, server: QueueServer, data: dict[str, Any]) -> None:
        """Add fields to the queue's status (``sqm status --json``, metrics)."""

    def control_commands(self) -> dict[str, ControlHandler]:
        """Control commands this plugin adds (``sqm``'s admin requests), by name."""
        return {}

    def closing(self, server: QueueServer) -> None:
        """The server stops (after its final flush): release what the plugin holds."""


def _overridden(plugins: Iterable[Plugin], name: str) -> tuple[Any, ...]:
    base = getattr(Plugin, name)
    return tuple(getattr(p, name) for p in plugins if getattr(type(p), name) is not base)


class Hooks:
    """The overridden hooks of some plugins, as tuples of bound methods."""

    def __init__(self, plugins: Iterable[Plugin] = ()) -> None:
        self.plugins = tuple(plugins)
        ps = self.plugins
        self.recover: tuple[Callable[[QueueServer, float], None], ...] = _overridden(ps, "recover")
        self.admit: tuple[Callable[[QueueServer, zmq.Frame, bytes], bool], ...] = _overridden(
            ps, "admit"
        )
        self.admit_control: tuple[Callable[[QueueServer, zmq.Frame, str], bool], ...] = (
            _overridden(ps, "admit_control")
        )
        self.accepted: tuple[Callable[[QueueServer, Message], None], ...] = _overridden(
            ps, "accepted"
        )
        self.ended: tuple[Callable[[QueueServer, Message, str], None], ...] = _overridden(
            ps, "ended"
        )
        self.failed_back: tuple[Callable[[QueueServer, Message, str], None], ...] = (
            _overridden(ps, "failed_back")
        )
        self.before_acks: tuple[Callable[[QueueServer], None], ...] = _overridden(
            ps, "before_acks"
        )
        self.status: tuple[Callable[[QueueServer, dict[str, Any]], None], ...] = _overridden(
            ps, "status"
        )
        self.closing: tuple[Callable[[QueueServer], None], ...] = _overridden(ps, "closing")
        self.batching = any(p.batching for p in ps)
        self.keeps_pending = any(p.keeps_pending for p in ps)
        self.control: dict[str, ControlHandler] = {}
        for p in ps:
            self.control.update(p.control_commands())
