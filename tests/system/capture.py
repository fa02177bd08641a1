"""A packet capture on the loopback interface, to prove what crosses it in clear text.

Tests run as root, so a raw ``AF_PACKET`` socket bound to ``lo`` sees every
frame on it (each loopback packet shows up as it leaves and as it arrives).
The socket is bound before the ``with`` block starts, so nothing sent inside
the block is missed; a background thread drains it into memory, and on exit
everything still queued is read before :meth:`LoopbackCapture.contains` is
asked anything.

    with LoopbackCapture() as cap:
        ...  # traffic
    assert not cap.contains(b"secret marker")

Markers should be short and sent in one write: loopback's 64 KiB MTU keeps
them in one segment, and segments are searched after being joined.
"""

from __future__ import annotations

import select
import socket
import threading
from types import TracebackType

ETH_P_ALL = 0x0003
_RCVBUF = 32 * 1024 * 1024
_MAX_PACKET = 65536 + 64


class LoopbackCapture:
    """Record the bytes of every packet on ``iface`` while the block runs."""

    def __init__(self, iface: str = "lo", max_bytes: int = 256 * 1024 * 1024) -> None:
        self.iface = iface
        self.max_bytes = max_bytes
        self.packets = 0
        self.truncated = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._data: bytes | None = None
        self._raw: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> LoopbackCapture:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        raw.bind((self.iface, 0))
        raw.setblocking(False)
        self._raw = raw
        self._thread = threading.Thread(target=self._run, name="loopback-capture", daemon=True)
        self._thread.start()
        return self

    def _keep(self, packet: bytes) -> None:
        self.packets += 1
        if self._size + len(packet) > self.max_bytes:
            self.truncated = True
            return
        self._chunks.append(packet)
        self._size += len(packet)

    def _drain(self) -> None:
        assert self._raw is not None
        while True:
            try:
                packet = self._raw.recv(_MAX_PACKET)
            except BlockingIOError:
                return
            self._keep(packet)

    def _run(self) -> None:
        assert self._raw is not None
        try:
            while True:
                ready, _, _ = select.select([self._raw, self._wake_r], [], [])
                if self._raw in ready:
                    self._drain()
                if self._wake_r in ready:
                    self._drain()  # whatever the block sent before it ended
                    return
        except BaseException as exc:  # reported by __exit__, not lost in the thread
            self._error = exc

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._wake_w.send(b"x")
        assert self._thread is not None and self._raw is not None
        self._thread.join(timeout=30)
        self._raw.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._thread.is_alive():
            raise RuntimeError("the capture thread did not stop")
        if self._error is not None:
            raise RuntimeError(f"the capture failed: {self._error!r}") from self._error
        self._data = b"".join(self._chunks)
        self._chunks = []

    @property
    def data(self) -> bytes:
        """Every captured byte (after the block ended)."""
        if self._data is None:
            raise RuntimeError("the capture is still running: ask after the with block")
        return self._data

    def contains(self, marker: bytes) -> bool:
        """True when ``marker`` crossed the interface in clear text during the block."""
        if self.truncated:
            raise RuntimeError("the capture hit max_bytes: a missing marker would prove nothing")
        return marker in self.data
