"""Per-heartbeat cost and a many-worker deployment in simulation: ``python -m bench.sizing``.

The figures docs/SIZING.md is built from. Three parts, one core, well under
a minute:

1. **core**: the pure broker core (:class:`sqm.core.QueueCore`) with N
   registered workers, each heartbeating once per second with its
   self-report (kept raw, not parsed, as the server does), and the
   broker's tick four times per heartbeat: µs of CPU per
   heartbeat, sockets excluded.
2. **deployment**: the same core fed a whole deployment's share for one
   broker out of K (every worker registers with every broker, so each broker
   sees all N workers' heartbeats and 1/K of the messages), for K = 1, 2, 4,
   8: core CPU per simulated second. It shows the core stays linear at
   10,000 workers (no per-message scan of workers).
3. **broker**: a real ``sqm serve`` process with ``--real`` idle worker
   connections (DEALER sockets in this process that say HELLO and then
   heartbeat once per second, self-report included): the broker process's
   CPU per worker-second, sockets and its own heartbeats back included.

Per-message broker CPU with sockets is not measured here: it is in
BENCHMARKS.md ("CPU per message by process").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import zmq

from sqm.core import Dispatch, Message, QueueCore
from sqm.protocol import HEARTBEAT, HELLO, SIGNATURE, encode_json

_pause = threading.Event().wait
TICKS_PER_HEARTBEAT = 4  # the broker loop ticks every heartbeat / 4


def self_report(i: int) -> bytes:
    """A worker's self-report frame, shaped as worker/selfreport.py makes it."""
    return encode_json({"host": f"node{i // 16:04d}.example.net", "pid": 100_000 + i,
                        "rss_bytes": 48_000_000 + i, "nice": 0,
                        "started_at": 1_780_000_000.0 + i, "tasks_done": 12_345,
                        "busy_s": 1234.567891})


def worker_id(i: int) -> str:
    return f"node{i // 16:04d}:{100_000 + i}:1:{i:04x}"


def register(core: QueueCore, n: int, now: float) -> list[tuple[bytes, list[bytes]]]:
    """Register ``n`` one-slot workers; return (routing id, heartbeat frames) per worker."""
    beats = []
    for i in range(n):
        rid = b"\x00w%07d" % i
        wid = worker_id(i)
        core.hello(now, rid, {"id": wid, "slots": 1, "heartbeat": 1.0, "methods": ["work"]})
        beats.append((rid, [SIGNATURE, HEARTBEAT, wid.encode(), self_report(i)]))
    return beats


def beat(core: QueueCore, frames: list[bytes], now: float) -> None:
    """What the server does with one worker heartbeat (sqm/broker/server.py): the
    report is kept raw, not parsed."""
    if len(frames) == 4:
        core.report(now, frames[2].decode("utf-8", "replace"), frames[3])
    elif len(frames) == 3:
        core.seen_id(now, frames[2].decode("utf-8", "replace"))


def simulate(workers: int, msgs_per_s: float, seconds: float) -> dict[str, float]:
    """CPU of one broker core over ``seconds`` simulated seconds: every worker
    heartbeats once a second, ticks four times a second, ``msgs_per_s`` messages
    submitted, dispatched to an idle worker and done (spread evenly)."""
    core = QueueCore("sizing", 0.0, heartbeat=1.0, max_pending=1_000_000)
    beats = register(core, workers, 0.0)
    core.outbox.clear()
    steps = 100  # per simulated second: heartbeats, messages and ticks interleaved
    beats_per_step = workers / steps
    msgs_per_step = msgs_per_s / steps
    tick_every = steps // TICKS_PER_HEARTBEAT
    out = core.outbox
    sent = 0
    b_acc = m_acc = 0.0
    bi = 0
    counter = 0
    t_beats = t_msgs = t_ticks = 0.0
    perf = time.process_time
    for step in range(int(seconds * steps)):
        now = 1.0 + step / steps
        b_acc += beats_per_step
        t0 = perf()
        while b_acc >= 1:
            b_acc -= 1
            beat(core, beats[bi][1], now)
            bi = (bi + 1) % workers
        t1 = perf()
        m_acc += msgs_per_step
        while m_acc >= 1:
            m_acc -= 1
            counter += 1
            msg = Message(b"m%d" % counter, b"origin", None, method=b"work")
            core.submit(now, msg)
            for entry in out:
                if type(entry) is Dispatch:
                    core.done(now, entry.rid, entry.msg.id)
            out.clear()
            sent += 1
        t2 = perf()
        if step % tick_every == 0:
            core.tick(now)
            out.clear()
        t3 = perf()
        t_beats += t1 - t0
        t_msgs += t2 - t1
        t_ticks += t3 - t2
    n_beats = workers * seconds
    n_ticks = seconds * TICKS_PER_HEARTBEAT
    return {
        "workers": workers,
        "msgs_per_s": msgs_per_s,
        "completed": core.completed_total,
        "core_cpu_per_s": (t_beats + t_msgs + t_ticks) / seconds,
        "us_per_heartbeat": t_beats / n_beats * 1e6 if n_beats else 0.0,
        "us_per_message": t_msgs / sent * 1e6 if sent else 0.0,
        "us_per_tick_per_worker": t_ticks / n_ticks / workers * 1e6 if workers else 0.0,
    }


