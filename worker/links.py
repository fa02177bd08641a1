"""One worker's connection to one broker: its socket, monitor and liveness.

A worker may serve a queue from several brokers at once; each gets its own
DEALER socket (so DONE, NACK and CREDIT reach the broker they concern) and
its own idea of when that broker was last heard from.
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from sqm.protocol import BYE, SIGNATURE
from sqm.sockets import make_socket
from sqm.zmqfast import send_frames


class BrokerLink:
    """The worker's side of one broker connection (not thread-safe)."""

    __slots__ = ("endpoint", "routing_id", "sock", "monitor", "last_heard", "broker_heartbeat",
                 "was_disconnected", "parked", "bye_sent", "bye_acked")

    def __init__(self, endpoint: str, routing_id: bytes) -> None:
        self.endpoint = endpoint
        self.routing_id = routing_id
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.last_heard = time.monotonic()
        self.broker_heartbeat = 0.0  # the broker's interval (s), from its heartbeats
        self.was_disconnected = False
        self.parked = 0  # slots this broker parked because we NACKed its dispatches
        self.bye_sent = False
        self.bye_acked = False

    def open(self, ctx: zmq.Context) -> zmq.Socket:
        """Connect a fresh socket (a new registration: nothing is parked any more)."""
        sock = make_socket(ctx, zmq.DEALER, routing_id=self.routing_id)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self.sock = sock
        self.last_heard = time.monotonic()
        self.was_disconnected = False
        self.parked = 0
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
        try:
            send_frames(self.sock, frames)
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
                self.was_disconnected = True
            elif event == zmq.EVENT_CONNECTED and self.was_disconnected:
                self.was_disconnected = False
                back = True
        return back

    def silent(self, now: float, heartbeat: float, liveness: int) -> bool:
        """True when the broker has been quiet for ``liveness`` intervals."""
        return now - self.last_heard > liveness * max(heartbeat, self.broker_heartbeat)
