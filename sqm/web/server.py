"""The metrics HTTP server: /metrics, /status.json, /history.json and the dashboard.

It runs in daemon threads beside the broker and only ever calls
``snapshot()``: on each request, and once per ``sample_every`` seconds to fill
a ring buffer, so a freshly opened dashboard shows the last minutes at once.
``snapshot`` must therefore be safe to call from any thread.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from .collector import Snapshot, SqmCollector

log = logging.getLogger("sqm.web")

# What each history sample keeps per queue: short key -> status key.
SAMPLE_KEYS = {
    "pending": "pending",
    "in_flight": "in_flight",
    "workers": "workers_current",
    "assigned": "assigned_total",
    "completed": "completed_total",
    "failed": "failed_total",
}

# The dashboard may talk to this server only, and load nothing from elsewhere.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:"
)


class History:
    """A ring buffer of small per-queue samples (counters raw; rates are the reader's job)."""

    def __init__(self, maxlen: int) -> None:
        self._samples: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, now: float, snap: Mapping[str, Mapping[str, Any]]) -> None:
        """Record ``snap`` at the time it was taken; the same snapshot twice counts once."""
        if not snap:
            return  # nothing to chart (the broker has not taken its first snapshot yet)
        t = round(snapshot_time(snap, now), 3)
        queues = {
            name: {short: st.get(key, 0) for short, key in SAMPLE_KEYS.items()}
            for name, st in snap.items()
        }
        with self._lock:
            if self._samples and t <= self._samples[-1]["t"]:
                if t == self._samples[-1]["t"]:
                    return
                self._samples.clear()  # the clock stepped back: a new timeline
            self._samples.append({"t": t, "queues": queues})

    def since(self, t: float) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self._samples if s["t"] > t]


class WebServer:
    """A running metrics server; ``close()`` stops it and frees the port."""

    def __init__(self, bind: str, port: int, snapshot: Snapshot, sample_every: float,
                 history_s: float) -> None:
        self.snapshot = snapshot
        self.sample_every = sample_every
        self.history_s = history_s
        self.history = History(max(1, int(history_s / sample_every)))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SqmCollector(snapshot))
        ProcessCollector(registry=self.registry)  # the broker's own CPU, memory, fds
        self.dashboard = resources.files(__package__).joinpath("dashboard.html").read_bytes()
        server_cls = _V6Server if ":" in bind else _Server
        self.httpd = server_cls((bind, port), _Handler)
        self.httpd.web = self
        self.bind = bind
        self.port: int = self.httpd.server_address[1]
        self._stop = threading.Event()
        self._sample()
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                             name="sqm-web", daemon=True),
            threading.Thread(target=self._sampler, name="sqm-web-sampler", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        """Stop serving and sampling; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sample(self) -> None:
        try:
            snap = self.snapshot()
        except Exception as exc:  # a broken snapshot must not kill the sampler
            log.debug("snapshot failed: %s", exc)
            return
        self.history.add(time.time(), snap)

    def _sampler(self) -> None:
        while not self._stop.wait(self.sample_every):
            self._sample()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    web: WebServer


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "sqm"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlsplit(self.path)
        web = self.server.web
        try:
            if url.path == "/metrics":
                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, ctype, encoder(web.registry))
            elif url.path == "/status.json":
                self._reply(200, "application/json", to_json(web.snapshot()))
            elif url.path == "/history.json":
                since = _float(parse_qs(url.query).get("since", ["0"])[0])
                body = {"now": time.time(), "interval": web.sample_every,
                        "window_s": web.history_s, "samples": web.history.since(since)}
                self._reply(200, "application/json", to_json(body))
            elif url.path in ("/", "/index.html"):
                self._reply(200, "text/html; charset=utf-8", web.dashboard,
                            {"Content-Security-Policy": DASHBOARD_CSP})
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try / or /metrics\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            log.warning("%s failed: %s: %s", url.path, type(exc).__name__, exc)
            self._reply(500, "text/plain; charset=utf-8",
                        f"{type(exc).__name__}: {exc}\n".encode())

    def _reply(self, code: int, ctype: str, body: bytes,
               headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        """To the logging tree at debug, not raw stderr (keeps --log-format json intact)."""
        log.debug("%s %s", self.address_string(), format % args)


def snapshot_time(snap: Mapping[str, Mapping[str, Any]], now: float) -> float:
    """When the broker took ``snap`` (its ``started_at + uptime_s``), else ``now``.

    The broker refreshes its snapshot on its own tick, not when we sample;
    stamping samples with our clock would turn that jitter into false rates.
    """
    for st in snap.values():
        start, up = st.get("started_at"), st.get("uptime_s")
        if isinstance(start, (int, float)) and isinstance(up, (int, float)):
            t = float(start) + float(up)
            if abs(t - now) < 10:  # a plausible, live figure (not a canned one)
                return t
        break
    return now


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        return 0.0
    return v if math.isfinite(v) else 0.0


def to_json(obj: Any) -> bytes:
    """Strict JSON (browsers reject Infinity): inf becomes "+Inf"/"-Inf", NaN null."""
    try:
        return json.dumps(obj, allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False).encode()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("+Inf" if obj > 0 else "-Inf")
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def start(bind: str, port: int, snapshot: Snapshot, *, sample_every: float = 1.0,
          history_s: float = 600.0) -> WebServer:
    """Serve metrics and the dashboard on ``bind:port`` (0 picks a free port) until close().

    ``snapshot()`` returns ``{queue: status_dict}`` (what ``sqm status --json``
    prints, per queue). Raises OSError when the address cannot be bound.
    """
    if sample_every <= 0 or history_s <= 0:
        raise ValueError("sample_every and history_s must be positive")
    return WebServer(bind, port, snapshot, sample_every, history_s)
