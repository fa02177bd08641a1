"""One worker's connection to one broker: its socket, monitor and liveness.

A worker may serve a queue from several brokers at once; each gets its own
DEALER socket (so DONE, NACK and CREDIT reach the broker they concern) and
its own idea of when that broker was last heard from.

A broker that watches the worker's connection (:mod:`sqm.liveness`) says so
in answer to HELLO and then sends no heartbeats: the link is *watched*. Its
broker is then judged by the connection (the monitor says when it closes;
TCP keepalive closes it when the broker's host goes silent), not by
silence. The heartbeat thread still beats to it every interval (sqm drops
a worker silent for 3), but attaches the self-report only every
``report_s`` and while a callback runs (:class:`ReportPlan`). A broker that
heartbeats is judged by its heartbeats, as before.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
import zlib
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from sqm.errors import AuthError
from sqm.liveness import keep_alive
from sqm.protocol import (
    BYE,
    COMPACT_DONE,
    COMPACT_DONE_FAILED,
    COMPACT_SUBMIT,
    DONE,
    DONE_FAILED,
    ERROR,
    HEARTBEAT,
    SIGNATURE,
    compact_dispatches,
    pack_ids,
)
from sqm.security.handshake import HANDSHAKE_EVENTS, NO_DETAIL_REPEATS, classify
from sqm.security.keys import KeyPair
from sqm.sockets import make_socket
from sqm.zmqfast import NOBLOCK, recv_message, send_frames


def broker_socket(ctx: zmq.Context, curve: tuple[KeyPair, bytes] | None, *,
                  routing_id: bytes | None = None, linger_ms: int = 1000) -> zmq.Socket:
    """A DEALER towards sqm: a CURVE client when ``curve`` is (own pair, server key)."""
    if curve is None:
        return make_socket(ctx, zmq.DEALER, routing_id=routing_id, linger_ms=linger_ms)
    return make_socket(ctx, zmq.DEALER, routing_id=routing_id, linger_ms=linger_ms,
                       curve_client=curve[0], server_key=curve[1])


def check_rights(ctx: zmq.Context, endpoint: str, curve: tuple[KeyPair, bytes] | None,
                 timeout: float) -> None:
    """Before serving: raise AuthError if sqm refuses our key (or our lack of one) or our role.

    One short-lived connection: the handshake must not fail (unknown key,
    wrong server key, or one end CURVE and the other not), then a bare
    HEARTBEAT (a worker's command) must not be answered ERROR AuthError (a
    sender's key); sqm answers an unknown worker's heartbeat with BYE. A
    broker not up yet (connection refused, or no answer within ``timeout``)
    is not an error: the worker waits for it as always.
    """
    plain_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(ctx.underlying)  # blocking
    sock = broker_socket(plain_ctx, curve, routing_id=b"P" + secrets.token_bytes(12), linger_ms=0)
    monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS | zmq.EVENT_CONNECT_RETRIED)
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        broken = 0  # NO_DETAIL failures in a row (once may be a broker going away)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not monitor.poll(int(left * 1000) + 1):
                return  # no broker answered yet
            event = parse_monitor_message(monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECT_RETRIED:
                if broken:
                    continue  # reconnecting after a failed handshake: see if it fails again
                return  # nobody listens yet
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                broken += 1
                if broken < NO_DETAIL_REPEATS:
                    continue
            error = classify(int(event["event"]), int(event["value"]), endpoint)
            if error is not None:
                raise error
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                break
        sock.send_multipart([SIGNATURE, HEARTBEAT])
        while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
            frames = sock.recv_multipart()
            if len(frames) >= 5 and frames[:2] == [SIGNATURE, ERROR] and frames[3] == b"AuthError":
                raise AuthError(f"sqm at {endpoint} refused this worker: "
                                f"{frames[4].decode('utf-8', 'replace')}")
            if len(frames) >= 2 and frames[0] == SIGNATURE:
                return
    finally:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(0)
        sock.close(0)


def recv_broker(sock: zmq.Socket, flags: int = NOBLOCK) -> list[bytes]:
    """One message from a broker; a compact DISPATCH comes out as the classic
    ``[SIG, D, env1, payload1, ...]`` (the rest of a worker reads that form).
    Raises zmq.Again if none waits (with NOBLOCK, or past the receive timeout)."""
    frames = recv_message(sock, flags)
    if frames[0].startswith(COMPACT_SUBMIT):
        return compact_dispatches(frames) or frames
    return frames


def done_messages(link: BrokerLink, ok: list[bytes], failed: list[bytes]) -> list[list[bytes]]:
    """The DONEs for ``ok`` and ``failed`` ids in the form ``link``'s broker reads:
    compact (one frame each), one per outcome naming every id (it batches), or
    one per id (an older sqm)."""
    if link.compact:
        out = [[COMPACT_DONE + pack_ids(ok)]] if ok else []
        if failed:
            out.append([COMPACT_DONE_FAILED + pack_ids(failed)])
        return out
    if link.batch:
        out = [[SIGNATURE, DONE, *ok]] if ok else []
        if failed:
            out.append([SIGNATURE, DONE_FAILED, *failed])
        return out
    return ([[SIGNATURE, DONE, msg_id] for msg_id in ok]
            + [[SIGNATURE, DONE_FAILED, msg_id] for msg_id in failed])


class BrokerLink:
    """The worker's side of one broker connection (not thread-safe)."""

    __slots__ = ("endpoint", "routing_id", "sock", "monitor", "last_heard", "opened_at",
                 "broker_heartbeat", "connected", "was_disconnected", "parked", "bye_sent",
                 "bye_acked", "outage", "curve", "heartbeat", "liveness", "watched",
                 "report_s", "down_at", "batch", "gives_back", "compact", "withheld",
                 "credit_step", "holding")

    def __init__(self, endpoint: str, routing_id: bytes,
                 curve: tuple[KeyPair, bytes] | None = None, *,
                 heartbeat: float = 1.0, liveness: int = 3) -> None:
        self.endpoint = endpoint
        self.routing_id = routing_id
        self.curve = curve  # (own pair, server key) towards a secured sqm
        self.heartbeat = heartbeat  # ours: TCP keepalive closes a connection silent this
        self.liveness = liveness  # many intervals (sqm.liveness)
        self.watched = False  # the broker watches this connection and sends no heartbeats
        self.report_s = 0.0  # ... and wants a self-report at least this often
        self.down_at: float | None = None  # a watched connection closed: when (monotonic)
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.last_heard = self.opened_at = time.monotonic()
        self.broker_heartbeat = 0.0  # the broker's interval (s), from its heartbeats
        self.connected = False  # a transport connection is up (from the monitor)
        self.was_disconnected = False
        self.outage = Outage()
        self.parked = 0  # slots this broker parked because we NACKed its dispatches
        # Slots it may still hold parked since our GIVE_BACK (asyncio runner): they
        # come back by CREDIT 1, 2, 4, ... as callbacks end quickly (worker.aio).
        self.withheld = 0
        self.credit_step = 1
        self.holding = 0  # its messages this worker holds (running or waiting a turn)
        self.bye_sent = False
        self.bye_acked = False
        # The broker said it batches (BATCHES, or a multi-message DISPATCH) since
        # our last HELLO: it reads multi-id DONEs (an older sqm would drop them).
        self.batch = False
        # ... and it reads GIVE_BACK (its BATCHES names it): the plain runner may
        # hand back what waits behind a long callback (worker.reclaim).
        self.gives_back = False
        # ... and it reads compact DONEs (its BATCHES names COMPACT).
        self.compact = False

    def open(self, ctx: zmq.Context) -> zmq.Socket:
        """Connect a fresh socket (a new registration: nothing is parked any more)."""
        sock = broker_socket(ctx, self.curve, routing_id=self.routing_id)
        keep_alive(sock, self.heartbeat, self.liveness)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self.sock = sock
        self.last_heard = self.opened_at = time.monotonic()
        self.connected = False
        self.was_disconnected = False
        self.watched = False
        self.down_at = None
        self.parked = self.withheld = 0
        self.batch = self.gives_back = self.compact = False
        return sock

    def close(self, linger_ms: int = 0) -> None:
        if self.sock is None:
            return
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        if self.monitor is not None:
            self.monitor.close(0)
        self.sock.close(linger=linger_ms)
        self.sock = self.monitor = None

    def send(self, frames: list[bytes]) -> bool:
        """Send without blocking; False if the message could not be queued."""
        sock = self.sock
        if sock is None:
            return False
        try:
            send_frames(sock, frames)
        except zmq.ZMQError:
            return False
        return True

    def send_bye(self) -> bool:
        """Send BYE once; False if it cannot be sent."""
        if not self.bye_sent:
            self.bye_sent = self.send([SIGNATURE, BYE])
        return self.bye_sent

    def reconnected(self) -> bool:
        """Drain monitor events; True when the connection came back after a drop."""
        back = False
        monitor = self.monitor
        while monitor is not None and monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self.was_disconnected = True
                if self.down_at is None:
                    self.down_at = time.monotonic()
            elif event == zmq.EVENT_CONNECTED:
                self.connected = True
                self.down_at = None
                if self.was_disconnected:
                    self.was_disconnected = False
                    back = True
        return back

    def reachable(self) -> bool:
        """Whether a broker is connected now: worth waiting for its answer to BYE."""
        self.reconnected()
        return self.connected

    def answered_again(self, now: float) -> tuple[float, int] | None:
        """(seconds, attempts) of an outage that just ended with the broker heard; else None."""
        if self.outage.since is None or self.last_heard <= self.opened_at:
            return None
        return self.outage.over(now)

    def silent(self, now: float, heartbeat: float, liveness: int) -> bool:
        """True when the broker has been quiet for ``liveness`` intervals.

        Never for a watched link: its broker sends nothing while idle, and
        the connection itself says when the broker is gone.
        """
        if self.watched:
            return False
        return now - self.last_heard > liveness * max(heartbeat, self.broker_heartbeat)

    def watch(self, report_s: float | None) -> None:
        """The broker watches this connection (``report_s``: report at least that often),
        or heartbeats it again (None: judge it by its heartbeats from now on)."""
        if report_s is None:
            if self.watched:
                self.watched = False
                self.last_heard = max(self.last_heard, time.monotonic())
            return
        self.watched = True
        self.report_s = report_s


#: Beats fall on this many instants per interval (by worker id), the same for
#: every worker: a broker then reads them in a few batches a second instead
#: of waking up for each one (a wake-up costs it far more than the beat).
BEAT_PHASES = 4


def beat_phase(worker_id: str, heartbeat: float) -> float:
    """Where in each interval of the wall clock this worker beats (seconds)."""
    return (zlib.crc32(worker_id.encode()) % BEAT_PHASES) * heartbeat / BEAT_PHASES


def next_beat_in(now: float, heartbeat: float, phase: float) -> float:
    """Seconds from ``now`` (wall clock) to the next beat at ``phase`` of the interval grid.

    Never less than a tenth of an interval (a late wake-up skips to the
    following one), so beats stay at most 1.1 intervals apart.
    """
    delay = (phase - now) % heartbeat
    return delay if delay >= heartbeat / 10 else delay + heartbeat


class ReportPlan:
    """Which brokers get the self-report with the beat sent now, and which read packed beats.

    Every broker gets a beat every interval; the others get it bare
    (``[SQM1, H, worker-id]``, or this worker's id in its process's packed
    beat, :mod:`worker.beats`). A heartbeated broker (the default, and any
    older sqm) gets the report every beat, as ever. A broker that watches
    the connection (:meth:`watch`) gets it at every beat while a callback
    runs, once when the worker has just gone idle, and otherwise every
    ``report_s``. The first idle report comes at a random point of the
    interval, so workers that registered together do not all report in the
    same second. The runner's thread calls :meth:`watch`, the heartbeat
    thread :meth:`due` / :meth:`due_for` and :meth:`packed`.
    """

    def __init__(self, endpoints: list[str], heartbeat: float,
                 rng: Callable[[], float] = random.random) -> None:
        self.heartbeat = heartbeat  # the thread's beat: a report is due half a beat early
        self._rng = rng
        self._lock = threading.Lock()
        self._every: dict[str, float | None] = dict.fromkeys(endpoints)  # None: every beat
        self._sent: dict[str, float] = {}  # monotonic time of the last report sent
        self._busy: dict[str, bool] = {}  # whether a callback ran at the last report sent
        self._packed: dict[str, bool] = {}  # the broker said it reads packed beats

    def watch(self, endpoint: str, report_s: float | None, now: float, *,
              packed: bool = False) -> None:
        """The broker at ``endpoint`` watches us (report at least every ``report_s``),
        or heartbeats us (None: a report every beat); ``packed``: it reads packed beats
        (its answer to our last HELLO said so)."""
        with self._lock:
            if report_s is not None and self._every.get(endpoint) is None:
                # its HELLO answer just proved us alive: the first report is due at a random
                # point of the interval (spread), then every interval
                self._sent[endpoint] = now - self._rng() * report_s
                self._busy[endpoint] = False
            self._every[endpoint] = report_s
            self._packed[endpoint] = packed

    def packed(self, endpoint: str) -> bool:
        """Whether the broker at ``endpoint`` reads ``[SQM1, H, "", packed-ids]``."""
        return self._packed.get(endpoint, False)

    def due(self, now: float, busy: bool) -> list[str]:
        """The endpoints whose beat carries the report now (noted as sent); ``busy``: a
        callback runs."""
        return [endpoint for endpoint in list(self._every) if self.due_for(endpoint, now, busy)]

    def due_for(self, endpoint: str, now: float, busy: bool) -> bool:
        """Whether the beat to ``endpoint`` carries the report now (noted as sent)."""
        with self._lock:
            if endpoint not in self._every:
                return False
            every = self._every[endpoint]
            if (every is None or busy or self._busy.get(endpoint, True)
                    or now - self._sent.get(endpoint, -1e18) >= every - self.heartbeat / 2):
                self._sent[endpoint] = now
                self._busy[endpoint] = busy
                return True
            return False


class Outage:
    """When to say a broker is unreachable: at the first failure, then at most every ``every_s``.

    A worker with no broker retries every few seconds; logging each attempt
    floods the log (two workers: 220 lines in 5 minutes), so attempts in
    between are counted and the next line says how many.
    """

    __slots__ = ("every_s", "since", "attempts", "unreported", "reported_at")

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.since: float | None = None  # monotonic time of the first failure
        self.attempts = 0
        self.unreported = 0
        self.reported_at = 0.0

    def attempt(self, now: float) -> int | None:
        """Count a reconnect attempt: None to stay quiet, 0 for the first failure,
        else how many attempts went unreported since the last report."""
        if self.since is None:
            self.since = self.reported_at = now
            self.attempts = 1
            self.unreported = 0
            return 0
        self.attempts += 1
        self.unreported += 1
        if now - self.reported_at < self.every_s:
            return None
        count, self.unreported, self.reported_at = self.unreported, 0, now
        return count

    def over(self, now: float) -> tuple[float, int] | None:
        """The broker answers again: (seconds the outage lasted, attempts), and forget it."""
        if self.since is None:
            return None
        lasted, self.since = now - self.since, None
        return lasted, self.attempts