# ---------------------------------------------------------------- a real broker


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def real_broker(n: int, measure_s: float) -> dict[str, Any]:
    """A ``sqm serve`` process with ``n`` idle, heartbeating worker connections."""
    tmp = tempfile.mkdtemp(prefix="sqm-sizing-")
    endpoint = f"ipc://{tmp}/sizing.sock"
    env = dict(os.environ, SQM_RUNDIR=tmp)
    broker = subprocess.Popen([sys.executable, "-m", "sqm", "serve", "sizing", "--endpoint",
                               endpoint, "--log-level", "warning"], env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(f"{tmp}/sizing.sock") and time.monotonic() < deadline:
        _pause(0.05)
    rss_empty = rss_bytes(broker.pid)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, n + 64)
    socks: list[zmq.Socket] = []
    try:
        for i in range(n):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, b"\x00w%07d" % i)
            sock.connect(endpoint)
            sock.send_multipart([SIGNATURE, HELLO, encode_json(
                {"id": worker_id(i), "host": "sizing", "pid": os.getpid(), "slots": 1,
                 "heartbeat": 1.0, "methods": ["work"], "started_at": time.time()})])
            socks.append(sock)
        frames = [[SIGNATURE, HEARTBEAT, worker_id(i).encode(), self_report(i)]
                  for i in range(n)]
        wire_bytes = sum(len(f) for f in frames[0])

        def one_round() -> None:
            """Each connection heartbeats once, spread over one second; read what came."""
            start = time.monotonic()
            chunk = max(1, n // 50)
            for i in range(0, n, chunk):
                for j in range(i, min(n, i + chunk)):
                    socks[j].send_multipart(frames[j], zmq.NOBLOCK)
                    while socks[j].poll(0):
                        socks[j].recv_multipart()
                left = start + (i + chunk) / n - time.monotonic()
                if left > 0:
                    _pause(left)

        registered = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            one_round()
            done = subprocess.run([sys.executable, "-m", "sqm", "status", "sizing", "--endpoint",
                                   endpoint, "--json"], env=env, capture_output=True, text=True,
                                  check=False)
            if done.returncode == 0:
                registered = json.loads(done.stdout)["workers_current"]
                if registered >= n:
                    break
        if registered < n:
            raise SystemExit(f"only {registered} of {n} workers registered")
        one_round()  # settle
        rss_full = rss_bytes(broker.pid)
        before, t0 = cpu_seconds(broker.pid), time.monotonic()
        rounds = max(1, int(measure_s))
        for _ in range(rounds):
            one_round()
        used, elapsed = cpu_seconds(broker.pid) - before, time.monotonic() - t0
        return {
            "connections": n,
            "seconds": round(elapsed, 2),
            "broker_cpu_pct": round(used / elapsed * 100, 2),
            "us_per_worker_second": round(used / (n * rounds) * 1e6, 1),
            "heartbeat_bytes": wire_bytes,
            "rss_bytes_per_worker": round((rss_full - rss_empty) / n),
        }
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
        broker.terminate()
        broker.wait(10)
        subprocess.run(["rm", "-rf", tmp], check=False)


def wire_traffic(workers: int, measure_s: float) -> dict[str, Any]:
    """Bytes and packets on the wire per idle worker-second, across two hosts.

    A broker on one network namespace and ``sqm worker --processes N`` (real
    workers, heartbeat thread and self-report included) on another, using the
    multi-host test harness (tests/system/hosts.py: needs root and ``ip``);
    the broker host's interface counters are read over ``measure_s`` seconds
    once every worker has registered.
    """
    from tests.system.hosts import Network

    def counters(host: Any) -> tuple[int, int]:
        out = host.call(["cat", "/sys/class/net/eth0/statistics/rx_bytes",
                         "/sys/class/net/eth0/statistics/tx_bytes",
                         "/sys/class/net/eth0/statistics/rx_packets",
                         "/sys/class/net/eth0/statistics/tx_packets"]).stdout.split()
        rx, tx, rxp, txp = (int(x) for x in out)
        return rx + tx, rxp + txp

    with Network() as net:
        broker_host, worker_host = net(2)
        endpoint = f"tcp://{broker_host.addr}:5555"
        from tests.system.hosts import serve_args

        broker = broker_host.sqm(*serve_args("q", endpoint, "--log-level", "warning"))
        worker_host.sqm("worker", "tests.apps:callbacks", "--queue", "q", "--endpoint", endpoint,
                        "--processes", str(workers), "--log-level", "warning")
        deadline = time.monotonic() + 60
        while True:
            st = broker_host.status("q", endpoint)
            if st is not None and st["workers_current"] >= workers:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not register: {st}; {broker.stderr}")
            _pause(0.2)
        _pause(2.0)  # registration traffic settles
        (b0, p0), t0 = counters(broker_host), time.monotonic()
        _pause(measure_s)
        (b1, p1), t1 = counters(broker_host), time.monotonic()
    per = workers * (t1 - t0)
    return {"workers": workers, "seconds": round(t1 - t0, 2),
            "bytes_per_worker_second": round((b1 - b0) / per),
            "packets_per_worker_second": round((p1 - p0) / per, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=10_000, help="deployment size [10000]")
    p.add_argument("--per-minute", type=float, default=1_000_000,
                   help="messages per minute of the deployment [1000000]")
    p.add_argument("--seconds", type=float, default=2.0, help="simulated seconds per run [2]")
    p.add_argument("--real", type=int, default=1000,
                   help="idle worker connections to a real broker (0: skip) [1000]")
    p.add_argument("--real-seconds", type=float, default=8.0, help="[8]")
    p.add_argument("--wire", type=int, default=0, metavar="N",
                   help="also count heartbeat bytes and packets on the wire with N real "
                        "workers on another network namespace (root, `ip`) [0: skip]")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    a = p.parse_args()

    results: dict[str, Any] = {}
    core_alone = simulate(a.workers, 0, a.seconds)
    results["core_heartbeats"] = core_alone
    deployment = []
    rate = a.per_minute / 60
    for brokers in (1, 2, 4, 8):
        run = simulate(a.workers, rate / brokers, a.seconds)
        run["brokers"] = brokers
        deployment.append(run)
    results["deployment"] = deployment
    if a.real:
        results["real_broker"] = real_broker(a.real, a.real_seconds)
    if a.wire:
        results["wire"] = wire_traffic(a.wire, a.real_seconds)
    if a.json:
        print(json.dumps(results, indent=1))
        return
    c = core_alone
    print(f"core, {c['workers']} workers heartbeating at 1 s, no messages:")
    print(f"  {c['us_per_heartbeat']:.2f} µs per heartbeat (parse + report),"
          f" {c['us_per_tick_per_worker']:.3f} µs per worker per tick,"
          f" {c['core_cpu_per_s'] * 100:.1f} % of a core")
    print(f"deployment: {a.workers} workers registered with every broker, "
          f"{a.per_minute:,.0f} messages/min spread over K brokers (core only):")
    for run in deployment:
        print(f"  K={run['brokers']}: {run['msgs_per_s']:8.0f} msg/s per broker,"
              f" core {run['core_cpu_per_s'] * 100:5.1f} % of a core"
              f" ({run['us_per_message']:.2f} µs/message,"
              f" {run['us_per_heartbeat']:.2f} µs/heartbeat)")
    if a.real:
        r = results["real_broker"]
        print(f"real broker, {r['connections']} idle workers at 1 s heartbeats over"
              f" {r['seconds']} s: {r['broker_cpu_pct']} % of a core,"
              f" {r['us_per_worker_second']} µs per worker-second;"
              f" heartbeat message {r['heartbeat_bytes']} bytes of frames;"
              f" broker memory {r['rss_bytes_per_worker']} bytes per worker")
    if a.wire:
        w = results["wire"]
        print(f"on the wire, {w['workers']} real idle workers over {w['seconds']} s:"
              f" {w['bytes_per_worker_second']} bytes and {w['packets_per_worker_second']}"
              " packets per worker-second (both directions, broker host's interface)")


if __name__ == "__main__":
    main()
