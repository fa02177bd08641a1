"""Baseline: a minimal raw-pyzmq load-balancing broker with direct replies.

Same topology as sqm, no features (no heartbeats, retries, metrics, logging):

* broker: one ROUTER socket, for senders and workers alike;
* worker: DEALER to the broker, sends ``READY`` once per credit (1, or
  ``prefetch`` for the throughput variants) and again after each reply; the
  broker hands the oldest pending request to the longest-idle credit;
* sender: DEALER to the broker for requests ``[mailbox, body]``, and a PULL
  socket bound on its own ipc mailbox; the worker replies straight to that
  mailbox through a cached PUSH socket, then sends ``READY`` again.

Frames on the broker's ROUTER::

    worker -> broker   [worker-id, b"R"]
    sender -> broker   [sender-id, mailbox, body]
    broker -> worker   [worker-id, mailbox, body]
    anyone -> broker   [peer-id, b"S"]           (status query, orchestrator only)
    broker -> anyone   [peer-id, b"S", json]     {"credits": idle credits, "pending": n}

Bodies are cbor2; the broker never decodes them. The broker blocks in one
``recv`` (with a receive timeout, to notice SIGTERM) and then drains its socket
with ``NOBLOCK`` so one wake-up handles a whole batch; the sender polls its
mailbox and drains it the same way. A worker handles one request at a time,
so it simply blocks in ``recv``; with several credits the extra requests wait
in its DEALER's queue. Baseline workers have no heartbeats. (A blocking ``recv`` with ``RCVTIMEO`` equals ``poll`` +
``recv`` minus one system call per message.)
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import deque
from typing import Any

import cbor2
import zmq

from bench.common import (
    W9_WARMUP_EACH,
    BenchError,
    CpuMeter,
    ManyLane,
    Tally,
    backlog_result,
    ipc_endpoint,
    many_child,
    payload,
    pipelined_result,
    rpc_result,
    run_many,
    run_sender_process,
    w9_index,
    warm_done,
    work,
    write_json_atomic,
)

READY = b"R"
STATUS = b"S"
_POLL_MS = 200
#: Receive timeout of worker threads when a process hosts many of them (they
#: only wake up to check the stop flag; 1000 threads at 200 ms would cost CPU).
_MANY_POLL_MS = 1000


class _Stop:
    """Stop flag set from a SIGTERM handler."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        """Turn SIGTERM into a stop request; ignore SIGINT (the parent handles it)."""
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def broker_main(endpoint: str) -> None:
    """Run the baseline broker on ``endpoint`` until SIGTERM."""
    stop = _Stop()
    stop.install()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = _POLL_MS
    router.bind(endpoint)
    idle: deque[bytes] = deque()
    pending: deque[tuple[bytes, bytes]] = deque()
    recv = router.recv_multipart
    send = router.send_multipart
    noblock = zmq.NOBLOCK
    try:
        while not stop.event.is_set():
            try:
                frames = recv()  # blocks up to _POLL_MS, then re-checks the stop flag
            except zmq.Again:
                continue
            while True:  # handle this message, then drain everything queued
                if len(frames) == 2:  # [worker, READY] or [peer, STATUS]
                    if frames[1] == READY:
                        if pending:
                            mailbox, body = pending.popleft()
                            send([frames[0], mailbox, body])
                        else:
                            idle.append(frames[0])
                    else:
                        st = {"credits": len(idle), "pending": len(pending)}
                        send([frames[0], STATUS, json.dumps(st).encode()])
                elif len(frames) == 3:  # [sender, mailbox, body]
                    if idle:
                        send([idle.popleft(), frames[1], frames[2]])
                    else:
                        pending.append((frames[1], frames[2]))
                try:
                    frames = recv(noblock)
                except zmq.Again:
                    break
    finally:
        router.close()
        ctx.term()


def query_status(endpoint: str, timeout: float) -> dict[str, int]:
    """Ask the baseline broker for ``{"credits": idle credits, "pending": n}``."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send(STATUS)
        if not sock.poll(int(timeout * 1000)):
            raise BenchError(f"baseline broker did not answer a status query within {timeout}s")
        frames = sock.recv_multipart()
        result: dict[str, int] = json.loads(frames[1])
        return result
    finally:
        sock.close()


