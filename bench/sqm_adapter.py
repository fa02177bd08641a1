"""sqm adapters: worker host and senders written against the public SPEC API.

* broker: ``sqm serve QUEUE --endpoint ipc://...`` (started by the orchestrator);
* workers: ``worker.Worker(queue, endpoint=..., callbacks={"work": cb},
  prefetch=N).run()``; several workers in one process share one ZeroMQ
  context (``context=``) and each runs in its own thread;
* sync sender: ``sender.Sender`` -- W1 with ``rpc``, W2/W3/W4 with ``submit`` +
  ``receive()`` keeping at most ``window`` messages outstanding; W5 submits
  everything (``timeout=600``) before any worker runs, then receives;
* async sender: ``sender.AsyncSender`` -- W1 with ``await rpc``, W2/W3 with
  ``window`` concurrent tasks each awaiting ``rpc`` in a loop.

``sender`` / ``worker`` are imported inside the functions so that the rest of
the suite works while sqm is absent.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import threading
import time
from typing import Any

from bench.common import (
    METHOD,
    W6_ENV,
    W6_METHODS,
    W7_SPREAD_S,
    W8_ENV,
    W9_WARMUP_EACH,
    BenchError,
    CpuMeter,
    ManyLane,
    Tally,
    backlog_result,
    hol_stats,
    many_child,
    payload,
    pipelined_result,
    rpc_result,
    run_many,
    run_sender_process,
    scheduled_result,
    timed_lanes,
    w6_method,
    w6_methods,
    w7_lead,
    w8_slow,
    w9_index,
    wait_until,
    warm_lanes,
    warm_pipelined,
    work,
    work_w8,
    write_json_atomic,
)

#: Backlog runs give each message this deadline (s): no worker runs while they queue.
BACKLOG_MESSAGE_TIMEOUT = 600.0


def worker_host(
    queue: str, endpoint: str, nthreads: int, counts_path: str, prefetch: int = 1
) -> None:
    """Run ``nthreads`` sqm Workers (``prefetch`` credits each) until SIGTERM.

    With one worker, ``Worker.run()`` runs in the main thread and handles
    SIGTERM itself (per SPEC). With several, they share one ZeroMQ context,
    each runs in a thread, and the main thread turns SIGTERM into
    ``terminate()`` calls. Per-worker counts are written to ``counts_path``
    once ``run()`` has returned.
    """
    import zmq

    from worker import Worker

    ctx: zmq.Context | None = None
    if nthreads > 1:
        ctx = zmq.Context()
        # ~4 sockets per Worker (dealer, monitor pair, heartbeat, mailbox push).
        ctx.max_sockets = max(1024, 8 * nthreads + 64)
    counters: dict[str, dict[str, int]] = {}
    workers = []
    # W8: some tasks take long; chosen here so other workloads pay nothing per message.
    task = work_w8 if os.environ.get(W8_ENV) else work
    # prefetch 0: the Worker's own default (W8 measures it as shipped).
    options: dict[str, Any] = {"prefetch": prefetch} if prefetch else {}
    for t in range(nthreads):
        wid = f"{os.getpid()}-{t}"
        c = {"measured": 0, "warmup": 0}
        counters[wid] = c

        def cb(
            _w: Any, _orig: Any, body: Any, _wid: str = wid, _c: dict[str, int] = c
        ) -> dict[str, Any]:
            return task(body, _wid, _c)

        methods: tuple[str, ...] = (METHOD,)
        if os.environ.get(W6_ENV):  # W6: this worker serves 2 of the 8 methods
            proc = int(os.path.basename(counts_path).split("-")[-1].split(".")[0])
            methods = w6_methods(proc * nthreads + t)
        workers.append(
            Worker(
                queue, endpoint=endpoint, callbacks=dict.fromkeys(methods, cb),
                context=ctx, **options,
            )
        )
    try:
        if nthreads == 1:
            workers[0].run()
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            errors: list[BaseException] = []

            def runner(w: Any) -> None:
                try:
                    w.run()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)
                    stop.set()

            threads = [threading.Thread(target=runner, args=(w,), daemon=True) for w in workers]
            for th in threads:
                th.start()
            stop.wait()
            for w in workers:
                w.terminate()
            deadline = time.monotonic() + 10
            for th in threads:
                th.join(max(0.0, deadline - time.monotonic()))
            if errors:
                raise errors[0]
            stuck = sum(th.is_alive() for th in threads)
            if stuck:
                raise BenchError(f"{stuck} sqm Worker.run() did not return after terminate()")
            if ctx is not None:
                ctx.term()
    finally:
        write_json_atomic(counts_path, counters)


def _run_sync(job: dict[str, Any]) -> dict[str, Any]:
    from sender import Sender

    wl = job["workload"]
    if wl["kind"] == "many":
        return run_many(job, many_sender_child)
    timeout = job["rpc_timeout"]
    tally = Tally()
    with Sender(job["queue"], endpoint=job["endpoint"], timeout=timeout) as s:
        if wl["kind"] == "backlog":
            n = wl["n"]
            outstanding = set(range(n))
            start = time.monotonic()
            t0 = time.perf_counter()
            for i in range(n):
                s.submit(METHOD, payload(i), timeout=BACKLOG_MESSAGE_TIMEOUT)
            submit_s = time.perf_counter() - t0
            # No worker yet: the first reply may take as long as the whole run.
            tally.take(outstanding, s.receive(timeout=job["first_reply_timeout"]))
            first = time.monotonic()
            meter = CpuMeter(job)
            while outstanding:
                tally.take(outstanding, s.receive(timeout=timeout))
            last, cpu = time.monotonic(), meter.stop()
            return backlog_result(n, start, submit_s, first, last, tally, cpu)

        if wl["kind"] == "methods":
            return _run_methods(s, job, timeout, tally)

        if wl["kind"] == "scheduled":
            return _run_scheduled(s, job, timeout, tally)

        if wl["kind"] == "hol":
            return _run_hol(s, job, timeout, tally)

        if wl["kind"] == "rpc":
            for i in range(-wl["warmup"], 0):
                tally.expect(i, s.rpc(METHOD, payload(i), timeout=timeout))
            lat: list[int] = []
            clock = time.perf_counter_ns
            meter = CpuMeter(job)
            t0 = time.perf_counter()
            for i in range(wl["n"]):
                st = clock()
                r = s.rpc(METHOD, payload(i), timeout=timeout)
                lat.append(clock() - st)
                tally.expect(i, r)
            elapsed, cpu = time.perf_counter() - t0, meter.stop()
            return rpc_result(wl["n"], elapsed, lat, tally, wl["warmup"], cpu)

        window, expected = wl["window"], wl["procs"] * wl["threads"]
        outstanding = set()  # set[int], as in the backlog branch
        warm_count = warm_pipelined(s, tally, expected, wl["warmup"], window,
                                    time.monotonic() + job["warmup_timeout"], timeout)

        n = wl["n"]
        meter = CpuMeter(job)
        t0 = time.perf_counter()
        if wl["via"] == "map":  # the documented throughput setting: map() batches SUBMITs
            for i, r in s.map(METHOD, (payload(i) for i in range(n)), max_concurrent=window,
                              timeout=timeout, ordered=False):
                tally.expect(i, r)
        else:
            nxt = done = 0
            while done < n:
                while len(outstanding) < window and nxt < n:
                    s.submit(METHOD, payload(nxt))
                    outstanding.add(nxt)
                    nxt += 1
                tally.take(outstanding, s.receive(timeout=timeout))
                done += 1
        elapsed, cpu = time.perf_counter() - t0, meter.stop()
        res = pipelined_result(n, elapsed, tally, warm_count, cpu)
        return {**res, "via": wl["via"]} if wl["via"] else res


def _run_scheduled(s: Any, job: dict[str, Any], timeout: float, tally: Tally) -> dict[str, Any]:
    """W7: ``n`` messages due evenly over W7_SPREAD_S seconds, all submitted first
    (``not_before``); each reply's lag is its arrival minus its due time."""
    n = job["workload"]["n"]
    base = time.time() + w7_lead(n)
    due = [base + W7_SPREAD_S * i / n for i in range(n)]
    patience = w7_lead(n) + W7_SPREAD_S + timeout
    outstanding = set(range(n))
    start = time.monotonic()
    t0 = time.perf_counter()
    for i in range(n):
        s.submit(METHOD, payload(i), not_before=due[i], timeout=patience)
    submit_s = time.perf_counter() - t0
    meter = CpuMeter(job)
    lags: list[float] = []
    clock = time.time
    while outstanding:
        got = tally.take(outstanding, s.receive(timeout=patience))
        lags.append(clock() - due[got])
    return scheduled_result(n, start, submit_s, lags, tally, meter.stop())


