"""NATS peer (``--peers nats``): the same workloads on a private ``nats-server``.

* server: ``nats-server`` (the Debian package, Go) on a free loopback port
  (``-p -1``; the port is read from its ports file) in the run's temp dir;
* workers: nats-py asyncio clients, one connection and one subscription per
  worker, all in the queue group ``bench`` on subject ``bench.work``; a
  subscription hands its callback one message at a time, like an sqm Worker
  at prefetch 1 (NATS has no credits: the server pushes);
* sender: a nats-py asyncio client; replies come back to the request inbox
  (``request()``: one multiplexed inbox subscription per connection). W1
  awaits ``request`` in a loop; W2/W3 run ``window`` concurrent tasks each
  awaiting ``request`` in a loop (as the sqm AsyncSender does); W9 runs one
  connection per sender.

Payloads are cbor2, as sqm's default serializer; every reply is checked like
the other systems'. ``nats`` is imported inside the functions so that the
rest of the suite works without nats-py.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import time
from typing import Any

import cbor2

from bench.common import (
    METHOD,
    W9_WARMUP_EACH,
    BenchError,
    CpuMeter,
    ManyLane,
    Tally,
    many_report,
    payload,
    pdeathsig,
    pipelined_result,
    rpc_result,
    run_many,
    run_sender_process,
    timed_lanes,
    w9_index,
    wait_until,
    warm_lanes,
    work,
    write_json_atomic,
)

#: Where the Debian package puts the server (/usr/sbin may be off a user's PATH).
_SERVER_PATHS = ("/usr/sbin/nats-server", "/usr/bin/nats-server")
#: How long a sender waits for the first worker to subscribe (no responders yet).
_NO_RESPONDERS_RETRY_S = 0.01


def subject(queue: str) -> str:
    """The subject every worker subscribes to and every request goes to."""
    return f"{queue}.{METHOD}"


def server_path() -> str | None:
    """The ``nats-server`` executable, or None."""
    found = shutil.which("nats-server")
    if found:
        return found
    return next((p for p in _SERVER_PATHS if os.access(p, os.X_OK)), None)


def unavailable() -> str | None:
    """Why the NATS peer cannot run here (None if it can)."""
    if server_path() is None:
        return "nats-server is not installed (Debian package nats-server)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install '.[bench]')"
    return None


def server_cmd(tmp: str) -> list[str]:
    """``nats-server`` on 127.0.0.1, a free port (written to a ports file in ``tmp``)."""
    path = server_path()
    if path is None:
        raise BenchError("nats-server is not installed")
    return [path, "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", tmp]


def server_url(tmp: str, pid: int, timeout: float, alive: Any) -> str:
    """Wait for the server's ports file; return its client URL."""
    pattern = os.path.join(tmp, f"*_{pid}.ports")
    wait_until(lambda: bool(glob.glob(pattern)) or not alive(), timeout, "the nats-server ports file")
    files = glob.glob(pattern)
    if not files:
        raise BenchError("nats-server exited before writing its ports file")
    # Written in one go by the server, but read until it parses (a rename is not promised).
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(files[0], encoding="utf-8") as f:
                urls = json.load(f)["nats"]
            return str(urls[0])
        except (ValueError, KeyError, IndexError):
            if time.monotonic() > deadline:
                raise BenchError(f"unreadable nats-server ports file {files[0]}") from None
            time.sleep(0.01)


# --------------------------------------------------------------------------- workers


async def _serve(url: str, queue: str, nthreads: int, counts: dict[str, dict[str, int]]) -> None:
    import nats

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    dumps, loads = cbor2.dumps, cbor2.loads
    conns = []
    for wid, c in counts.items():
        nc = await nats.connect(url, allow_reconnect=False, name=wid)
        conns.append(nc)

        async def handle(msg: Any, _wid: str = wid, _c: dict[str, int] = c) -> None:
            await msg.respond(dumps(work(loads(msg.data), _wid, _c)))

        await nc.subscribe(subject(queue), queue=queue, cb=handle)
    for nc in conns:
        await nc.flush()  # subscribed on the server before anyone waits for us
    await stop.wait()
    for nc in conns:
        await nc.drain()


def worker_host(
    queue: str, endpoint: str, nthreads: int, counts_path: str, prefetch: int = 1
) -> None:
    """Run ``nthreads`` NATS workers (one event loop) until SIGTERM.

    ``prefetch`` is unused: the server pushes to subscribers, there are no
    credits. Writes the per-worker counts to ``counts_path`` on the way out.
    """
    del prefetch
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator handles Ctrl-C
    counters = {f"{os.getpid()}-{t}": {"measured": 0, "warmup": 0} for t in range(nthreads)}
    try:
        asyncio.run(_serve(endpoint, queue, nthreads, counters))
    finally:
        write_json_atomic(counts_path, counters)


# --------------------------------------------------------------------------- sender


