"""The public Worker: settings, callbacks, the reply API, and one run at a time.

How messages are taken and run is a runner's job (:mod:`worker.plain`: one
broker, one callback at a time, the fastest path; :mod:`worker.aio`: several
brokers, ``concurrency`` > 1, ``async def`` callbacks), and what a message
means is :mod:`worker.execute`'s. The Worker picks a runner and hands it a
:class:`~worker.session.Session`; heartbeats go out from the process's heartbeat
thread (:mod:`worker.beats`), one message per interval and broker for all the
process's Workers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from sqm import procinfo, protocol
from sqm.config import client_key_paths, resolve
from sqm.errors import HopLimitExceeded, SQMError
from sqm.protocol import ACK, DEFAULT_PREFETCH, FLAG_ACK, SIGNATURE, MailboxPolicy
from sqm.security.keys import client_keys
from sqm.taskpool.fleet import Limits, recycle_due

from . import beats, selfreport
from .aio import AsyncRunner
from .execute import Execution, Originator, Workload, is_async_callback
from .followup import DEFAULT_MAX_HOPS, FollowUps
from .links import ReportPlan, check_rights
from .mailboxes import MailboxPool
from .plain import PlainRunner
from .retry import DEFAULT_BACKOFF, DEFAULT_MAX_RETRIES, RetryPolicy
from .session import CountingWorkload, Runner, Session
from .watchdog import Watchdog

__all__ = ["Callback", "HopLimitExceeded", "Originator", "Worker", "is_async_callback"]

log = logging.getLogger("sqm.worker")

Callback = Callable[["Worker", Originator, Any], Any]
_counter = itertools.count(1)



class Worker:
    """Serve a queue with callbacks ``fn(worker, originator, payload)``.

    ``context`` lets many Workers in one process share one ZeroMQ context
    (one I/O thread) instead of each creating its own. Each Worker uses 4
    sockets per broker plus one for the replies (one connection per sender
    it replies to, at most ``max_mailboxes``, each a file descriptor: the
    soft limit on open files is raised to the hard limit at start): raise
    the context's ``max_sockets`` (default 1023) when sharing it among many
    Workers.

    ``concurrency`` is how many callbacks run at once: ``async def``
    callbacks as tasks on an asyncio event loop inside the worker, plain
    ones in a pool of that many threads. ``prefetch`` is how many messages
    sqm may hand this worker at once (its slots, at least ``concurrency``);
    the ones beyond ``concurrency`` wait here for a turn. Prefetch raises
    throughput at the cost of head-of-line blocking: a message may wait
    behind a slow one on this worker while another worker is idle.

    ``endpoint`` may name several brokers (a list, or a comma-separated
    string): the worker registers with each and takes work from any, never
    holding more than its slots; a dispatch that finds it full goes back to
    its broker at once (NACK) for another worker to take.

    The callback's return value is the reply unless it called
    :meth:`respond` itself; an exception becomes a ``RemoteError`` at the
    sender and the worker carries on. Heartbeats go out from a background
    thread (one per process, for all its Workers: :mod:`worker.beats`), so a
    long callback does not look like a dead worker, and carry a self-report
    (memory, nice, busy time) that ``sqm status`` shows. If sqm restarts,
    the worker registers again by itself. When sqm sends STOP (``sqm
    stop-worker``) it leaves like :meth:`terminate` and sets
    ``stop_requested``.

    ``max_tasks``/``max_memory_mb``: after a message that brings it to
    ``max_tasks`` messages, or leaves it past ``max_memory_mb`` MB resident,
    the worker leaves like :meth:`terminate` and sets ``recycled`` (its
    fleet starts another: ``sqm worker --max-tasks-per-child``).
    ``max_retries`` (default 3): how many times a message may be run again
    after its callback raised :class:`~worker.retry.Retry` (which may name its
    own limit); ``retry_on``: exception classes retried the same way, the
    n-th retry after ``min(max_s, initial_s * 2**(n-1))`` seconds less a
    random jitter of at most half of it (``backoff=(initial_s, max_s)``).
    Then the caller gets ``RemoteError(type="RetriesExhausted")``.
    ``time_limit``: seconds a callback may run (the message's own
    ``time_limit`` applies when smaller); sqm then fails it with
    ``TimeLimitExceeded``. This process cannot stop the callback: its answer
    is dropped and the slot stays busy until it returns (``sqm worker
    --processes`` children end themselves instead and are replaced).
    ``autostart``: before serving, start ``sqm serve QUEUE`` as a task of
    ``<rundir>/pool`` if no broker answers on a local endpoint (see
    :func:`sqm.taskpool.autostart.autostart_broker`).
    """

    def __init__(
        self,
        queue: str | None = None,
        *,
        callbacks: Mapping[str, Callback] | None = None,
        endpoint: str | list[str] | tuple[str, ...] | None = None,
        config: str | dict[str, Any] | None = None,
        heartbeat: float | None = None,
        allow_pickle: bool = False,
        max_mailboxes: int = 4096,
        mailbox_idle_s: float = 60.0,
        prefetch: int = DEFAULT_PREFETCH,
        concurrency: int = 1,
        context: zmq.Context | None = None,
        autostart: bool = False,
        max_tasks: int | None = None,
        max_memory_mb: float | None = None,
        secret_key: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
        max_hops: int = DEFAULT_MAX_HOPS,
        followup_timeout: float | None = 30.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_on: tuple[type[BaseException], ...] = (),
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        time_limit: float | None = None,
    ) -> None:
        self.settings = resolve(queue, endpoint=endpoint, config=config)
        #: (own pair, server key) for a secured sqm (kwargs, env, config); None: plain.
        self._curve = client_keys(*client_key_paths(self.settings, secret_key, server_key))
        self.autostart = autostart
        self._config_file = config if isinstance(config, str) else None
        self.limits = Limits(max_tasks=max_tasks, max_memory_mb=max_memory_mb)
        self.recycled = False  # it left because it reached max_tasks/max_memory_mb
        self.queue = self.settings.queue
        self.endpoints = self.settings.endpoints
        self.endpoint = self.settings.endpoint
        self.heartbeat = float(heartbeat or self.settings.get("heartbeat", 1.0))
        self.liveness = 3
        self.allow_pickle = allow_pickle
        for name, value in (("prefetch", prefetch), ("concurrency", concurrency)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000:
                raise ValueError(f"{name} must be an int between 1 and 10000")
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.slots = max(prefetch, concurrency)  # what sqm may hand us at once
        self._shared_ctx = context  # many Workers in one process may share one
        self.max_mailboxes = max_mailboxes
        self.mailbox_idle_s = mailbox_idle_s
        self._callbacks: dict[str, Callback] = {}
        if callbacks:
            self.callbacks(**dict(callbacks))
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.id = f"{self.host}:{self.pid}:{next(_counter)}:{secrets.token_hex(2)}"
        self._rid = b"W" + self.id.encode()
        if self._curve is not None:  # secured: a routing id nobody can guess or read in status
            self._rid = b"W" + secrets.token_bytes(16)
        self.started_at = time.time()
        self._workload = (CountingWorkload(self._after_message)
                          if max_tasks or max_memory_mb else Workload())
        self._execution = Execution(self, self.id, self._callbacks, allow_pickle=allow_pickle)
        self._execution.retry_policy = RetryPolicy(max_retries, tuple(retry_on), backoff)
        self.max_retries, self.retry_on, self.backoff = max_retries, tuple(retry_on), backoff
        if time_limit is not None and not 0 < time_limit < 1e9:
            raise ValueError("time_limit must be positive")
        self.time_limit = self._execution.time_limit = float(time_limit or 0.0)
        #: End this process when a callback runs past its time limit (set for
        #: ``sqm worker`` fleet children, whose supervisor starts a fresh one).
        self.exit_on_time_limit = False
        self._followups = self._execution.followups = FollowUps(
            self.settings, config=config, allow_pickle=allow_pickle,
            timeout=followup_timeout, max_hops=max_hops)
        self.stop_requested = False  # sqm asked this worker to stop (STOP)
        self._stop = threading.Event()
        self._runner: Runner | None = None
        self._member: beats.Member | None = None  # as the heartbeat thread sees it, while running
        self._running = False

    # ------------------------------------------------------------ public API

    def callbacks(self, **fns: Callback | None) -> Worker:
        """Add or replace callbacks by method name (``name=None`` removes one).

        The methods served are advertised to sqm, which dispatches only
        those to this worker; a change while running is told at once
        (within half a heartbeat).
        """
        for name, fn in fns.items():
            if fn is not None and not callable(fn):
                raise TypeError(f"callback for {name!r} is not callable")
        for name, fn in fns.items():
            if fn is None:
                self._callbacks.pop(name, None)
            else:
                self._callbacks[name] = fn
        execution = getattr(self, "_execution", None)
        if execution is not None:
            execution.abilities += 1
        return self

    # ------------------------------------------------------------ follow-up work

    def submit(self, method: str, payload: Any = None, **kw: Any) -> Any:
        """From a callback: submit a message as a Sender would; returns its id.

        Goes over this worker's own broker connection; ``queue=`` names
        another queue of the same sqm. Takes Sender.submit's keywords
        (``oneway``, ``timeout``, ``retries``, ``priority``, ``ttl``). In an
        ``async def`` callback, await it.
        """
        if _on_event_loop():
            return _now(self._followups.submit(method, payload, **kw))
        return self._followups.submit(method, payload, **kw)

    def receive(self, timeout: float | None = None, id: str | None = None) -> Any:  # noqa: A002
        """From a callback: the reply to follow-up message ``id``, or to any of them.

        Raises the error it carries (``RemoteError``, ``Timeout``...). The
        worker keeps heartbeating meanwhile. In an ``async def`` callback, await it.
        """
        if _on_event_loop():
            return self._followups.in_thread(self._followups.receive, timeout, id)
        return self._followups.receive(timeout, id)

    def rpc(self, method: str, payload: Any = None, **kw: Any) -> Any:
        """From a callback: submit and wait for the reply (``submit`` + ``receive``).

        The wait is bounded (``timeout=``, else the worker's
        ``followup_timeout``): see docs/GUARANTEES.md on a queue whose every
        worker waits on itself. In an ``async def`` callback, await it.
        """
        if _on_event_loop():
            return self._followups.in_thread(self._followups.rpc, method, payload, **kw)
        return self._followups.rpc(method, payload, **kw)

    def forward(self, originator: Originator, method: str, payload: Any = None) -> None:
        """Hand the message on to ``method``: whoever ends the chain replies to the caller.

        The message keeps its id, caller, deadline and retries; ``started``
        and progress keep reaching the caller. This callback must not
        answer it any more. Raises HopLimitExceeded past ``max_hops``
        forwards (a loop): the caller then gets that error.
        """
        self._execution.forward(originator, method, payload)

    def respond(self, originator: Originator, value: Any) -> None:
        """Send ``value`` as the reply to ``originator`` (at most once per message)."""
        self._execution.respond(originator, value)

    def progress(self, originator: Originator, done: int, total: int) -> None:
        """Tell the originator how far along its message is (Gearman's WORK_STATUS).

        Goes straight to the sender's mailbox, in order with the reply; the
        Sender reports it as ``on_status(done, total)``. Nothing is sent for
        oneway messages or once the message was answered.
        """
        self._execution.progress(originator, done, total)

    def terminate(self) -> None:
        """Finish the message in hand, tell sqm we are gone, and make run() return."""
        self._stop.set()
        runner = self._runner
        if runner is not None:
            runner.stop()

    @property
    def tasks_done(self) -> int:
        """Messages this worker has run (answered or failed)."""
        return self._workload.tasks_done

    @property
    def busy_s(self) -> float:
        """Seconds spent with a callback running, the current one included."""
        return self._workload.busy_s

    # ------------------------------------------------------------ run

    def run(self) -> None:
        """Serve until terminate(), SIGTERM, SIGINT or sqm's STOP."""
        if self._running:
            raise SQMError("this Worker is already running")
        if self.autostart:
            self._start_brokers()
        self._running = True
        self._stop.clear()
        self.stop_requested = False
        self._execution.allow_pickle = self.allow_pickle
        self._execution.beat_ms = b"%d" % max(1, int(self.heartbeat * 1000))
        self._reports = ReportPlan(list(self.endpoints), self.heartbeat)
        runner: Runner = AsyncRunner() if self._needs_loop() else PlainRunner()
        self._runner = runner
        restore = self._install_signals()
        ctx = self._shared_ctx or zmq.Context()
        pool = self._pool = MailboxPool(
            ctx,
            MailboxPolicy.for_settings(self.settings),
            max_open=self.max_mailboxes,
            idle_s=self.mailbox_idle_s,
            keys=None if self._curve is None else self._curve[0],
        )
        member = self._beat_member(ctx)
        member.reclaim = runner.reclaim  # sqm's reclaim asks reach the runner this way
        self._member = member
        beating = False
        if self.exit_on_time_limit:  # a fleet child: a stuck callback ends the process
            self._execution.watchdog = Watchdog(self.id)
            self._execution.watchdog.start()
        try:
            # AuthError now (refused key, no key for a secured sqm, sender's key), not silence
            # as long for a plain worker: a busy host may take over 0.5 s to report the
            # mismatch, and a worker that starts serving past it waits silently for ever.
            # An answer (or nobody listening) ends the check at once, so this costs nothing.
            wait = max(2.0, self.heartbeat)
            for endpoint in self.endpoints:
                check_rights(ctx, endpoint, self._curve, timeout=wait)
            beats.beater().register(member)
            beating = True
            runner.run(self._session(ctx, pool))
        finally:
            self._stop.set()
            if self._execution.watchdog is not None:
                self._execution.watchdog.stop()
                self._execution.watchdog = None
            if beating:  # (a refused key stops run() before)
                beats.beater().unregister(member, timeout=self.heartbeat * 2)
            pool.close()
            self._pool = None
            if self._shared_ctx is None:
                ctx.term()
            restore()
            self._runner = None
            self._member = None
            self._running = False
            log.info("worker %s stopped after %d task(s)", self.id, self.tasks_done)

    def _needs_loop(self) -> bool:
        """The asyncio runner is needed for several brokers, concurrency or async callbacks."""
        return (len(self.endpoints) > 1 or self.concurrency > 1
                or any(is_async_callback(fn) for fn in self._callbacks.values()))

    def _session(self, ctx: zmq.Context, pool: MailboxPool) -> Session:
        """What the runner may use of this worker for one run."""
        return Session(
            worker_id=self.id,
            queue=self.queue,
            endpoints=list(self.endpoints),
            routing_id=self._rid,
            heartbeat=self.heartbeat,
            liveness=self.liveness,
            slots=self.slots,
            concurrency=self.concurrency,
            ctx=ctx,
            execution=self._execution,
            mailboxes=pool,
            workload=self._workload,
            info={
                "id": self.id,
                "host": self.host,
                "pid": self.pid,
                "started_at": self.started_at,
                "slots": self.slots,
                "concurrency": self.concurrency,
                "heartbeat": self.heartbeat,
                "version": protocol.SIGNATURE.decode(),
                **({"time_limit": self.time_limit} if self.time_limit else {}),
            },
            on_stop_request=self._stop_requested_by_sqm,
            stop=self._stop,
            curve=self._curve,
            followups=self._followups,
            reports=self._reports,
            beat_id=self._beat_id,
        )

    def _beat_id(self, endpoint: str) -> bytes | None:
        member = self._member
        return None if member is None else beats.beater().beat_id(member, endpoint)

    def _start_brokers(self) -> None:
        """autostart: an sqm for this queue on each local endpoint where none answers."""
        from sqm.taskpool.autostart import autostart_broker, is_local

        for endpoint in self.endpoints:
            if is_local(endpoint):
                autostart_broker(self.queue, endpoint, config=self._config_file)

    def _after_message(self, tasks_done: int) -> None:
        """With limits: leave (finishing nothing more) once they are reached."""
        rss = procinfo.rss_bytes() if self.limits.max_memory_mb else None
        if not self.recycled and recycle_due(tasks_done, rss, self.limits):
            log.info("worker %s: recycled after %d task(s) (%.0f MB resident)", self.id,
                     tasks_done, (rss or procinfo.rss_bytes()) / 1048576)
            self.recycled = True
            self.terminate()

    def _stop_requested_by_sqm(self) -> None:
        self.stop_requested = True
        self.terminate()

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, lambda *_: self.terminate())

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore

    # The mailbox pool lives in the execution, which sends the replies.
    @property
    def _pool(self) -> MailboxPool | None:
        return self._execution.mailboxes

    @_pool.setter
    def _pool(self, pool: MailboxPool | None) -> None:
        self._execution.mailboxes = pool

    def _to_mailbox(self, orig: Originator, frames: list[bytes]) -> None:
        """Send to a sender's mailbox from the thread that owns the sockets."""
        self._execution.deliver(orig, frames)

    # ------------------------------------------------------------ heartbeats

    def _beat_member(self, ctx: zmq.Context) -> beats.Member:
        """This worker as the process's heartbeat thread sees it for one run."""
        def new_acks() -> MailboxPool:
            # Its own connections to mailboxes: the runner's belong to another thread.
            return MailboxPool(ctx, MailboxPolicy.for_settings(self.settings), max_open=16,
                               idle_s=10 * self.heartbeat, linger_ms=0,
                               keys=None if self._curve is None else self._curve[0])

        return beats.Member(self.id, ctx, list(self.endpoints), self.heartbeat, self._curve,
                            self._reports, self._execution.running,
                            lambda: selfreport.encode(self), self._ack_again, new_acks)

    def _ack_again(self, acks: MailboxPool, running: dict[bytes, Originator],
                   before: set[bytes]) -> set[bytes]:
        """Send ACK ("working") for each message running now, except one that
        started since the last beat with its ACK sent at the start (FLAG_ACK).

        Without FLAG_ACK this is the message's first ACK: a caller learns of a
        start within one beat, not at once. Its caller watches these when the
        broker that dispatched it is gone: silence for 3 beats then means the
        worker died too (WorkerLost). Returns the ids running now, for the next beat.
        """
        beat = self._execution.beat_ms
        now = set(running)
        for msg_id in now:
            orig = running.get(msg_id)
            if orig is None:
                continue  # answered meanwhile
            env = orig.env
            if msg_id not in before and env is not None and env.flags & FLAG_ACK:
                continue  # acknowledged at its start, a moment ago
            try:
                acks.send(orig.mailbox, [SIGNATURE, ACK, msg_id, beat])
            except (ValueError, zmq.ZMQError):
                pass  # refused, unreachable or not keeping up: the next beat tries again
        acks.expire(time.monotonic())
        return now


def _on_event_loop() -> bool:
    """True in the thread running an event loop (an ``async def`` callback's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _now(value: Any) -> Any:
    """An awaitable of a value already computed (``await worker.submit(...)``)."""
    return value
