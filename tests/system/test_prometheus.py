"""Prometheus /metrics, /status.json and /history.json: the collector on hand-made
snapshots, the HTTP server on a fake snapshot, and a real ``sqm serve --metrics-port``."""

from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sqm.web
from sender import Sender
from sqm.web.collector import SqmCollector
from sqm.web.server import History
from tests.conftest import Cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(60)

INF = float("inf")


def hist(count: int, total: float, buckets: list[list[Any]]) -> dict[str, Any]:
    return {"count": count, "sum": total, "p50": 0.01, "p90": 0.02, "p99": 0.05, "buckets": buckets}


def fake_status(queue: str = "q", workers: int = 3, completed: int = 40, **over: Any) -> dict[str, Any]:
    """A status dict shaped like ``sqm status --json`` plus the metrics fields."""
    st: dict[str, Any] = {
        "queue": queue, "endpoint": f"ipc:///tmp/{queue}.sock", "started_at": 1_700_000_000.0,
        "uptime_s": 12.5, "pending": 7, "in_flight": 2,
        "workers": [
            {"id": f"{queue}-w{i}", "host": "box", "pid": 4000 + i, "state": "busy" if i else "idle",
             "started_at": 1_700_000_000.0, "idle_s": 0.5, "tasks_done": 10 + i,
             "rss_bytes": 20_000_000 + i, "nice": 0, "busy_s": 1.5}
            for i in range(workers)
        ],
        "workers_current": workers, "workers_ever": workers + 1,
        "assigned_total": completed + 5, "completed_total": completed, "failed_total": 3,
        "expired_total": 4, "rejected_total": 5, "redelivered_total": 6, "malformed_total": 8,
        "send_dropped_total": 9, "utilization": 0.25,
        "dispatch_batches_total": 10, "dispatch_batched_total": 11,
        "latency": {
            "queue_wait": hist(43, 0.5, [[0.001, 10], [0.01, 30], [0.1, 43], [INF, 43]]),
            "service": hist(40, 2.0, [[0.01, 5], [0.1, 39], [1.0, 40], [INF, 40]]),
        },
        "methods": {
            "add": {"assigned_total": 30, "completed_total": 28, "failed_total": 2,
                    "latency": {"queue_wait": hist(30, 0.1, [[0.01, 29], [INF, 30]]),
                                "service": hist(28, 0.7, [[0.1, 27], [INF, 28]])}},
            "echo": {"assigned_total": 15, "completed_total": 12, "failed_total": 1,
                     "latency": {"queue_wait": hist(13, 0.4, [[0.01, 9], [INF, 13]]),
                                 "service": hist(12, 1.3, [[0.1, 10], [INF, 12]])}},
        },
    }
    st.update(over)
    return st


