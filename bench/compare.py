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
    """``{workload: ratio to the baseline}`` of ``system`` in one results file."""
    out: dict[str, float] = {}
    for r in json.loads(path.read_text())["results"]:
        if r["system"] == system and r["status"] == "ok":
            key = KEY.get(r["workload"], "tasks_per_s")
            if key in r["ratios"]:
                out[r["workload"]] = r["ratios"][key]
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
        for i in range(args.pairs):
            for name in ("before", "after"):
                out = tmp / f"{name}-{i}.json"
                cmd = [sys.executable, "-m", "bench", "--only", args.only, "--systems",
                       f"baseline,{args.system}", "--out", str(out), *extra]
                subprocess.run(cmd, cwd=trees[name], stdout=subprocess.DEVNULL, check=False)
                got = ratios(out, args.system) if out.exists() else {}
                for wl, value in got.items():
                    seen[name].setdefault(wl, []).append(value)
                print(f"pair {i + 1} {name:<6} " + "  ".join(
                    f"{wl} {v:.2f}x" for wl, v in sorted(got.items())), flush=True)
        print(f"\n{args.system} / baseline, same run: before {args.before}, after {args.after}")
        for wl in sorted(set(seen["before"]) | set(seen["after"])):
            b, a = seen["before"].get(wl, []), seen["after"].get(wl, [])
            if b and a:
                mb, ma = statistics.mean(b), statistics.mean(a)
                print(f"{wl}: before {', '.join(f'{x:.2f}' for x in b)} (mean {mb:.2f}); "
                      f"after {', '.join(f'{x:.2f}' for x in a)} (mean {ma:.2f}); "
                      f"{100 * (ma / mb - 1):+.1f} %")
        return 0
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
