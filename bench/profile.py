"""Where each process's Python time goes in one workload: ``python -m bench.profile``.

Wall-clock ratios swing ±20 % between identical runs on a shared 2-core VM,
and CPU seconds per process ±10 %; a change of a few µs per message hides
in both. This runs ``python -m bench`` for one workload under py-spy
(``--subprocesses --gil``: a sample counts only while a thread holds the
GIL, i.e. runs Python), then splits the samples by process kind (sender,
broker, workers) and gives each kind's GIL-held µs per message, plus the
lines of our own code (``sqm/``, ``sender/``, ``worker/``) where they were
taken. Imports (start-up) are left out.

    python -m bench.profile --only W2                    # this checkout
    python -m bench.profile --only W2 --tree /tmp/base --tree . --pairs 3

With several ``--tree`` (git worktrees) and ``--pairs N`` it alternates
them N times and ends with each one's medians, so drift hits all alike
(as ``python -m bench.compare`` does for throughput). Needs ``py-spy``
(``pip install py-spy``); the workload runs with ``--repeat 1``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Process kinds, told apart by a frame or the command line in the stack.
KINDS = (("broker", " serve bench"), ("broker", "broker_main"), ("workers", "worker_host"), ("sender", "sender_main"))
OWN = ("sqm/", "sender/", "worker/")


def kind_of(stack: str) -> str:
    """``sender``, ``broker``, ``workers`` or ``other`` (the bench's own driver)."""
    for kind, mark in KINDS:
        if mark in stack:
            return kind
    return "other"


def split(lines: Iterable[str]) -> tuple[collections.Counter[str], dict[str, collections.Counter[str]]]:
    """(samples per kind, per kind: samples per deepest own-code frame) of py-spy raw output.

    A raw line is ``frame;frame;... count``; start-up imports are skipped.
    """
    totals: collections.Counter[str] = collections.Counter()
    where: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or "_find_and_load" in stack:
            continue
        n = int(count)
        kind = kind_of(stack)
        totals[kind] += n
        for frame in reversed(stack.split(";")):
            if any(own in frame for own in OWN):
                where[kind][frame.strip()] += n
                break
    return totals, where


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="W2", help="one workload, as for python -m bench [W2]")
    ap.add_argument("--systems", default="sqm", help="systems to run [sqm]")
    ap.add_argument("--tree", action="append", help="checkout to run from, repeatable [.]")
    ap.add_argument("--pairs", type=int, default=1, help="runs of each tree, alternated [1]")
    ap.add_argument("--rate", type=int, default=250, help="samples per second [250]")
    ap.add_argument("--top", type=int, default=12, help="own-code lines shown per kind [12]")
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    trees = args.tree or ["."]
    seen: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    for i in range(args.pairs):
        for tree in trees:
            got = profile_once(spy, tree, args, show=i == 0)
            if got is None:
                return 1
            seen[tree].append(got)
    if args.pairs > 1 or len(trees) > 1:
        print(f"\n{args.only}: GIL-held µs per message, median of {args.pairs} run(s)")
        for tree, runs in seen.items():
            print(f"  {tree}: " + "  ".join(
                f"{k} {statistics.median(r[k] for r in runs):.1f}" for k in (*PARTS, "total"))
                  + "   (runs: " + ", ".join(f"{r['total']:.1f}" for r in runs) + ")")
    return 0


PARTS = ("sender", "broker", "workers")


def profile_once(spy: str, tree: str, args: argparse.Namespace,
                 show: bool) -> dict[str, float] | None:
    """One profiled run from ``tree``: µs per message by kind (None if it failed)."""
    tmp = Path(tempfile.mkdtemp(prefix="sqm-profile-"))
    try:
        raw, out = tmp / "samples.txt", tmp / "results.json"
        cmd = [spy, "record", "--subprocesses", "--nonblocking", "--gil", "-r", str(args.rate),
               "-f", "raw", "-o", str(raw), "--", sys.executable, "-m", "bench", "--only",
               args.only, "--systems", args.systems, "--repeat", "1", "--out", str(out)]
        subprocess.run(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        if not raw.exists() or not out.exists():
            print(f"{tree}: the profiled run left no samples or results", file=sys.stderr)
            return None
        messages = 0
        for r in json.loads(out.read_text())["results"]:
            if r["status"] != "ok":
                print(f"{tree}: {r['system']} {r['workload']}: {r['status']}", file=sys.stderr)
                return None
            details = r.get("details", {})
            messages += int(details.get("n", 0)) + int(details.get("warmup_n", 0))
        with raw.open() as f:
            totals, where = split(f)
        us = 1e6 / args.rate / max(1, messages)
        got = {k: totals[k] * us for k in PARTS}
        got["total"] = sum(got.values())
        print(f"{args.only} on {args.systems} from {tree}: {messages} messages "
              "(measured + warm-up), GIL-held µs per message: "
              + "  ".join(f"{k} {v:.1f}" for k, v in got.items()), flush=True)
        if show:
            for kind in PARTS:
                print(f"  {kind}: where (deepest line of our own code), µs per message")
                for frame, n in where[kind].most_common(args.top):
                    print(f"    {n * us:6.2f}  {frame}")
        return got
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
