"""The ``sqm`` command line, run as a user would: subprocesses, real brokers.

Every error case must give exactly one line on stderr, a non-zero exit and
no traceback (SPEC, "Command line").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from sender import Sender
from tests.conftest import REPO, free_port, wait_for

pytestmark = pytest.mark.timeout(60)


def run_sqm(cluster, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
    full_env = dict(cluster.env, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "sqm", *args], env=full_env, cwd=REPO, input=stdin,
        capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], *words: str) -> str:
    """Non-zero exit, nothing on stdout, exactly one line on stderr naming ``words``."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res.stderr}"
    assert res.stdout == "", res.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ((), ["serve", "submit", "status", "worker"]),
        (("serve",), ["QUEUE", "--endpoint", "--heartbeat", "SIGTERM"]),
        (("submit",), ["METHOD", "JSON", "--input", "--timeout", "SQM_QUEUE", "--endpoint",
                       "--config"]),
        (("status",), ["QUEUE", "--json", "--endpoint", "--config", "SQM_QUEUE"]),
        (("worker",), ["MODULE:ATTR", "--processes", "--queue", "--endpoint", "--config"]),
    ],
)
def test_help(cluster, command, words):
    res = run_sqm(cluster, *command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage:"), res.stdout
    for word in words:
        assert word in res.stdout, (word, res.stdout)
    assert res.stderr == ""


# ---------------------------------------------------------------- errors, no broker


@pytest.mark.parametrize(
    "args",
    [
        ("status", "q"),
        ("status", "q", "--json"),
        ("submit", "q", "add", '{"a":1,"b":2}'),
        ("submit", "q", "add", "--input", "-"),
    ],
)
def test_no_broker_is_a_one_line_error(cluster, args):
    t0 = time.monotonic()
    res = run_sqm(cluster, *args, stdin='{"a":1,"b":2}\n')
    assert_one_line_error(res, "q")
    assert time.monotonic() - t0 < 10


def test_unreachable_tcp_broker_is_a_one_line_error(cluster):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    assert_one_line_error(run_sqm(cluster, "status", "q", "--endpoint", endpoint,
                                  "--timeout", "0.5"), endpoint)
    assert_one_line_error(run_sqm(cluster, "submit", "q", "add", '{"a":1,"b":2}',
                                  "--endpoint", endpoint, "--timeout", "0.5"))


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("submit", "add"),
        ("submit", "add", "--input", "-"),
        ("worker", "tests.apps:callbacks"),
        ("serve",),
    ],
)
def test_no_queue_is_a_one_line_error(cluster, args):
    assert "SQM_QUEUE" not in cluster.env
    res = run_sqm(cluster, *args, stdin="{}\n")
    assert_one_line_error(res, "SQM_QUEUE")


@pytest.mark.parametrize(
    ("target", "word"),
    [
        ("nosuchmodule:x", "nosuchmodule"),
        ("tests.apps:nosuchattr", "nosuchattr"),
        ("tests.apps", "MODULE:ATTR"),
        ("tests.apps:add", "neither"),  # a function, not a callbacks dict or a Worker
    ],
)
def test_worker_bad_target_is_a_one_line_error(cluster, target, word):
    assert_one_line_error(run_sqm(cluster, "worker", target, "--queue", "q"), word)


def test_serve_bad_endpoint_is_a_one_line_error(cluster):
    assert_one_line_error(run_sqm(cluster, "serve", "q", "--endpoint", "bogus://x"), "bogus://x")
    assert_one_line_error(run_sqm(cluster, "serve", "bad/name"), "bad/name")


def test_serve_a_queue_already_served_is_a_one_line_error(cluster, rundir):
    first = cluster.serve("q")
    assert_one_line_error(run_sqm(cluster, "serve", "q", "--heartbeat", "0.2"), "q")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cluster.serve("tq", endpoint=endpoint)
    assert_one_line_error(run_sqm(cluster, "serve", "tq", "--endpoint", endpoint), endpoint)
    # The first broker is untouched by the failed attempt.
    assert first.popen.poll() is None
    assert (rundir / "q.sock").exists()
    assert cluster.status("q")["queue"] == "q"


@pytest.mark.parametrize(
    "args",
    [
        ("status", "q", "--timeout", "abc"),
        ("worker", "tests.apps:callbacks", "--queue", "q", "--processes", "0"),
        ("submit", "q", "add", "1", "2", "3"),
        ("nosuchcommand",),
    ],
)
def test_bad_arguments_are_a_one_line_error(cluster, args):
    """SPEC: "Bad arguments ... give a one-line error and a non-zero exit"."""
    assert_one_line_error(run_sqm(cluster, *args))


# ---------------------------------------------------------------- with a broker