def _run_methods(s: Any, job: dict[str, Any], timeout: float, tally: Tally) -> dict[str, Any]:
    """W6: the skewed method mix, ``window`` outstanding; also the rarest method's
    longest submit-to-reply time (its workers are busy with the common methods)."""
    from sqm.admin import fetch_status
    from sqm.config import resolve

    wl = job["workload"]
    window, expected = wl["window"], wl["procs"] * wl["threads"]
    outstanding: set[int] = set()
    deadline = time.monotonic() + job["warmup_timeout"]
    # Every worker registered first: with some workers there, a method none
    # of them serves yet would fail at once (UnknownMethod), as it should.
    where = resolve(job["queue"], endpoint=job["endpoint"])
    wait_until(lambda: fetch_status(where, 2.0)["workers_current"] >= expected,
               job["warmup_timeout"], f"{expected} registered workers", interval=0.05)
    warm_count = warm_pipelined(  # every method, evenly
        s, tally, expected, wl["warmup"], window, deadline, timeout,
        method=lambda i: W6_METHODS[i % len(W6_METHODS)])

    n = wl["n"]
    starved = W6_METHODS[-1]
    sent_at: dict[int, float] = {}
    worst: dict[str, float] = dict.fromkeys(W6_METHODS, 0.0)
    clock = time.perf_counter
    nxt = done = 0
    meter = CpuMeter(job)
    t0 = clock()
    while done < n:
        while len(outstanding) < window and nxt < n:
            s.submit(w6_method(nxt), payload(nxt))
            sent_at[nxt] = clock()
            outstanding.add(nxt)
            nxt += 1
        got = tally.take(outstanding, s.receive(timeout=timeout))
        waited = clock() - sent_at.pop(got)
        method = w6_method(got)
        if waited > worst[method]:
            worst[method] = waited
        done += 1
    elapsed, cpu = clock() - t0, meter.stop()
    res = pipelined_result(n, elapsed, tally, warm_count, cpu)
    res["starved_method"] = starved
    res["starved_max_wait_ms"] = worst[starved] * 1000
    res["max_wait_ms_by_method"] = {m: w * 1000 for m, w in worst.items()}
    return res


