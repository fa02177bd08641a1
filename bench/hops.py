"""Where one rpc's time goes, hop by hop: ``python -m bench.hops``.

W1 (one Sender, one worker, sequential rpcs) with every send and receive of
``sqm.zmqfast`` timestamped in the Sender, sqm and the worker
(``time.perf_counter_ns``: CLOCK_MONOTONIC, one clock for the machine's
processes). Each compact message's first bytes tell what it is, so the
k-th SUBMIT, DISPATCH and RESULT of each process belong to the k-th rpc,
and the table splits an rpc into the three processes' own time and the
three hops between them. The patch costs ~0.5 µs per call: compare runs
of this tool with each other, not with ``python -m bench``. The last two
rows split the rpcs by whether the Sender looked at its broker sockets
during one (every 20 ms while it waits): the same run, so the VM's noise
hits both alike.

``--system baseline`` does the same for the raw-pyzmq baseline (bench/baseline.py:
its client, broker and worker, pyzmq's socket methods patched; a message is
told by its socket's type and frame count): the request, its dispatch and
the reply stand for SUBMIT, DISPATCH and RESULT. Alternate the two systems
(``--system both``) to compare each process's own time on the same path.
"""

from __future__ import annotations

import argparse
import bisect
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from bench.common import METHOD, payload, wait_until, write_json_atomic

#: (ns, "s" or "r", the frame's first bytes), per send/receive of this process.
Record = tuple[int, str, bytes]
_records: list[Record] = []
_HEAD = 6  # bytes kept per frame: enough for "SQM1" + a command letter

SUBMIT_HEAD = b"SQM1s"  # protocol.COMPACT_SUBMIT: also the DISPATCH
RESULT_HEAD = b"SQM1y"  # protocol.COMPACT_RESULT
#: Each segment's marks for sqm: (process, "s"/"r", first bytes of the frame).
SQM_MARKS = (("sender", "s", SUBMIT_HEAD), ("broker", "r", SUBMIT_HEAD),
             ("broker", "s", SUBMIT_HEAD), ("worker", "r", SUBMIT_HEAD),
             ("worker", "s", RESULT_HEAD), ("sender", "r", RESULT_HEAD))


def _tag(socket_type: int, frames: int) -> bytes:
    """A baseline record's head: its socket's type and the message's frame count."""
    return bytes((socket_type, frames))


#: The baseline's: the client's request (DEALER, 2 frames), the broker's read of it
#: and its dispatch (ROUTER, 3 frames each), the worker's read (DEALER, 2) and
#: reply (PUSH), the client's read of that (PULL).
BASELINE_MARKS = (("sender", "s", _tag(zmq.DEALER, 2)), ("broker", "r", _tag(zmq.ROUTER, 3)),
                  ("broker", "s", _tag(zmq.ROUTER, 3)), ("worker", "r", _tag(zmq.DEALER, 2)),
                  ("worker", "s", _tag(zmq.PUSH, 1)), ("sender", "r", _tag(zmq.PULL, 1)))
LOOKED = "the rpcs in which the Sender looked at sqm"
NOT_LOOKED = "the others"
SEGMENTS = (
    "Sender's SUBMIT sent -> sqm has read it",
    "sqm: read -> DISPATCH sent",
    "DISPATCH sent -> the worker has read it",
    "worker: read -> RESULT sent",
    "RESULT sent -> the Sender has read it",
    "Sender: reply read -> next SUBMIT sent",
)


def install() -> None:
    """Timestamp every send and receive of ``sqm.zmqfast`` in this process.

    Call before importing ``sender``, ``worker`` or sqm's broker: they bind
    ``send_raw`` at import; the other helpers read ``_send``/``_recv`` at
    call time.
    """
    import sqm.zmqfast as zf

    if getattr(zf._send, "_hops", False):
        return  # once per process: a second wrapper would record every call twice
    clock = time.perf_counter_ns
    send, recv, records = zf._send, zf._recv, _records

    def timed_send(sock: Any, data: Any, flags: int = 0, copy: bool = True) -> Any:
        records.append((clock(), "s", bytes(data[:_HEAD])))
        return send(sock, data, flags, copy)

    def timed_recv(sock: Any, flags: int = 0, copy: bool = True) -> Any:
        got: Any = recv(sock, flags, copy)
        data: bytes = got if copy else got.bytes
        records.append((clock(), "r", data[:_HEAD]))
        return got

    timed_send._hops = True  # type: ignore[attr-defined]
    zf._send = zf.send_raw = timed_send  # type: ignore[assignment]
    zf._recv = timed_recv  # type: ignore[assignment]