def _worker_loop(
    ctx: zmq.Context,
    endpoint: str,
    wid: str,
    counts: dict[str, int],
    stop: threading.Event,
    credits: int = 1,
    poll_ms: int = _POLL_MS,
) -> None:
    """One baseline worker: take a request, reply to its mailbox, send READY."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = poll_ms
    dealer.connect(endpoint)
    pushes: dict[bytes, zmq.Socket] = {}
    dumps, loads = cbor2.dumps, cbor2.loads
    try:
        for _ in range(credits):
            dealer.send(READY)
        while not stop.is_set():
            try:
                mailbox, body = dealer.recv_multipart()
            except zmq.Again:  # receive timeout: re-check the stop flag
                continue
            reply = dumps(work(loads(body), wid, counts))
            push = pushes.get(mailbox)
            if push is None:
                push = ctx.socket(zmq.PUSH)
                push.linger = 1000
                push.connect(mailbox.decode())
                pushes[mailbox] = push
            push.send(reply)
            dealer.send(READY)
    finally:
        for push in pushes.values():
            push.close()
        dealer.close()


def worker_host(
    queue: str, endpoint: str, nthreads: int, counts_path: str, prefetch: int = 1
) -> None:
    """Run ``nthreads`` baseline workers with ``prefetch`` credits each until SIGTERM.

    Writes ``{worker-id: {"measured": n, "warmup": n}}`` to ``counts_path``
    on the way out. ``queue`` is unused (one broker serves one queue).
    """
    del queue
    prefetch = prefetch or 1  # 0: "the system's default", for the baseline credit 1
    stop = _Stop()
    stop.install()
    ctx = zmq.Context()
    ctx.max_sockets = max(1024, 4 * nthreads + 64)
    poll_ms = _POLL_MS if nthreads <= 32 else _MANY_POLL_MS
    counters = {f"{os.getpid()}-{t}": {"measured": 0, "warmup": 0} for t in range(nthreads)}
    try:
        if nthreads == 1:
            ((wid, c),) = counters.items()
            _worker_loop(ctx, endpoint, wid, c, stop.event, prefetch, poll_ms)
        else:
            threads = [
                threading.Thread(
                    target=_worker_loop,
                    args=(ctx, endpoint, wid, c, stop.event, prefetch, poll_ms),
                    daemon=True,
                )
                for wid, c in counters.items()
            ]
            for t in threads:
                t.start()
            stop.event.wait()
            deadline = time.monotonic() + 5 + poll_ms / 1000
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            if any(t.is_alive() for t in threads):
                raise BenchError("baseline worker thread did not stop")
    finally:
        write_json_atomic(counts_path, counters)
    ctx.term()


class _Client:
    """The baseline sender: DEALER to the broker, PULL on its own mailbox.

    W9's many clients in one process share that process's ``ctx`` and name
    their mailboxes apart (``name``).
    """

    def __init__(
        self, endpoint: str, tmp: str, timeout_ms: int,
        ctx: zmq.Context | None = None, name: str | None = None,
    ) -> None:
        self.own_ctx = ctx is None
        self.ctx = zmq.Context() if ctx is None else ctx
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(endpoint)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.linger = 0
        self.pull.rcvtimeo = timeout_ms
        mailbox = ipc_endpoint(tmp, f"mb-{name or os.getpid()}.sock")
        self.pull.bind(mailbox)
        self.mailbox = mailbox.encode()
        self.timeout_ms = timeout_ms

    def send(self, i: int) -> None:
        """Submit request ``i``."""
        self.dealer.send_multipart([self.mailbox, cbor2.dumps(payload(i))])

    def recv(self) -> Any:
        """Block (up to the timeout) for one reply."""
        try:
            return cbor2.loads(self.pull.recv())
        except zmq.Again:
            raise BenchError(f"no reply within {self.timeout_ms} ms") from None

    def read_replies(self) -> list[Any]:
        """Wait for at least one reply, then take every reply already queued."""
        if not self.pull.poll(self.timeout_ms):
            raise BenchError(f"no reply within {self.timeout_ms} ms")
        out = []
        recv, loads, noblock = self.pull.recv, cbor2.loads, zmq.NOBLOCK
        while True:
            try:
                out.append(loads(recv(noblock)))
            except zmq.Again:
                return out

    def close(self) -> None:
        """Close sockets and the context."""
        self.dealer.close()
        self.pull.close()
        if self.own_ctx:
            self.ctx.term()


def _run(job: dict[str, Any]) -> dict[str, Any]:
    wl = job["workload"]
    cl = _Client(job["endpoint"], job["tmp"], int(job["rpc_timeout"] * 1000))
    tally = Tally()
    try:
        if wl["kind"] == "backlog":
            n = wl["n"]
            outstanding = set(range(n))
            start = time.monotonic()
            t0 = time.perf_counter()
            for i in range(n):
                cl.send(i)
            submit_s = time.perf_counter() - t0
            # No worker yet: the first reply may take as long as the whole run.
            cl.pull.rcvtimeo = int(job["first_reply_timeout"] * 1000)
            tally.take(outstanding, cl.recv())
            first = time.monotonic()
            meter = CpuMeter(job)
            cl.pull.rcvtimeo = cl.timeout_ms
            while outstanding:
                for r in cl.read_replies():
                    tally.take(outstanding, r)
            last, cpu = time.monotonic(), meter.stop()
            return backlog_result(n, start, submit_s, first, last, tally, cpu)

        if wl["kind"] == "rpc":
            for i in range(-wl["warmup"], 0):
                cl.send(i)
                tally.expect(i, cl.recv())
            lat: list[int] = []
            clock = time.perf_counter_ns
            meter = CpuMeter(job)
            t0 = time.perf_counter()
            for i in range(wl["n"]):
                s = clock()
                cl.send(i)
                r = cl.recv()
                lat.append(clock() - s)
                tally.expect(i, r)
            elapsed, cpu = time.perf_counter() - t0, meter.stop()
            return rpc_result(wl["n"], elapsed, lat, tally, wl["warmup"], cpu)

        window, expected = wl["window"], wl["procs"] * wl["threads"]
        # Warm-up: keep the window full until every worker has answered.
        outstanding = set()  # set[int], as in the backlog branch
        deadline = time.monotonic() + job["warmup_timeout"]
        nxt = -1
        warm_count = 0
        while not warm_done(tally, expected, warm_count, wl["warmup"]):
            if time.monotonic() > deadline:
                raise BenchError(f"warm-up: only {len(tally.warmup)}/{expected} workers answered")
            while len(outstanding) < window:
                cl.send(nxt)
                outstanding.add(nxt)
                nxt -= 1
            for r in cl.read_replies():
                tally.take(outstanding, r)
                warm_count += 1
        while outstanding:
            for r in cl.read_replies():
                tally.take(outstanding, r)
                warm_count += 1

        n = wl["n"]
        nxt = done = 0
        meter = CpuMeter(job)
        t0 = time.perf_counter()
        while done < n:
            while len(outstanding) < window and nxt < n:
                cl.send(nxt)
                outstanding.add(nxt)
                nxt += 1
            for r in cl.read_replies():
                tally.take(outstanding, r)
                done += 1
        elapsed, cpu = time.perf_counter() - t0, meter.stop()
        return pipelined_result(n, elapsed, tally, warm_count, cpu)
    finally:
        cl.close()


def sender_main(job: dict[str, Any]) -> None:
    """Child-process entry: run the job's workload, write the result file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if job["workload"]["kind"] == "many":
        run_sender_process(job, lambda j: run_many(j, many_sender_child))
    else:
        run_sender_process(job, _run)


