"""The broker process: one thread serving one or more queues until stopped.

Two loops: a single queue with no batching plugin blocks in ``recv``
(fewest system calls, lowest latency) and reads on while what it read has
something to send (:meth:`QueueServer.handle_burst`); several queues, or a
plugin that wants batches (the journal: one commit per batch), poll the
sockets and read a batch per wake-up.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Iterable
from typing import Any

import zmq

from ..config import QueueSettings
from ..journal import Journal, JournalPlugin
from ..plugins import Hooks, Plugin
from ..zmqfast import RCVTIMEO, recv_frame, set_option
from .server import ACK_IDLE_MS, BrokerOptions, QueueServer

log = logging.getLogger("sqm.broker")


class Broker:
    """Serves one or more queues from one thread until :meth:`stop` or a signal.

    ``opts`` is one BrokerOptions for every queue, or a list with one per
    queue (in the order of ``settings``). ``plugins`` extend the server
    (:mod:`sqm.plugins`); ``journal=`` is short for adding a
    :class:`~sqm.journal.JournalPlugin`, so accepted messages survive a
    crash of sqm. ``context`` shares a ZeroMQ context (``inproc://``
    endpoints, :mod:`sqm.testing`); the broker then does not terminate it.

    A plugin may also have ``start_context(ctx)`` (run before any socket
    binds), ``stop_context()`` (after the sockets close, before the context
    ends) and ``reload()`` (on SIGHUP, with :meth:`install_signal_handlers`):
    the SecurityPlugin's ZAP handler needs all three.
    """

    def __init__(
        self,
        settings: list[QueueSettings],
        opts: BrokerOptions | list[BrokerOptions] | None = None,
        *,
        journal: Journal | None = None,
        plugins: Iterable[Plugin] = (),
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        per_queue = opts if isinstance(opts, list) else [opts or BrokerOptions()] * len(settings)
        if len(per_queue) != len(settings):
            raise ValueError("one BrokerOptions per queue")
        self.opts = per_queue[0] if per_queue else BrokerOptions()
        self.journal = journal
        all_plugins = list(plugins)
        if journal is not None:
            all_plugins.insert(0, JournalPlugin(journal))
        self.hooks = Hooks(all_plugins)
        self._own_ctx = context is None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context() if context is None else context
        self.queues: list[QueueServer] = []
        # Plugins that own context-wide machinery (security's ZAP handler) start
        # it before any socket binds, and stop it before the context ends.
        self._context_plugins: list[Any] = [p for p in all_plugins if hasattr(p, "start_context")]
        now = time.time()
        try:
            for p in self._context_plugins:
                p.start_context(self.ctx)
            for s, o in zip(settings, per_queue, strict=True):
                self.queues.append(
                    QueueServer(self.ctx, s, o, now, hooks=self.hooks, on_shutdown=self.stop)
                )
        except Exception:
            self.close()
            raise
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._snapshot: dict[str, dict[str, Any]] = {}
        self._snapshot_at = 0.0
        self.snapshot_every = 0.0  # seconds; 0 = nobody reads snapshots (no --metrics-port)

    def stop(self, *_: Any) -> None:
        """Ask the loop to stop (safe from a signal handler and from other threads)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        reloads = [p.reload for p in self.hooks.plugins if hasattr(p, "reload")]
        if reloads:
            # SIGHUP: plugins re-read what they read at start (security: the key folders)
            signal.signal(signal.SIGHUP, lambda *_: [r() for r in reloads])

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The latest status of every queue, safe to read from another thread.

        The loop refreshes it every ``snapshot_every`` seconds (on its tick),
        so HTTP scrapes never touch the core and cost the hot path nothing.
        """
        return self._snapshot

    def _refresh_snapshot(self, now: float) -> None:
        if self.snapshot_every and now - self._snapshot_at >= self.snapshot_every:
            self._snapshot_at = now
            self._snapshot = {q.name: q.status(now) for q in self.queues}

    def run(self) -> None:
        """Serve until stopped; on the way out fail pending messages back and say bye.

        With a plugin that keeps pending messages (the journal), they are
        kept for the next start instead of being failed back: their senders
        keep waiting.
        """
        for q in self.queues:
            log.info("queue %s: serving at %s%s", q.name, q.bind,
                     f" (journal {self.journal.path})" if self.journal else "")
        self._refresh_snapshot(time.time())
        if len(self.queues) == 1 and not self.hooks.batching:
            self._run_one(self.queues[0])
        else:
            self._run_many()
        now = time.time()
        for q in self.queues:
            q.core.shutdown(now, fail_pending=not self.hooks.keeps_pending)
            q.flush(now)
            log.info("queue %s: stopped", q.name)
        self.close()

    def _tick(self, now: float) -> None:
        for q in self.queues:
            q.check_connections(now)  # closed worker connections first: no new work to those
            q.core.tick(now)
            if q.core.expired:
                q.log_expired()
            q.flush(now)
            if q.acks_pending and not q.acks_after_hooks:
                q.age_acks()
        self._refresh_snapshot(now)

    def _run_one(self, q: QueueServer) -> None:
        """One queue: block in recv until the next tick (fewest system calls).

        A signal interrupts the wait; the handler sets the stop flag, which
        is seen at the latest at the next tick.
        """
        sock = q.sock
        tick_every = max(0.01, self.opts.heartbeat / 4)
        next_tick = time.time() + tick_every
        core = q.core
        timeout_ms = -2  # the socket's RCVTIMEO as last set: set again only when it changes
        while not self._stopping:
            # A core timer (a scheduled message, a time limit, a reclaim check) may
            # come first: it runs alone, without the periodic tick's walk over workers.
            wake = core.timer_at if core.timer_at < next_tick else next_tick
            now = time.time()
            if now < wake:
                wait_ms = max(1, int((wake - now) * 1000))
                if q.acks_pending:
                    wait_ms = min(wait_ms, ACK_IDLE_MS)
                if wait_ms != timeout_ms:  # under load mostly ACK_IDLE_MS: no setsockopt
                    set_option(sock, RCVTIMEO, wait_ms)
                    timeout_ms = wait_ms
                try:
                    first = recv_frame(sock, 0)
                except zmq.Again:
                    first = None
                    # Nothing came for ACK_IDLE_MS: a good moment to tell senders. (A
                    # wake-up for a core timer is not: under a sequential load it would
                    # put an ACCEPTED between every few rpcs and their replies.)
                    if q.acks_pending and timeout_ms == ACK_IDLE_MS:
                        q.send_acks()
                now = time.time()
                if first is not None:
                    q.handle_burst(first, now)
            if now >= next_tick:
                self._tick(now)
                next_tick = now + tick_every
            elif core.timer_at <= now:
                self._timers(q, now)

    def _timers(self, q: QueueServer, now: float) -> None:
        """Run ``q``'s core timers now due, between ticks."""
        q.core.timers(now)
        q.flush(now)

    def _run_many(self) -> None:
        """Several queues, or a batching plugin: poll the sockets (and the signal
        wake-up pipe) and read a batch per wake-up, so one journal commit covers
        many messages."""
        poller = zmq.Poller()
        by_sock: dict[Any, QueueServer] = {}
        for q in self.queues:
            poller.register(q.sock, zmq.POLLIN)
            by_sock[q.sock] = q
        poller.register(self._wake_r, zmq.POLLIN)
        tick_every = max(0.01, self.opts.heartbeat / 4)
        next_tick = time.time() + tick_every
        poll = poller.poll
        queues = self.queues
        while not self._stopping:
            wake = next_tick
            for q in queues:
                if q.core.timer_at < wake:  # a scheduled message, a time limit, a reclaim
                    wake = q.core.timer_at
            timeout = wake - time.time()
            events = poll(max(0, int(timeout * 1000) + 1)) if timeout > 0 else poll(0)
            now = time.time()
            for sock, _ in events:
                ready = by_sock.get(sock)
                if ready is not None:
                    ready.read_batch(now)
                    if ready.acks_pending:
                        ready.send_acks()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + tick_every
            else:
                for q in queues:
                    if q.core.timer_at <= now:
                        self._timers(q, now)

    def close(self) -> None:
        for q in self.queues:
            q.close()
        self.queues = []
        for p in self._context_plugins:
            p.stop_context()
        self._context_plugins = []
        if self._own_ctx:
            self.ctx.term()
        if self.journal is not None:
            self.journal.close()  # if no queue got to use it (a failed start); else a no-op
            self.journal = None