def install_baseline() -> None:
    """Timestamp every outermost send and receive of pyzmq's sockets in this
    process (the baseline calls their methods; once per process)."""
    sock_cls: Any = zmq.Socket
    if getattr(sock_cls.send, "_hops", False):
        return
    clock, records = time.perf_counter_ns, _records
    depth = [0]  # send_multipart calls send: record the outer call only

    def wrap(name: str, kind: str) -> None:
        call = getattr(sock_cls, name)

        def timed(sock: Any, *args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            try:
                if kind == "s" and depth[0] == 1:
                    data = args[0]
                    records.append((clock(), "s", _tag(
                        sock.socket_type, len(data) if isinstance(data, list) else 1)))
                got = call(sock, *args, **kwargs)
                if kind == "r" and depth[0] == 1:
                    records.append((clock(), "r", _tag(
                        sock.socket_type, len(got) if isinstance(got, list) else 1)))
                return got
            finally:
                depth[0] -= 1

        timed._hops = True  # type: ignore[attr-defined]
        setattr(sock_cls, name, timed)

    for name in ("send_multipart", "recv_multipart"):
        wrap(name, name[0])
    wrap("recv", "r")
    wrap("send", "s")  # last: the guard above looks at send


def dump(path: str) -> None:
    """Write this process's records to ``path``, one ``ns kind hex`` line each."""
    with open(path, "w") as f:
        f.writelines(f"{t} {k} {h.hex()}\n" for t, k, h in _records)


def load(path: str) -> list[Record]:
    with open(path) as f:
        return [(int(t), k, bytes.fromhex(h)) for t, k, h in (line.split() for line in f)]


def _times(records: list[Record], kind: str, head: bytes, since: int) -> list[int]:
    return [t for t, k, h in records if k == kind and h.startswith(head) and t >= since]


def segments(sender: list[Record], broker: list[Record], worker: list[Record],
             since: int, spec: tuple[tuple[str, str, bytes], ...] = SQM_MARKS,
             ) -> dict[str, list[int]]:
    """Each rpc's six segments (ns) from the three processes' records after
    ``since``; ``spec``: where each mark is (:data:`SQM_MARKS`, :data:`BASELINE_MARKS`)."""
    by = {"sender": sender, "broker": broker, "worker": worker}
    marks = [_times(by[proc], kind, head, since) for proc, kind, head in spec]
    t0, t5 = marks[0], marks[5]
    n = min(map(len, marks))
    out = {name: [marks[j + 1][i] - marks[j][i] for i in range(n)]
           for j, name in enumerate(SEGMENTS[:-1])}
    out[SEGMENTS[-1]] = [t0[i + 1] - t5[i] for i in range(min(n, len(t0) - 1))]
    out["the rpc (SUBMIT sent -> reply read)"] = [t5[i] - t0[i] for i in range(n)]
    return out


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000


def table(segs: dict[str, list[int]]) -> str:
    lines = [f"{'segment':44s} {'p50':>8s} {'p90':>8s} {'p99':>8s}  (µs)"]
    lines += [f"{name:44s} {_pct(v, .5):8.1f} {_pct(v, .9):8.1f} {_pct(v, .99):8.1f}"
              + (f"  ({len(v)} rpcs)" if name in (LOOKED, NOT_LOOKED) else "")
              for name, v in segs.items() if v]
    return "\n".join(lines)


def _child(code: str, *argv: str, system: str = "sqm") -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    patch = "install_baseline" if system == "baseline" else "install"
    pre = f"import sys; sys.path.insert(0, {root!r}); from bench import hops; hops.{patch}(); "
    return [sys.executable, "-c", pre + code, *argv]


def _mark_looks(sender_cls: Any) -> None:
    """Record (kind "c") each time a Sender looks at its broker sockets
    (``_check_brokers``: every 20 ms while it waits): :func:`looks` splits the
    rpcs by whether one fell inside them."""
    look = sender_cls._check_brokers
    if getattr(look, "_hops", False):
        return
    clock, records = time.perf_counter_ns, _records

    def timed(self: Any, now: float) -> int:
        records.append((clock(), "c", b""))
        return cast(int, look(self, now))

    timed._hops = True  # type: ignore[attr-defined]
    sender_cls._check_brokers = timed


def looks(sender: list[Record], since: int) -> tuple[list[int], list[int]]:
    """The rpcs' times (ns) split: (those in which the Sender looked at its
    brokers, the others). An rpc runs from its SUBMIT sent to its reply read."""
    t0 = _times(sender, "s", SUBMIT_HEAD, since)
    t5 = _times(sender, "r", RESULT_HEAD, since)
    marks = _times(sender, "c", b"", since)
    n = min(len(t0), len(t5))
    hit = [False] * n
    for t in marks:
        i = bisect.bisect_right(t0, t) - 1
        if 0 <= i < n and t < t5[i]:
            hit[i] = True
    return ([t5[i] - t0[i] for i in range(n) if hit[i]],
            [t5[i] - t0[i] for i in range(n) if not hit[i]])


def _measure(rpc: Callable[[int], Any], n: int, warmup: int) -> tuple[float, int]:
    """``warmup`` rpcs, then ``n`` timed: (rpc/s, when the records start counting)."""
    for i in range(-warmup, 0):
        rpc(i)
    _records.clear()
    since = time.perf_counter_ns()
    t0 = time.perf_counter()
    for i in range(n):
        rpc(i)
    return n / (time.perf_counter() - t0), since


def _start(tmp: str, system: str, broker_cmd: list[str],
           worker_code: str) -> list[subprocess.Popen[bytes]]:
    """The broker (``broker_cmd``; its socket at ``tmp``/hops.sock), then a worker
    process running ``worker_code`` and dumping its records to ``tmp``/worker.txt."""
    procs = [subprocess.Popen(broker_cmd, stderr=subprocess.DEVNULL)]
    try:
        wait_until(lambda: os.path.exists(f"{tmp}/hops.sock"), 30, "the broker socket")
        procs.append(subprocess.Popen(_child(
            f"{worker_code}; hops.dump({tmp!r} + '/worker.txt')", system=system)))
    except BaseException:
        _stop(*procs)
        raise
    return procs


def _stop(*procs: subprocess.Popen[bytes] | None) -> None:
    for proc in procs:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def run(n: int, warmup: int, tmp: str) -> tuple[float, dict[str, list[int]]]:
    """One W1 run of ``n`` rpcs (after ``warmup``): (rpc/s, segments).

    Patches this process (:func:`install`): run it in a process of its own
    that has not imported ``sender`` yet (``python -m bench.hops``).
    """
    install()
    from sender import Sender

    _mark_looks(Sender)
    endpoint = f"ipc://{tmp}/hops.sock"
    procs = _start(
        tmp, "sqm",
        _child("import atexit; atexit.register(hops.dump, sys.argv[1]); "
               "sys.argv = ['sqm'] + sys.argv[2:]; from sqm.cli import main; main()",
               f"{tmp}/broker.txt", "serve", "hops", "--endpoint", endpoint),
        "from bench import sqm_adapter; "
        f"sqm_adapter.worker_host('hops', {endpoint!r}, 1, {tmp!r} + '/counts.json', 0)")
    try:
        with Sender("hops", endpoint=endpoint, timeout=30) as s:
            rate, since = _measure(lambda i: s.rpc(METHOD, payload(i)), n, warmup)
    finally:
        _stop(*procs)
    mine = list(_records)
    segs = segments(mine, load(f"{tmp}/broker.txt"), load(f"{tmp}/worker.txt"), since)
    with_look, without = looks(mine, since)
    segs[LOOKED] = with_look
    segs[NOT_LOOKED] = without
    return rate, segs


def run_baseline(n: int, warmup: int, tmp: str) -> tuple[float, dict[str, list[int]]]:
    """:func:`run` for the raw-pyzmq baseline (its client in this process, patched
    by :func:`install_baseline`)."""
    install_baseline()
    from bench import baseline

    endpoint = f"ipc://{tmp}/hops.sock"
    procs = _start(
        tmp, "baseline",
        _child("import atexit; atexit.register(hops.dump, sys.argv[1]); "
               "from bench import baseline; baseline.broker_main(sys.argv[2])",
               f"{tmp}/broker.txt", endpoint, system="baseline"),
        "from bench import baseline; "
        f"baseline.worker_host('hops', {endpoint!r}, 1, {tmp!r} + '/counts.json', 1)")
    try:
        client = baseline._Client(endpoint, tmp, 30_000)
        try:
            def rpc(i: int) -> None:
                client.send(i)
                client.recv()

            rate, since = _measure(rpc, n, warmup)
        finally:
            client.close()
    finally:
        _stop(*procs)
    segs = segments(list(_records), load(f"{tmp}/broker.txt"), load(f"{tmp}/worker.txt"),
                    since, BASELINE_MARKS)
    return rate, segs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="measured rpcs per run [5000]")
    ap.add_argument("--warmup", type=int, default=500, help="rpcs before measuring [500]")
    ap.add_argument("--runs", type=int, default=1, help="runs, each its own processes [1]")
    ap.add_argument("--json", metavar="FILE", help="also write each run's rate and segments (ns)")
    ap.add_argument("--system", choices=("sqm", "baseline", "both"), default="sqm",
                    help="what to trace; both: alternated, sqm first in each run [sqm]")
    args = ap.parse_args(argv)
    show: Callable[[str], None] = print
    systems = ("sqm", "baseline") if args.system == "both" else (args.system,)
    results = []
    for k in range(args.runs):
        for system in systems:
            with tempfile.TemporaryDirectory(prefix="sqm-hops-") as tmp:
                rate, segs = (run_baseline if system == "baseline" else run)(
                    args.n, args.warmup, tmp)
            results.append({"system": system, "rpc_per_s": rate, "segments": segs})
            show(f"run {k + 1}, {system}: {rate:,.0f} rpc/s\n{table(segs)}\n")
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