def test_submit_prints_the_reply(cluster):
    cluster.serve("q")
    cluster.worker("q")
    res = run_sqm(cluster, "submit", "q", "add", '{"a":1,"b":2}')
    assert res.returncode == 0, res.stderr
    assert res.stdout == "3\n"
    assert "Traceback" not in res.stderr

    res = run_sqm(cluster, "submit", "add", '{"a":1,"b":2}', env={"SQM_QUEUE": "q"})
    assert res.returncode == 0, res.stderr
    assert res.stdout == "3\n"

    res = run_sqm(cluster, "submit", "q", "echo", '{"k": [1, "two", null]}')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"k": [1, "two", None]}

    res = run_sqm(cluster, "status", "--json", env={"SQM_QUEUE": "q"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["assigned_total"] == 3

    # Errors with a broker running: still one line each.
    assert_one_line_error(run_sqm(cluster, "submit", "q", "add", "not json"), "JSON")
    line = assert_one_line_error(run_sqm(cluster, "submit", "q", "boom", "7"), "bad things: 7")
    assert "ValueError" in line
    assert_one_line_error(run_sqm(cluster, "submit", "q", "nosuchmethod", "{}"), "nosuchmethod")


def test_submit_input_lines_in_order_with_errors(cluster):
    cluster.serve("q")
    cluster.worker("q", processes=2)
    # Two workers and decreasing durations: replies arrive out of input order.
    lines = [
        {"s": 0.6},
        {"s": 0.0},
        {"no_s": 1},   # the callback raises KeyError
        {"s": 0.2},
    ]
    stdin = "\n".join(json.dumps(x) for x in lines) + "\n\n"
    res = run_sqm(cluster, "submit", "q", "sleep", "--input", "-", stdin=stdin)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(out) == 4, res.stdout
    assert [o.get("slept") for o in (out[0], out[1], out[3])] == [0.6, 0.0, 0.2]
    assert set(out[2]) == {"error"}
    assert out[2]["error"]["type"] == "KeyError"
    assert "no_s" not in json.dumps(out[0])
    assert {out[0]["pid"], out[1]["pid"]} <= {w["pid"] for w in cluster.status("q")["workers"]}

    # All lines fine: exit 0, one reply per line, from a file this time.
    path = cluster.rundir / "lines.jsonl"
    path.write_text("".join(json.dumps({"a": i, "b": 10}) + "\n" for i in range(20)))
    res = run_sqm(cluster, "submit", "q", "add", "--input", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(i + 10) for i in range(20)]

    # A line that is not JSON is an error line too; the others still run.
    res = run_sqm(cluster, "submit", "q", "add", "--input", "-",
                  stdin='{"a":1,"b":1}\nnot json\n{"a":2,"b":2}\n')
    assert res.returncode == 1
    out = res.stdout.splitlines()
    assert len(out) == 3 and out[0] == "2" and out[2] == "4", res.stdout
    assert "error" in json.loads(out[1])


NUMBER = (int, float)


def is_number(x: Any) -> bool:
    return isinstance(x, NUMBER) and not isinstance(x, bool)


def test_status_json_keys_types_and_values(cluster):
    before = time.time()
    cluster.serve("q")
    w = cluster.worker("q", "--prefetch", "1")  # below, the second message waits in sqm
    k = 3
    with Sender("q") as s:
        for i in range(k):
            assert s.rpc("add", {"a": i, "b": i}, timeout=5) == 2 * i
        # Each reply goes straight to us; the worker's DONE reaches sqm just after it.
        wait_for(lambda: cluster.status("q")["completed_total"] == k, 5, f"{k} completions")
        res = run_sqm(cluster, "status", "q", "--json")
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.strip().splitlines()) == 1  # one JSON object, one line
        st = json.loads(res.stdout)
        assert st["queue"] == "q"
        for key in ("started_at", "uptime_s", "utilization"):
            assert is_number(st[key]), (key, st[key])
        for key in ("pending", "in_flight", "workers_current", "workers_ever",
                    "assigned_total", "completed_total", "failed_total"):
            assert isinstance(st[key], int) and not isinstance(st[key], bool), (key, st[key])
        assert before - 1 <= st["started_at"] <= time.time()
        assert 0 <= st["uptime_s"] <= time.time() - before + 1
        assert 0.0 <= st["utilization"] <= 1.0
        assert st["pending"] == 0 and st["in_flight"] == 0
        assert st["workers_current"] == 1 and st["workers_ever"] == 1
        assert st["assigned_total"] == k
        assert st["completed_total"] == k
        assert st["failed_total"] == 0
        assert isinstance(st["workers"], list) and len(st["workers"]) == 1
        wk = st["workers"][0]
        assert isinstance(wk["id"], str) and wk["id"]
        assert wk["host"] == socket.gethostname()
        assert wk["pid"] == w.pid
        assert wk["state"] == "idle"
        assert is_number(wk["started_at"]) and before - 1 <= wk["started_at"] <= time.time()
        assert is_number(wk["idle_s"]) and wk["idle_s"] >= 0
        assert wk["tasks_done"] == k

        # One message in the worker's hands, one waiting behind it.
        busy = s.submit("sleep", {"s": 2.0}, timeout=10)
        waiting = s.submit("add", {"a": 1, "b": 1}, timeout=10)

        def busy_status() -> dict[str, Any] | None:
            res = run_sqm(cluster, "status", "q", "--json")
            assert res.returncode == 0, res.stderr
            st = json.loads(res.stdout)
            return st if st["in_flight"] == 1 and st["pending"] == 1 else None

        st = wait_for(busy_status, 10, "one message in flight and one pending")
        assert st["workers"][0]["state"] == "busy"
        assert st["workers"][0]["idle_s"] == 0
        assert st["assigned_total"] == k + 1
        assert s.receive(id=busy, timeout=10)["slept"] == 2.0
        assert s.receive(id=waiting, timeout=10) == 2
        st = wait_for(
            lambda: (lambda st: st if st["completed_total"] == k + 2 else None)(
                cluster.status("q")),
            5, "all messages completed",
        )
        assert st["assigned_total"] == k + 2
        assert st["workers"][0]["tasks_done"] == k + 2
        assert st["utilization"] > 0


def test_status_table_mentions_the_worker(cluster):
    cluster.serve("q")
    w = cluster.worker("q")
    res = run_sqm(cluster, "status", "q")
    assert res.returncode == 0, res.stderr
    assert "q" in res.stdout.splitlines()[0]
    assert str(w.pid) in res.stdout
    assert socket.gethostname()[:16] in res.stdout
    res_env = run_sqm(cluster, "status", env={"SQM_QUEUE": "q"})
    assert res_env.returncode == 0 and str(w.pid) in res_env.stdout
    assert os.path.exists(cluster.rundir / "q.sock")
