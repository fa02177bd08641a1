"""How sqm and its workers notice a dead peer without a message per worker per second.

A heartbeat message per worker per interval, each way, costs sqm Python
time for every worker it serves (with 1,000 idle workers, 2,000 messages a
second: 5-6 % of a core). Most of what they prove is proved for free by the
connection: a killed process closes its sockets at once (the kernel sends
FIN or RST), and the kernel's TCP keepalive notices a host or cable that
went away. ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``) would do the same in
libzmq, but cost the broker 1-3 % of a core per 1,000 connections (a timer
per connection, cancelled by a linear scan), which is most of the budget.

So a worker connection is *watched*: sqm learns that it closed from its
socket monitor (:mod:`sqm.broker.watch`) and the worker learns the same of
sqm from its own. What needs Python still goes as HEARTBEAT frames: the
worker's self-report, every heartbeat while it runs a callback (a worker
stuck while it holds messages is dropped after ``liveness`` silent
heartbeats, as before), once when it goes idle, and every
:data:`REPORT_EVERY` heartbeats while idle.
"""

from __future__ import annotations

import zmq

#: An idle watched worker sends its self-report every this many heartbeats;
#: sqm drops it after ``liveness`` such intervals without one (a hung process).
#: Each report costs sqm a wake-up of its loop (~150 µs of CPU on the project's
#: loaded 2-core VM): at 30, 1,000 idle workers cost it about 0.5 % of a core.
REPORT_EVERY = 30.0


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