def _run_hol(s: Any, job: dict[str, Any], timeout: float, tally: Tally) -> dict[str, Any]:
    """W8: submissions paced at ``rate`` per second (open loop, at most ``window``
    outstanding), 1 % of them slow; every message's submit-to-reply time, the
    short ones' apart: how long does a short one wait behind a slow one?"""
    from sender import Timeout

    wl = job["workload"]
    expected = wl["procs"] * wl["threads"]
    outstanding: set[int] = set()
    warm_count = warm_pipelined(s, tally, expected, wl["warmup"], 20,
                                time.monotonic() + job["warmup_timeout"], timeout)

    n, rate, cap = wl["n"], wl["rate"], wl["window"]
    sent_at: dict[int, float] = {}
    short: list[float] = []
    slow: list[float] = []
    clock = time.perf_counter
    nxt = done = 0
    meter = CpuMeter(job)
    t0 = last = clock()
    while done < n:
        now = clock()
        while nxt < n and t0 + nxt / rate <= now and len(outstanding) < cap:
            s.submit(METHOD, payload(nxt))
            sent_at[nxt] = clock()
            outstanding.add(nxt)
            nxt += 1
        due = t0 + nxt / rate if nxt < n else now + timeout
        if not outstanding:
            time.sleep(max(0.0, due - clock()))  # pacing: wait for the next submission's time
            continue
        try:
            reply = s.receive(timeout=max(0.0, min(due - clock(), timeout)))
        except Timeout:
            if clock() - last > timeout:
                raise BenchError(f"no reply within {timeout}s, {len(outstanding)} "
                                 "outstanding") from None
            continue
        got = tally.take(outstanding, reply)
        last = clock()
        (slow if w8_slow(got) else short).append(last - sent_at.pop(got))
        done += 1
    elapsed, cpu = clock() - t0, meter.stop()
    res = pipelined_result(n, elapsed, tally, warm_count, cpu)
    res.update(hol_stats(short, slow))
    return res


