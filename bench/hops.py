"""Where one rpc's time goes, hop by hop: ``python -m bench.hops``.

W1 (one Sender, one worker, sequential rpcs) with every send and receive of
``sqm.zmqfast`` timestamped in the Sender, sqm and the worker
(``time.perf_counter_ns``: CLOCK_MONOTONIC, one clock for the machine's
processes). Each compact message's first bytes tell what it is, so the
k-th SUBMIT, DISPATCH and RESULT of each process belong to the k-th rpc,
and the table splits an rpc into the three processes' own time and the
three hops between them. The patch costs ~0.5 µs per call: compare runs
of this tool with each other, not with ``python -m bench``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import METHOD, payload, wait_until, write_json_atomic

#: (ns, "s" or "r", the frame's first bytes), per send/receive of this process.
Record = tuple[int, str, bytes]
_records: list[Record] = []
_HEAD = 6  # bytes kept per frame: enough for "SQM1" + a command letter

SUBMIT_HEAD = b"SQM1s"  # protocol.COMPACT_SUBMIT: also the DISPATCH
RESULT_HEAD = b"SQM1y"  # protocol.COMPACT_RESULT
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
             since: int) -> dict[str, list[int]]:
    """Each rpc's six segments (ns) from the three processes' records after ``since``."""
    t0 = _times(sender, "s", SUBMIT_HEAD, since)
    t1 = _times(broker, "r", SUBMIT_HEAD, since)
    t2 = _times(broker, "s", SUBMIT_HEAD, since)
    t3 = _times(worker, "r", SUBMIT_HEAD, since)
    t4 = _times(worker, "s", RESULT_HEAD, since)
    t5 = _times(sender, "r", RESULT_HEAD, since)
    n = min(map(len, (t0, t1, t2, t3, t4, t5)))
    marks = (t0, t1, t2, t3, t4, t5)
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
              for name, v in segs.items() if v]
    return "\n".join(lines)


def _child(code: str, *argv: str) -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pre = f"import sys; sys.path.insert(0, {root!r}); from bench import hops; hops.install(); "
    return [sys.executable, "-c", pre + code, *argv]


def run(n: int, warmup: int, tmp: str) -> tuple[float, dict[str, list[int]]]:
    """One W1 run of ``n`` rpcs (after ``warmup``): (rpc/s, segments).

    Patches this process (:func:`install`): run it in a process of its own
    that has not imported ``sender`` yet (``python -m bench.hops``).
    """
    install()
    from sender import Sender

    endpoint = f"ipc://{tmp}/hops.sock"
    broker = subprocess.Popen(
        _child("import atexit; atexit.register(hops.dump, sys.argv[1]); "
               "sys.argv = ['sqm'] + sys.argv[2:]; from sqm.cli import main; main()",
               f"{tmp}/broker.txt", "serve", "hops", "--endpoint", endpoint),
        stderr=subprocess.DEVNULL)
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: os.path.exists(f"{tmp}/hops.sock"), 30, "the broker socket")
        worker = subprocess.Popen(_child(
            "from bench import sqm_adapter; "
            f"sqm_adapter.worker_host('hops', {endpoint!r}, 1, {tmp!r} + '/counts.json', 0); "
            f"hops.dump({tmp!r} + '/worker.txt')"))
        with Sender("hops", endpoint=endpoint, timeout=30) as s:
            for i in range(-warmup, 0):
                s.rpc(METHOD, payload(i))
            _records.clear()
            since = time.perf_counter_ns()
            t0 = time.perf_counter()
            for i in range(n):
                s.rpc(METHOD, payload(i))
            rate = n / (time.perf_counter() - t0)
    finally:
        for proc in (worker, broker):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    segs = segments(list(_records), load(f"{tmp}/broker.txt"), load(f"{tmp}/worker.txt"), since)
    return rate, segs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="measured rpcs per run [5000]")
    ap.add_argument("--warmup", type=int, default=500, help="rpcs before measuring [500]")
    ap.add_argument("--runs", type=int, default=1, help="runs, each its own processes [1]")
    ap.add_argument("--json", metavar="FILE", help="also write each run's rate and segments (ns)")
    args = ap.parse_args(argv)
    show: Callable[[str], None] = print
    results = []
    for k in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sqm-hops-") as tmp:
            rate, segs = run(args.n, args.warmup, tmp)
        results.append({"rpc_per_s": rate, "segments": segs})
        show(f"run {k + 1}: {rate:,.0f} rpc/s\n{table(segs)}\n")
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