async def _request(nc: Any, subj: str, i: int, timeout: float, retry_until: float) -> Any:
    """One request; before ``retry_until`` a "no responders" answer (workers
    still subscribing) is retried."""
    from nats.errors import NoRespondersError

    while True:
        try:
            msg = await nc.request(subj, cbor2.dumps(payload(i)), timeout=timeout)
        except NoRespondersError:
            if time.monotonic() >= retry_until:
                raise
            await asyncio.sleep(_NO_RESPONDERS_RETRY_S)
            continue
        return cbor2.loads(msg.data)


async def _run(job: dict[str, Any]) -> dict[str, Any]:
    import nats

    wl = job["workload"]
    if wl["kind"] not in ("rpc", "pipelined"):
        raise BenchError(f"{wl['kind']} workloads are not defined for NATS")
    timeout = job["rpc_timeout"]
    subj = subject(job["queue"])
    tally = Tally()
    nc = await nats.connect(job["endpoint"], allow_reconnect=False)
    try:
        warm_until = time.monotonic() + job["warmup_timeout"]
        if wl["kind"] == "rpc":
            for i in range(-wl["warmup"], 0):
                tally.expect(i, await _request(nc, subj, i, timeout, warm_until))
            lat: list[int] = []
            clock = time.perf_counter_ns
            dumps, loads = cbor2.dumps, cbor2.loads
            meter = CpuMeter(job)
            t0 = time.perf_counter()
            for i in range(wl["n"]):
                st = clock()
                msg = await nc.request(subj, dumps(payload(i)), timeout=timeout)
                r = loads(msg.data)
                lat.append(clock() - st)
                tally.expect(i, r)
            elapsed, cpu = time.perf_counter() - t0, meter.stop()
            return rpc_result(wl["n"], elapsed, lat, tally, wl["warmup"], cpu)

        window, expected = wl["window"], wl["procs"] * wl["threads"]
        warm_count = await warm_lanes(
            lambda i: _request(nc, subj, i, timeout, warm_until), tally, expected,
            wl["warmup"], window, warm_until)

        n = wl["n"]
        dumps, loads = cbor2.dumps, cbor2.loads

        async def call(i: int) -> Any:
            msg = await nc.request(subj, dumps(payload(i)), timeout=timeout)
            return loads(msg.data)

        elapsed, cpu = await timed_lanes(call, tally, n, window, job)
        return pipelined_result(n, elapsed, tally, warm_count, cpu)
    finally:
        await nc.close()


def sender_main(job: dict[str, Any]) -> None:
    """Child-process entry: run the job's workload, write the result file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if job["workload"]["kind"] == "many":
        run_sender_process(job, lambda j: run_many(j, many_sender_child))
    else:
        run_sender_process(job, lambda j: asyncio.run(_run(j)))


# --------------------------------------------------------------------------- W9


async def _many(job: dict[str, Any], k: int, lanes: int, start: Any, results: Any) -> None:
    """W9 sender process ``k``: ``lanes`` tasks, one connection each."""
    import nats
    from nats.errors import Error as NatsError

    wl = job["workload"]
    each, timeout = wl["n"] // wl["senders"], job["rpc_timeout"]
    subj = subject(job["queue"])
    warm_until = time.monotonic() + job["warmup_timeout"]
    conns = [await nats.connect(job["endpoint"], allow_reconnect=False) for _ in range(lanes)]
    collected = [ManyLane() for _ in range(lanes)]
    try:

        async def warm_up(g: int, nc: Any, lane: ManyLane) -> None:
            for j in range(-W9_WARMUP_EACH, 0):
                i = w9_index(g, j, each)
                lane.tally.expect(i, await _request(nc, subj, i, timeout, warm_until))

        async def measured(g: int, nc: Any, lane: ManyLane) -> None:
            clock = time.perf_counter_ns
            dumps, loads = cbor2.dumps, cbor2.loads
            for j in range(each):
                i = w9_index(g, j, each)
                st = clock()
                try:
                    msg = await nc.request(subj, dumps(payload(i)), timeout=timeout)
                except (NatsError, asyncio.TimeoutError) as exc:
                    lane.error(exc)
                    continue
                r = loads(msg.data)
                lane.lat_ns.append(clock() - st)
                lane.tally.expect(i, r)

        base = k * lanes
        await asyncio.gather(*(warm_up(base + t, nc, lane)
                               for t, (nc, lane) in enumerate(zip(conns, collected, strict=True))))
        results.put(("ready", k, None))
        await asyncio.get_running_loop().run_in_executor(None, start.wait)
        cpu0 = time.process_time()
        await asyncio.gather(*(measured(base + t, nc, lane)
                               for t, (nc, lane) in enumerate(zip(conns, collected, strict=True))))
        results.put(("done", k, many_report(collected, time.process_time() - cpu0)))
    finally:
        for nc in conns:
            await nc.close()


def many_sender_child(job: dict[str, Any], k: int, lanes: int, start: Any, results: Any) -> None:
    """W9 sender process entry (NATS)."""
    pdeathsig()
    try:
        asyncio.run(_many(job, k, lanes, start, results))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        results.put(("error", k, f"{type(exc).__name__}: {exc}"))
