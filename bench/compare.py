"""Before/after of two git revisions, alternated in one session: ``python -m bench.compare``.

A change to the hot path is judged by the same-run ratio to the baseline,
but on a shared 2-core VM one run swings by ±20 %. This runs ``python -m
bench`` from a worktree of each revision in turn (before, after, before,
after, ...), so drift over the session hits both alike, and prints every
pair's sqm/baseline ratios, their means and the difference.

    python -m bench.compare b9fc0d6 HEAD --only W3 --pairs 3
    python -m bench.compare b9fc0d6 HEAD --only W1,W2,W3 --pairs 2 -- --repeat 3

Arguments after ``--`` go to every ``python -m bench`` run (default:
``--repeat 3``). Worktrees live in a temp dir and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The throughput or latency figure each workload is judged by.
KEY = {"W1": "rpc_per_s", "W3": "tasks_per_s"}


def ratios(path: Path, system: str) -> dict[str, float]:
    """``{workload: ratio to the baseline}`` of ``system`` in one results file,
    with ``"<workload> p99"`` where the workload has a latency tail (W1); W8
    (no baseline: its reference is W8-p1 of the same run) as its short messages'
    p99 over W8-p1's. For both, lower is better."""
    out: dict[str, float] = {}
    for r in json.loads(path.read_text())["results"]:
        if r["system"] == system and r["status"] == "ok":
            key = KEY.get(r["workload"], "tasks_per_s")
            if key in r["ratios"]:
                out[r["workload"]] = r["ratios"][key]
                if "p99_us" in r["ratios"]:  # W1's tail (lower is better)
                    out[f"{r['workload']} p99"] = r["ratios"]["p99_us"]
            elif "x_p1_short_p99" in r["metrics"]:
                out[f"{r['workload']} p99/p1"] = r["metrics"]["x_p1_short_p99"]
    return out


def cpu_per_message(path: Path, system: str) -> dict[str, dict[str, float]]:
    """``{workload: {process group: CPU µs per message}}`` of ``system`` in one results file.

    CPU seconds per message hardly move with the wall-clock noise (steal,
    a neighbour's burst) that swings same-run throughput ratios by ±20 %
    on a shared VM, so a hot-path change shows here first.
    """
    out: dict[str, dict[str, float]] = {}
    for r in json.loads(path.read_text())["results"]:
        if r["system"] != system or r["status"] != "ok":
            continue
        row = {k[len("cpu_us_"):]: v for k, v in r["metrics"].items() if k.startswith("cpu_us_")}
        if row:
            row["total"] = sum(row.values())
            out[r["workload"]] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = ["--repeat", "3"]
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    ap.add_argument("before", help="git revision measured first in every pair")
    ap.add_argument("after", help="git revision measured second in every pair")
    ap.add_argument("--only", default="W3", help="workloads, as for python -m bench [W3]")
    ap.add_argument("--system", default="sqm", help="system whose ratios are compared [sqm]")
    ap.add_argument("--pairs", type=int, default=3, help="before/after pairs [3]")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="sqm-compare-"))
    trees = {}
    try:
        for name, rev in (("before", args.before), ("after", args.after)):
            trees[name] = tmp / name
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", "--detach",
                            str(trees[name]), rev], check=True, capture_output=True)
        seen: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
        cpu: dict[str, dict[str, dict[str, list[float]]]] = {"before": {}, "after": {}}
        for i in range(args.pairs):
            for name in ("before", "after"):
                out = tmp / f"{name}-{i}.json"
                cmd = [sys.executable, "-m", "bench", "--only", args.only, "--systems",
                       f"baseline,{args.system}", "--out", str(out), *extra]
                subprocess.run(cmd, cwd=trees[name], stdout=subprocess.DEVNULL, check=False)
                got = ratios(out, args.system) if out.exists() else {}
                for wl, value in got.items():
                    seen[name].setdefault(wl, []).append(value)
                use = cpu_per_message(out, args.system) if out.exists() else {}
                for wl, row in use.items():
                    for part, us in row.items():
                        cpu[name].setdefault(wl, {}).setdefault(part, []).append(us)
                print(f"pair {i + 1} {name:<6} " + "  ".join(
                    f"{wl} {v:.2f}x ({use.get(wl, {}).get('total', 0):.1f} µs CPU/msg)"
                    for wl, v in sorted(got.items())), flush=True)
        print(f"\n{args.system} / baseline, same run: before {args.before}, after {args.after}")
        for wl in sorted(set(seen["before"]) | set(seen["after"])):
            b, a = seen["before"].get(wl, []), seen["after"].get(wl, [])
            if b and a:
                mb, ma = statistics.mean(b), statistics.mean(a)
                print(f"{wl}: before {', '.join(f'{x:.2f}' for x in b)} (mean {mb:.2f}); "
                      f"after {', '.join(f'{x:.2f}' for x in a)} (mean {ma:.2f}); "
                      f"{100 * (ma / mb - 1):+.1f} %")
        print(f"\n{args.system} CPU µs per message (median over pairs), before -> after")
        for wl in sorted(set(cpu["before"]) & set(cpu["after"])):
            parts = cpu["before"][wl]
            print(f"{wl}: " + "; ".join(
                f"{part} {statistics.median(parts[part]):.1f} -> "
                f"{statistics.median(cpu['after'][wl].get(part, [0.0])):.1f}"
                for part in sorted(parts)))
        return 0
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
