"""How sqm and its workers notice a dead peer cheaply, keeping SPEC's liveness contract.

SPEC: workers heartbeat every interval (default 1 s, also while a callback
runs) and sqm drops a worker silent for 3 intervals. So every worker beats
every interval, idle or busy; what this module's *watched* connections save
is the rest of the old exchange. sqm sends a watched worker no heartbeats
(a killed broker closes the worker's connection at once, and TCP keepalive
closes one whose host or cable went away: libzmq then reconnects and the
worker says HELLO again), and the worker's self-report rides on a beat only
every :data:`REPORT_EVERY` intervals (every beat while a callback runs): the
other beats are bare ``[SQM1, H, worker-id]``, which sqm handles with no
parse. sqm watches its side too (:mod:`sqm.broker.watch`): a closed worker
connection *detaches* the worker (no new work; what it holds stays in flight
until it says HELLO again or is silent / not back for 3 intervals), since a
live worker whose connection dropped briefly must not have its work run
twice. ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``) would cost the broker 1-3 % of
a core per 1,000 connections in libzmq (a timer per connection, cancelled
by a linear scan), and prove nothing about the worker's Python.

What a beat costs sqm is mostly waking up for it, so workers beat on a few
fixed phases of the interval (worker.links.BEAT_PHASES) and sqm reads the
beats in batches.
"""

from __future__ import annotations

import zmq

from .core.workers import REPORT_EVERY as _REPORT_EVERY

#: An idle watched worker attaches its self-report to every this many beats
#: (defined with the core, which tells the worker: sqm.core.workers).
REPORT_EVERY = _REPORT_EVERY


def keepalive_options(heartbeat: float, liveness: int) -> dict[int, int]:
    """Socket options that make the kernel close a tcp connection silent for ``liveness`` beats.

    Keepalive probes a connection that has received nothing for
    ``liveness - 1`` intervals, then every interval; TCP_MAXRT
    (``TCP_USER_TIMEOUT``) closes it once nothing has come back for
    ``liveness`` intervals, also while data waits for an ACK (when keepalive
    pauses, e.g. a dispatch sent to a host whose cable was pulled). A
    healthy idle connection thus costs each end a probe and its ACK every
    ``liveness - 1`` intervals, in the kernel. The kernel counts whole
    seconds here: an interval below 1 s counts as 1 s. Ignored on other
    transports (ipc: a dead peer's socket closes at once).
    """
    ivl = max(1, round(heartbeat))
    beats = max(2, liveness)
    return {
        int(zmq.TCP_KEEPALIVE): 1,
        int(zmq.TCP_KEEPALIVE_IDLE): ivl * (beats - 1),
        int(zmq.TCP_KEEPALIVE_INTVL): ivl,
        int(zmq.TCP_KEEPALIVE_CNT): beats - 1,
        int(zmq.TCP_MAXRT): ivl * beats * 1000,
    }


def keep_alive(sock: zmq.Socket, heartbeat: float, liveness: int) -> None:
    """Apply :func:`keepalive_options` (before bind or connect: they apply to new connections)."""
    for option, value in keepalive_options(heartbeat, liveness).items():
        sock.setsockopt(option, value)


def can_watch(endpoint: str, heartbeat: float) -> bool:
    """Whether sqm serving ``endpoint`` watches worker connections instead of heartbeating them.

    ipc: a dead peer's socket closes at once. tcp: keepalive counts whole
    seconds, so with a heartbeat under 1 s a pulled cable would be noticed
    later than by heartbeats: those keep heartbeating. inproc: no
    connection to watch.
    """
    if endpoint.startswith("ipc://"):
        return True
    return endpoint.startswith("tcp://") and heartbeat >= 1.0
