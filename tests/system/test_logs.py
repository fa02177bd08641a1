"""--log-format json: every stderr line of a real `sqm serve` / `sqm worker` is one JSON object."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from datetime import datetime
from typing import Any

import pytest
import zmq

from sender import Sender
from sqm.config import resolve
from tests.conftest import REPO, Proc, wait_for

pytestmark = pytest.mark.timeout(60)

LEVELS = {"debug", "info", "warning", "error", "critical"}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+\[\d+\] [A-Z]+ ")


def json_records(proc: Proc) -> list[dict[str, Any]]:
    """Every stderr line as a record; fails on the first line that is not a JSON log object."""
    records = []
    for line in proc.stderr.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"{proc.name}: not a JSON line: {line!r}\n{proc.stderr}") from None
        assert isinstance(rec, dict), line
        assert {"ts", "level", "logger", "message", "pid"} <= rec.keys(), line
        assert rec["level"] in LEVELS, line
        datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
        records.append(rec)
    return records


def has(records: list[dict[str, Any]], level: str, logger: str, text: str) -> bool:
    return any(r["level"] == level and r["logger"] == logger and text in r["message"]
               for r in records)


def sigterm(proc: Proc) -> int:
    proc.signal(signal.SIGTERM)
    return proc.wait(15)


def test_serve_and_worker_log_one_json_object_per_line(cluster):
    serve = cluster.serve("q", "--log-format", "json")
    worker = cluster.worker("q", "--log-format", "json")
    with Sender("q") as s:
        assert s.rpc("add", {"a": 1, "b": 2}, timeout=10) == 3
    assert sigterm(worker) == 0
    assert sigterm(serve) == 0

    srv = json_records(serve)
    assert has(srv, "info", "sqm.cli", "starting"), serve.stderr
    assert has(srv, "info", "sqm.broker", "registered"), serve.stderr
    assert has(srv, "info", "sqm.broker", "queue q: stopped"), serve.stderr
    assert {r["pid"] for r in srv} == {serve.pid}

    wrk = json_records(worker)
    assert has(wrk, "info", "sqm.worker", "serving queue q"), worker.stderr
    assert has(wrk, "info", "sqm.worker", "stopped after 1 task"), worker.stderr
    assert {r["pid"] for r in wrk} == {worker.pid}


def test_worker_pool_parent_and_children_all_log_json(cluster):
    cluster.serve("q")
    pool = cluster.worker("q", "--log-format", "json", processes=2)
    assert sigterm(pool) == 0
    records = json_records(pool)
    assert has(records, "info", "sqm.pool", "worker pool of 2 process(es) started"), pool.stderr
    serving = {r["pid"] for r in records if "serving queue q" in r["message"]}
    assert len(serving) == 2 and pool.pid not in serving, pool.stderr


def test_log_level_warning_hides_info_but_not_warnings(cluster):
    serve = cluster.serve("q", "--log-format", "json", "--log-level", "warning")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(resolve("q").endpoint)
    sock.send_multipart([b"not", b"sqm"])  # malformed: sqm warns and carries on
    try:
        wait_for(lambda: "malformed" in serve.stderr, 10, "the malformed-input warning")
    finally:
        sock.close(0)
    assert sigterm(serve) == 0
    records = json_records(serve)
    assert [r["level"] for r in records if r["level"] in ("debug", "info")] == []
    assert has(records, "warning", "sqm.broker", "malformed"), serve.stderr


def test_text_is_the_default_format(cluster):
    serve = cluster.serve("q")
    assert sigterm(serve) == 0
    lines = serve.stderr.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), serve.stderr
    assert any(f"sqm.cli[{serve.pid}] INFO sqm " in line and "starting" in line for line in lines)


def test_an_unknown_log_format_is_a_one_line_usage_error(cluster):
    proc = cluster.sqm("serve", "q", "--log-format", "xml")
    assert proc.wait(15) == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "--log-format" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["main", "thread"])
def test_uncaught_exceptions_and_warnings_stay_one_json_line_each(where):
    code = f"""
import logging, threading, warnings
from sqm import logs
logs.setup("info", "json")
warnings.warn("old API")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("app").exception("caught it\\nsecond line", extra={{"queue": "q"}})
def boom():
    raise RuntimeError("boom")
if {where!r} == "thread":
    t = threading.Thread(target=boom, name="t1"); t.start(); t.join()
else:
    boom()
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    recs = [json.loads(line) for line in run.stderr.splitlines()]
    assert [r["level"] for r in recs] == ["warning", "error", "critical"], run.stderr
    assert recs[0]["logger"] == "py.warnings" and "old API" in recs[0]["message"]
    assert recs[1]["message"] == "caught it\nsecond line" and recs[1]["queue"] == "q"
    assert "ZeroDivisionError: division by zero" in recs[1]["exc_info"]
    assert "RuntimeError: boom" in recs[2]["exc_info"]
    assert recs[2]["exc_info"].startswith("Traceback (most recent call last):")
    assert ("thread t1" in recs[2]["message"]) == (where == "thread")
    assert run.returncode == (1 if where == "main" else 0)