def _many_lane(job: dict[str, Any], g: int, lane: ManyLane, wait_start: Any) -> None:
    """W9: one sender (its own ``Sender``) doing sequential rpcs."""
    from sender import Sender, SQMError

    wl = job["workload"]
    each, timeout = wl["n"] // wl["senders"], job["rpc_timeout"]
    with Sender(job["queue"], endpoint=job["endpoint"], timeout=timeout) as s:
        for j in range(-W9_WARMUP_EACH, 0):
            i = w9_index(g, j, each)
            lane.tally.expect(i, s.rpc(METHOD, payload(i), timeout=timeout))
        wait_start()
        clock = time.perf_counter_ns
        for j in range(each):
            i = w9_index(g, j, each)
            st = clock()
            try:
                r = s.rpc(METHOD, payload(i), timeout=timeout)
            except SQMError as exc:
                lane.error(exc)
                continue
            lane.lat_ns.append(clock() - st)
            lane.tally.expect(i, r)


def many_sender_child(job: dict[str, Any], k: int, lanes: int, start: Any, results: Any) -> None:
    """W9 sender process ``k``: ``lanes`` threads, one ``Sender`` each."""
    many_child(job, k, lanes, start, results, _many_lane)


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


async def _run_async(job: dict[str, Any]) -> dict[str, Any]:
    from sender import AsyncSender

    wl = job["workload"]
    if wl["kind"] == "backlog":
        raise BenchError("backlog workloads are not defined for AsyncSender")
    timeout = job["rpc_timeout"]
    tally = Tally()
    s = AsyncSender(job["queue"], endpoint=job["endpoint"], timeout=timeout)
    try:
        if wl["kind"] == "rpc":
            for i in range(-wl["warmup"], 0):
                tally.expect(i, await s.rpc(METHOD, payload(i), timeout=timeout))
            lat: list[int] = []
            clock = time.perf_counter_ns
            meter = CpuMeter(job)
            t0 = time.perf_counter()
            for i in range(wl["n"]):
                st = clock()
                r = await s.rpc(METHOD, payload(i), timeout=timeout)
                lat.append(clock() - st)
                tally.expect(i, r)
            elapsed, cpu = time.perf_counter() - t0, meter.stop()
            return rpc_result(wl["n"], elapsed, lat, tally, wl["warmup"], cpu)

        window, expected = wl["window"], wl["procs"] * wl["threads"]

        # Warm-up: `window` concurrent rpc loops until every worker answered.
        warm_count = await warm_lanes(
            lambda i: s.rpc(METHOD, payload(i), timeout=timeout), tally, expected,
            wl["warmup"], window, time.monotonic() + job["warmup_timeout"])

        n = wl["n"]
        elapsed, cpu = await timed_lanes(
            lambda i: s.rpc(METHOD, payload(i), timeout=timeout), tally, n, window, job)
        return pipelined_result(n, elapsed, tally, warm_count, cpu)
    finally:
        await _maybe_await(s.close())


def sender_main(job: dict[str, Any]) -> None:
    """Child-process entry for the sync ``Sender``."""
    run_sender_process(job, _run_sync)


def async_sender_main(job: dict[str, Any]) -> None:
    """Child-process entry for ``AsyncSender``."""
    run_sender_process(job, lambda j: asyncio.run(_run_async(j)))
