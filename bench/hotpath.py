"""Per-message Python cost of the worker's and the sender's hot paths, no broker.

``python -m bench.hotpath`` times, in this process, with the socket sends
stubbed out (so only our own code is measured; it stubs them module-wide, so run it in
a process of its own):

- ``worker handle``: one DISPATCH through the plain runner's handling
  (decode, ACK, callback, RESULT, DONE), the same steps in every tree;
- ``worker run``: :meth:`Execution.run` alone (trees that have it);
- ``worker handle (compact)``: the same for a compact one-message DISPATCH
  (one ``SQM1s`` frame, as sqm sends it), read as the tree reads it;
- ``sender feed``: :meth:`Correlator.feed` of an ACK and a RESULT;
- ``sender feed (compact RESULT)``: of a one-frame RESULT alone (W1's reply:
  no ACK unless asked for).

It runs against older trees too (``PYTHONPATH=/tmp/base``, cwd there):
where the API differs a small adapter drives the same steps.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sqm.config import QueueSettings
from sqm.protocol import ACK, DISPATCH, RESULT, SIGNATURE

COMPACT_SUBMIT = b"SQM1s"  # protocol.COMPACT_SUBMIT (older trees lack the name)

N = 50_000
ROUNDS = 9


class _Link:
    """A broker link whose socket is never written (send_frames is stubbed)."""

    sock: Any = object()
    compact = True  # its broker reads compact DONEs (trees after 1e39fe3)
    batch = True

    def send_bye(self) -> bool:
        return True


class _Pool:
    """A mailbox pool that hands out one stub socket."""

    sock = object()
    head = [b"m1"]  # a connection's routing-id frame (the old trees took it as the socket)

    def get(self, addr: bytes) -> list[bytes]:
        return self.head

    def expire(self, now: float | None = None) -> None:
        pass


def _sent(sock: Any, frames: list[bytes], flags: int = 0) -> None:
    """Stands in for zmqfast.send_frames: the sends cost the same in every tree."""


def _echo(worker: Any, orig: Any, payload: Any) -> Any:
    return payload


def _correlator() -> Any:
    from sender._correlator import Correlator

    settings = QueueSettings(queue="q", endpoint="ipc:///tmp/hotpath", rundir="/tmp")
    core = Correlator(settings, serializer="cbor", allow_pickle=False,
                      max_message_size=1 << 20)
    core.set_mailbox("ipc:///tmp/hotpath-mbox")
    return core


def _dispatches(n: int) -> tuple[Any, list[str], list[list[bytes]]]:
    """A sender's SUBMIT frames for ``n`` messages, turned into DISPATCH frames."""
    core = _correlator()
    ids, frames = [], []
    for i in range(n):
        mid, submit = core.encode_submit("echo", {"i": i, "data": "x" * 32}, oneway=False,
                                         timeout=60.0, retries=0)
        ids.append(mid)
        frames.append([SIGNATURE, DISPATCH, submit[2], submit[3]])
    return core, ids, frames


Step = Callable[[Any], Any]