def many_sender_child(job: dict[str, Any], k: int, lanes: int, start: Any, results: Any) -> None:
    """W9 sender process ``k``: ``lanes`` threads, one client (own mailbox) each,
    on one shared context."""
    ctx = zmq.Context()
    ctx.max_sockets = max(1024, 2 * lanes + 64)
    wl = job["workload"]
    each, timeout_ms = wl["n"] // wl["senders"], int(job["rpc_timeout"] * 1000)

    def lane_body(job: dict[str, Any], g: int, lane: ManyLane, wait_start: Any) -> None:
        cl = _Client(job["endpoint"], job["tmp"], timeout_ms, ctx=ctx, name=f"w9-{g}")
        try:
            for j in range(-W9_WARMUP_EACH, 0):
                i = w9_index(g, j, each)
                cl.send(i)
                lane.tally.expect(i, cl.recv())
            wait_start()
            clock = time.perf_counter_ns
            for j in range(each):
                i = w9_index(g, j, each)
                st = clock()
                cl.send(i)
                r = cl.recv()  # no reply in time fails the run: a late one would mismatch
                lane.lat_ns.append(clock() - st)
                lane.tally.expect(i, r)
        finally:
            cl.close()

    try:
        many_child(job, k, lanes, start, results, lane_body)
    finally:
        ctx.term()
