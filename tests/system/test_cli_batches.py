"""``sqm submit QUEUE METHOD --input FILE|- --concurrency N``: a batch from the shell.

Results stream out as JSON lines in input order, failures as error objects
in place; stderr ends with ``N ok, M failed in S s`` and shows a progress
bar only when it is a terminal.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest

from sqm.cli import batch_summary
from tests.apps.batch import max_concurrency
from tests.conftest import REPO, read_log

pytestmark = pytest.mark.timeout(90)

APPS = "tests.apps.batch:callbacks"
SUMMARY = re.compile(r"^(\d+) ok, (\d+) failed in (\d+\.\d\d) s$")


def run_sqm(cluster, *args: str, stdin: str | None = None,
            timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqm", *args], env=cluster.env, cwd=REPO, input=stdin,
        capture_output=True, text=True, timeout=timeout,
    )


def summary(stderr: str) -> tuple[int, int, float]:
    last = stderr.strip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, f"no summary line at the end of stderr:\n{stderr}"
    return int(m[1]), int(m[2]), float(m[3])


def test_summary_line_format():
    assert batch_summary(3, 1, 0.5) == "3 ok, 1 failed in 0.50 s"
    assert batch_summary(0, 0, 12.345) == "0 ok, 0 failed in 12.35 s"
    assert SUMMARY.match(batch_summary(1000, 25, 61.0))


def test_input_file_in_order_with_failures_in_place(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=2)
    xs = [7, 3, -2, 5, 0, -9, 11, 4] * 4
    lines = [json.dumps({"x": x, "s": 0.03 if x % 2 else 0}) for x in xs]
    lines.insert(5, "not json")  # an unparsable line fails in its place too
    lines.insert(9, "")  # blank lines are skipped
    path = cluster.rundir / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = run_sqm(cluster, "submit", "q", "square", "--input", str(path), "--concurrency", "4")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    out = [json.loads(line) for line in res.stdout.splitlines()]
    expected = [x * x if x >= 0 else ("ValueError", f"negative: {x}") for x in xs]
    expected.insert(5, ("SQMError", None))
    assert len(out) == len(expected) == 33
    for got, want in zip(out, expected, strict=True):
        if isinstance(want, tuple):
            assert set(got) == {"error"}, got
            assert got["error"]["type"] == want[0]
            if want[1]:
                assert got["error"]["message"].endswith(want[1])
        else:
            assert got == want
    ok, failed, seconds = summary(res.stderr)
    assert (ok, failed) == (24, 9)
    assert 0 < seconds < 40
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # no bar: not a terminal


def test_stdin_all_ok_exits_zero(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS)
    stdin = "".join(f"{i}\n" for i in range(50))
    res = run_sqm(cluster, "submit", "q", "square", "--input", "-", stdin=stdin)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(i * i) for i in range(50)]
    assert summary(res.stderr)[:2] == (50, 0)


def test_concurrency_is_the_window_at_the_workers(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS, processes=6)
    stdin = "".join(json.dumps({"x": i, "s": 0.25}) + "\n" for i in range(12))
    res = run_sqm(cluster, "submit", "q", "tracked", "--input", "-", "--concurrency", "2",
                  stdin=stdin)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(i * i) for i in range(12)]
    assert max_concurrency(read_log(cluster.log)) == 2


def test_progress_bar_when_stderr_is_a_terminal(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS)
    path = cluster.rundir / "in.jsonl"
    path.write_text("".join(f"{i}\n" for i in range(20)))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqm", "submit", "q", "square", "--input", str(path)],
        env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    stdout = proc.stdout.read()
    assert proc.wait(30) == 0
    assert stdout.splitlines() == [str(i * i) for i in range(20)]
    terminal = seen.decode(errors="replace")
    assert "20/20" in terminal and "100%" in terminal, terminal
    assert summary(terminal.replace("\r\n", "\n").split("\r")[-1])[:2] == (20, 0)


def test_oneway_input_prints_ids_and_a_summary(cluster):
    cluster.serve("q")
    cluster.worker("q", target=APPS)
    res = run_sqm(cluster, "submit", "q", "record", "--input", "-", "--oneway",
                  stdin='{"n": 1}\nnope\n{"n": 2}\n')
    assert res.returncode == 1
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert isinstance(out[0], str) and isinstance(out[2], str) and "error" in out[1]
    assert summary(res.stderr)[:2] == (2, 1)


def test_bad_concurrency_is_a_one_line_error(cluster):
    cluster.serve("q")
    res = run_sqm(cluster, "submit", "q", "square", "--input", "-", "--concurrency", "0",
                  stdin="1\n")
    assert res.returncode != 0 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "concurrency" in res.stderr
    assert "Traceback" not in res.stderr