def scrape(snapshot: dict[str, dict[str, Any]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Collector -> exposition text -> parsed back: {(sample name, sorted labels): value}."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SqmCollector(lambda: snapshot))
    return parse(generate_latest(reg).decode())


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def q(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def http_get(url: str, accept: str | None = None, timeout: float = 5.0) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def strict_json(body: bytes) -> Any:
    """What a browser's JSON.parse accepts: no Infinity or NaN."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(body, parse_constant=refuse)


def serve_with_metrics(cluster: Cluster, queue: str = "q", *args: str) -> int:
    """A real ``sqm serve --metrics-port``; returns the port once /metrics answers."""
    port = free_port()
    proc = cluster.serve(queue, "--metrics-port", str(port), *args)

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"sqm serve exited:\n{proc.stderr}")
        try:
            return http_get(f"http://127.0.0.1:{port}/metrics", timeout=1)[0] == 200
        except OSError:
            return False

    wait_for(up, 10, f"/metrics on port {port}")
    return port


@pytest.fixture
def fake() -> Iterator[tuple[Any, dict[str, dict[str, Any]]]]:
    """A metrics server on a free port over a snapshot the test can change."""
    snap: dict[str, dict[str, Any]] = {"q": fake_status("q")}
    server = sqm.web.start("127.0.0.1", 0, lambda: snap, sample_every=0.05, history_s=2.0)
    try:
        yield server, snap
    finally:
        server.close()


# ---------------------------------------------------------------- the collector


def test_collector_exposes_every_figure_with_a_queue_label():
    m = scrape({"q": fake_status("q"), "other": fake_status("other", workers=1, completed=2)})
    expect = {
        "sqm_pending_messages": 7, "sqm_in_flight_messages": 2, "sqm_workers": 3,
        "sqm_workers_ever": 4, "sqm_workers_busy": 2, "sqm_uptime_seconds": 12.5,
        "sqm_utilization_ratio": 0.25, "sqm_messages_assigned_total": 45,
        "sqm_messages_completed_total": 40, "sqm_messages_failed_total": 3,
        "sqm_messages_expired_total": 4, "sqm_messages_rejected_total": 5,
        "sqm_messages_redelivered_total": 6, "sqm_messages_malformed_total": 8,
        "sqm_sends_dropped_total": 9, "sqm_dispatch_batches_total": 10,
        "sqm_dispatch_batched_messages_total": 11,
    }
    for name, value in expect.items():
        assert m[(name, q(queue="q"))] == value, name
    assert m[("sqm_workers", q(queue="other"))] == 1
    assert m[("sqm_messages_completed_total", q(queue="other"))] == 2
    assert m[("sqm_workers_busy", q(queue="other"))] == 0


def test_collector_histograms_are_cumulative_with_inf_equal_to_count():
    m = scrape({"q": fake_status()})
    wait = {le: m[("sqm_queue_wait_seconds_bucket", q(queue="q", le=le))]
            for le in ("0.001", "0.01", "0.1", "+Inf")}
    assert wait == {"0.001": 10, "0.01": 30, "0.1": 43, "+Inf": 43}
    assert m[("sqm_queue_wait_seconds_count", q(queue="q"))] == 43
    assert m[("sqm_queue_wait_seconds_sum", q(queue="q"))] == 0.5
    assert m[("sqm_service_seconds_bucket", q(queue="q", le="1.0"))] == 40
    assert m[("sqm_service_seconds_count", q(queue="q"))] == 40
    assert m[("sqm_service_seconds_sum", q(queue="q"))] == 2.0


def test_collector_per_method_families_carry_a_method_label():
    m = scrape({"q": fake_status()})
    assert m[("sqm_method_messages_assigned_total", q(queue="q", method="add"))] == 30
    assert m[("sqm_method_messages_completed_total", q(queue="q", method="echo"))] == 12
    assert m[("sqm_method_messages_failed_total", q(queue="q", method="add"))] == 2
    assert m[("sqm_method_service_seconds_count", q(queue="q", method="add"))] == 28
    assert m[("sqm_method_queue_wait_seconds_bucket", q(queue="q", method="echo", le="+Inf"))] == 13
    # the whole-queue families never get a method label (sums would double-count)
    assert not [k for k in m if k[0].startswith("sqm_service") and "method" in dict(k[1])]


def test_collector_tolerates_an_older_status_without_the_new_keys():
    st = fake_status()
    for key in ("latency", "methods", "expired_total", "rejected_total", "redelivered_total",
                "malformed_total", "send_dropped_total"):
        del st[key]
    for w in st["workers"]:
        del w["rss_bytes"], w["nice"], w["busy_s"]
    m = scrape({"q": st})
    assert m[("sqm_messages_completed_total", q(queue="q"))] == 40
    assert m[("sqm_workers", q(queue="q"))] == 3
    names = {k[0] for k in m}
    assert not [n for n in names if "seconds_bucket" in n or n.startswith("sqm_method")]
    assert "sqm_messages_expired_total" not in names


def test_collector_reads_json_spellings_of_inf_and_mends_bad_buckets():
    st = json.loads(sqm.web.server.to_json({"q": fake_status()}))["q"]
    assert st["latency"]["queue_wait"]["buckets"][-1][0] == "+Inf"
    st["latency"]["service"]["buckets"] = [[1.0, 40], [0.01, 5], ["junk", 1], [0.1], [0.1, 39]]
    st["methods"]["add"]["latency"]["service"] = {"count": 28}  # no sum, no buckets
    m = scrape({"q": st})
    assert m[("sqm_queue_wait_seconds_bucket", q(queue="q", le="+Inf"))] == 43
    svc = [(dict(k[1])["le"], v) for k, v in m.items() if k[0] == "sqm_service_seconds_bucket"]
    assert svc == [("0.01", 5), ("0.1", 39), ("1.0", 40), ("+Inf", 40)]
    assert m[("sqm_method_service_seconds_bucket", q(queue="q", method="add", le="+Inf"))] == 28
    assert m[("sqm_method_service_seconds_sum", q(queue="q", method="add"))] == 0


def test_collector_reads_the_snapshot_once_per_scrape_and_not_before():
    calls = []

    def snapshot() -> dict[str, dict[str, Any]]:
        calls.append(1)
        return {"q": fake_status()}

    reg = CollectorRegistry(auto_describe=False)
    reg.register(SqmCollector(snapshot))
    assert calls == []
    generate_latest(reg)
    generate_latest(reg)
    assert len(calls) == 2


# ---------------------------------------------------------------- the HTTP server


def test_server_serves_metrics_status_history_and_the_page(fake):
    server, snap = fake
    base = f"http://127.0.0.1:{server.port}"
    assert server.port > 0 and server.url == base + "/"

    code, ctype, body = http_get(base + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    m = parse(body.decode())
    assert m[("sqm_messages_completed_total", q(queue="q"))] == 40
    assert ("process_resident_memory_bytes", ()) in m  # the broker's own figures too

    code, ctype, body = http_get(base + "/status.json")
    assert code == 200 and ctype == "application/json"
    st = strict_json(body)
    assert st["q"]["workers"][0]["pid"] == 4000
    assert st["q"]["latency"]["service"]["buckets"][-1] == ["+Inf", 40]

    snap["q"]["completed_total"] = 41  # the next scrape sees the change: no caching
    assert parse(http_get(base + "/metrics")[2].decode())[
        ("sqm_messages_completed_total", q(queue="q"))] == 41

    hist_all = wait_for(lambda: (h := strict_json(http_get(base + "/history.json")[2]))
                        ["samples"][2:] and h, 5, "three history samples")
    samples = hist_all["samples"]
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    assert samples[-1]["queues"]["q"]["workers"] == 3
    assert hist_all["interval"] == 0.05 and hist_all["window_s"] == 2.0
    since = samples[-2]["t"]
    later = strict_json(http_get(f"{base}/history.json?since={since}")[2])["samples"]
    assert later and all(s["t"] > since for s in later)

    code, ctype, body = http_get(base + "/")
    assert code == 200 and ctype.startswith("text/html")
    assert b"sqm dashboard" in body and b"https://" not in body and b"http://" not in body

    assert http_get(base + "/nothing-here")[0] == 404


def test_server_history_is_a_bounded_ring(fake):
    server, _ = fake  # 2 s of history at 0.05 s: at most 40 samples
    base = f"http://127.0.0.1:{server.port}"
    # more time than the window: the ring has filled and started dropping the oldest
    first = strict_json(http_get(base + "/history.json")[2])["samples"][0]["t"]
    wait_for(lambda: strict_json(http_get(base + "/history.json")[2])["samples"][0]["t"] > first,
             10, "the oldest sample to fall out of the ring")
    assert len(strict_json(http_get(base + "/history.json")[2])["samples"]) <= 40


def test_history_stamps_samples_with_the_snapshots_own_time():
    h = History(10)
    now = 1_800_000_000.0
    live = {"q": fake_status(started_at=now - 100, uptime_s=99.5, completed=1)}
    h.add(now, live)
    h.add(now + 0.4, live)  # the broker has not refreshed: the same snapshot, counted once
    h.add(now + 1.0, {"q": fake_status(started_at=now - 100, uptime_s=100.5, completed=9)})
    assert [(s["t"], s["queues"]["q"]["completed"]) for s in h.since(0)] == [
        (now - 0.5, 1), (now + 0.5, 9)]
    h.add(now + 2, {"q": fake_status()})  # a canned figure far from now: our clock instead
    assert h.since(now + 0.5)[0]["t"] == now + 2
    h.add(now - 60, {"q": fake_status()})  # the clock stepped back: a new timeline
    h.add(now - 59, {})  # an empty snapshot (none taken yet) is no sample
    assert [s["t"] for s in h.since(0)] == [now - 60]


def test_server_speaks_openmetrics_when_asked(fake):
    server, _ = fake
    code, ctype, body = http_get(f"http://127.0.0.1:{server.port}/metrics",
                                 accept="application/openmetrics-text; version=1.0.0")
    assert code == 200 and ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    assert b'sqm_messages_completed_total{queue="q"} 40.0' in body


def test_server_a_failing_snapshot_is_a_500_and_the_server_lives_on():
    broken = [True]

    def snapshot() -> dict[str, dict[str, Any]]:
        if broken[0]:
            raise RuntimeError("broker busy")
        return {"q": fake_status()}

    with sqm.web.start("127.0.0.1", 0, snapshot) as server:
        base = f"http://127.0.0.1:{server.port}"
        code, _, body = http_get(base + "/metrics")
        assert code == 500 and b"broker busy" in body
        assert http_get(base + "/status.json")[0] == 500
        assert strict_json(http_get(base + "/history.json")[2])["samples"] == []
        broken[0] = False
        assert http_get(base + "/metrics")[0] == 200


def test_server_close_frees_the_port_and_a_taken_port_is_an_oserror():
    server = sqm.web.start("127.0.0.1", 0, lambda: {})
    port = server.port
    with pytest.raises(OSError):
        sqm.web.start("127.0.0.1", port, lambda: {})
    server.close()
    server.close()  # twice is fine
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = sqm.web.start("127.0.0.1", port, lambda: {})
    assert again.port == port
    again.close()


def test_server_json_has_no_infinity_or_nan():
    body = sqm.web.server.to_json({"a": [INF, -INF, math.nan, 1.5], "b": {"c": INF}})
    assert strict_json(body) == {"a": ["+Inf", "-Inf", None, 1.5], "b": {"c": "+Inf"}}


# ---------------------------------------------------------------- a real sqm


def test_sqm_serve_metrics_port_counts_real_messages(cluster):
    port = serve_with_metrics(cluster, "q")
    cluster.worker("q")
    n = 25
    with Sender("q") as s:
        for i in range(n):
            assert s.rpc("add", {"a": i, "b": 1}, timeout=10) == i + 1
    url = f"http://127.0.0.1:{port}/metrics"

    def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        m = parse(http_get(url)[2].decode())
        return m if m.get(("sqm_messages_completed_total", q(queue="q"))) == n else None

    m = wait_for(settled, 10, f"completed_total == {n} on /metrics")
    assert m[("sqm_workers", q(queue="q"))] == 1
    assert m[("sqm_pending_messages", q(queue="q"))] == 0
    assert m[("sqm_messages_assigned_total", q(queue="q"))] == n
    assert m[("sqm_messages_failed_total", q(queue="q"))] == 0
    assert m[("sqm_service_seconds_count", q(queue="q"))] == n
    assert m[("sqm_queue_wait_seconds_bucket", q(queue="q", le="+Inf"))] == n
    assert m[("sqm_method_messages_completed_total", q(queue="q", method="add"))] == n
    st = strict_json(http_get(f"http://127.0.0.1:{port}/status.json")[2])
    assert st["q"]["completed_total"] == n and st["q"]["workers"][0]["tasks_done"] == n