def _worker_steps(beat_ms: bytes) -> tuple[Step, Any, Step | None]:
    """(handle one DISPATCH, Execution.run or None, handle one compact
    DISPATCH frame or None) for this tree."""
    try:
        from worker import execute, plain
    except ImportError:  # before the worker was split (b9fc0d6)
        from worker import core as wcore

        old: Any = wcore  # the old tree's API: typed as Any
        old.send_frames = _sent
        w: Any = old.Worker.__new__(old.Worker)
        w._callbacks = {"echo": _echo}
        w._codecs = {}
        w.allow_pickle = False
        w._pool = _Pool()
        w._busy = (0.0, 0.0)
        w.tasks_done = 0
        w._stop = threading.Event()
        w.id = "w1"
        link = _Link()
        return (lambda frames: w._handle(link, frames)), None, None
    execute.send_frames = _sent
    if hasattr(execute, "send_raw"):  # a reply's routing-id frame (trees after 2cafb6d)
        execute.send_raw = _sent  # type: ignore[assignment]
    plain.send_frames = _sent
    ex = execute.Execution(None, "w1", {"echo": _echo})
    ex.mailboxes = _Pool()  # type: ignore[assignment]
    ex.beat_ms = beat_ms
    runner = plain.PlainRunner()
    runner._execute = ex.run
    lock = getattr(runner, "_lock", None)
    if lock is not None:  # held by run() around each message (trees after the give-backs)
        lock.acquire()
    link = _Link()
    handle: Any = runner._handle
    if len(inspect.signature(handle).parameters) >= 3:  # trees with Execution.run_compact
        return ((lambda frames: handle(link, frames, ex.run)), ex.run,
                (lambda frame: handle(link, frame, ex.run_compact)))
    from sqm import protocol  # before: the frame was rebuilt as the classic frames first

    rebuild = getattr(protocol, "compact_dispatches", None)
    compact = None if rebuild is None else (lambda frame: handle(link, rebuild([frame])))
    return (lambda frames: handle(link, frames)), ex.run, compact


def _time(step: Step, batch: list[Any]) -> float:
    """Best of ROUNDS: µs per call."""
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for frames in batch:
            step(frames)
        best = min(best, time.perf_counter() - t0)
    return best / len(batch) * 1e6


def worker_figures(beat_ms: bytes = b"5000") -> dict[str, float]:
    _, _, batch = _dispatches(N)
    handle, run, compact = _worker_steps(beat_ms)
    out = {"worker handle": _time(handle, batch)}
    if run is not None:
        out["worker run"] = _time(run, batch)
    if compact is not None:
        frames = [COMPACT_SUBMIT + f[2] + f[3] for f in batch]
        out["worker handle (compact)"] = _time(compact, frames)
    return out


def sender_figures(beat: bytes | None = b"5000") -> float:
    """µs per message for feed(ACK) + feed(RESULT) (+ the outcome taken)."""
    best = float("inf")
    for _ in range(ROUNDS):
        core, ids, _ = _dispatches(N)
        ackf = []
        for mid in ids:
            core.sent[mid] = ([], None, 0)  # as the sync sender records each SUBMIT
            b = mid.encode()
            ackf.append(([SIGNATURE, ACK, b, beat] if beat else [SIGNATURE, ACK, b],
                         [SIGNATURE, RESULT, b, b"\xa0"]))
        feed, take = core.feed, core.take
        t0 = time.perf_counter()
        for ack, res in ackf:
            feed(ack, False)
            take(feed(res, False))
        best = min(best, time.perf_counter() - t0)
    return best / N * 1e6


def sender_compact_figures() -> float | None:
    """µs per message for feed(compact RESULT) + the outcome taken (None: no compact replies)."""
    from sqm import protocol

    pack = getattr(protocol, "compact_result", None)
    if pack is None:
        return None
    best = float("inf")
    for _ in range(ROUNDS):
        core, ids, _ = _dispatches(N)
        replies = [[pack(mid.encode(), b"\xa0")] for mid in ids]
        feed, take = core.feed, core.take
        t0 = time.perf_counter()
        for res in replies:
            take(feed(res, False))
        best = min(best, time.perf_counter() - t0)
    return best / N * 1e6


def main(argv: list[str] | None = None) -> None:
    global N, ROUNDS
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=N, help=f"messages per round [{N}]")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds, best kept [{ROUNDS}]")
    args = ap.parse_args(argv)
    N, ROUNDS = args.n, args.rounds
    figures = worker_figures()
    figures["sender feed (4-frame ACK)"] = sender_figures()
    figures["sender feed (3-frame ACK)"] = sender_figures(None)
    compact = sender_compact_figures()
    if compact is not None:
        figures["sender feed (compact RESULT)"] = compact
    print(f"python {sys.version.split()[0]}, {N} messages, best of {ROUNDS}")
    for name, us in figures.items():
        print(f"  {name:28s} {us:6.2f} µs/msg")


if __name__ == "__main__":
    main()
