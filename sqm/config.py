"""Finding a queue: one implementation of SPEC's resolution order.

sqm, Sender, Worker and every CLI command call :func:`resolve`, so they all
agree on where a queue lives:

1. an explicit ``endpoint`` argument / ``--endpoint`` option;
2. ``$SQM_ENDPOINT``;
3. the config file (``config=`` / ``--config``, else ``$SQM_CONFIG``):
   ``queues.<name>.endpoint``, else top-level ``endpoint``;
4. ``ipc://<rundir>/<queue>.sock`` with rundir ``$SQM_RUNDIR``, else a
   per-user directory under the system temp dir.

Environment variables are read when a function here is called, never at
import time.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ENDPOINT = re.compile(r"^(ipc://.+|tcp://[^\s/]+:(\d+|\*))$")


def default_rundir() -> str:
    """``$SQM_RUNDIR``, else ``<tmp>/sqm-<uid>`` (per user, so users don't collide)."""
    env = os.environ.get("SQM_RUNDIR")
    if env:
        return os.path.abspath(env)
    return os.path.join(tempfile.gettempdir(), f"sqm-{os.getuid()}")


def load_config(path: str | None = None) -> dict[str, Any]:
    """Load the YAML config named by ``path`` or ``$SQM_CONFIG``; {} when neither is set."""
    path = path or os.environ.get("SQM_CONFIG")
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    queues = data.get("queues", {})
    if queues is not None and not isinstance(queues, dict):
        raise ConfigError(f"config {path}: 'queues' must be a mapping of queue names")
    return data


def resolve_queue(queue: str | None) -> str:
    """The queue name from the argument, else ``$SQM_QUEUE``; neither is an error."""
    name = queue or os.environ.get("SQM_QUEUE")
    if not name:
        raise ConfigError("no queue given: pass a queue name or set SQM_QUEUE")
    if not QUEUE_NAME.match(name):
        raise ConfigError(
            f"invalid queue name {name!r}: use letters, digits, '_', '.', '-' (max 100)"
        )
    return name


def check_endpoint(endpoint: str) -> str:
    """Accept only ``tcp://host:port`` and ``ipc://path`` endpoints."""
    if not isinstance(endpoint, str) or not ENDPOINT.match(endpoint):
        raise ConfigError(
            f"invalid endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc:///path"
        )
    return endpoint


def split_endpoints(value: Any) -> tuple[str, ...]:
    """One endpoint, a comma-separated list of them, or a YAML/Python list."""
    if isinstance(value, (list, tuple)):
        parts = [str(v).strip() for v in value]
    elif "," in str(value):
        parts = [p.strip() for p in str(value).split(",")]
    else:
        parts = [str(value)]
    parts = [p for p in parts if p]
    if not parts:
        raise ConfigError("empty endpoint list")
    seen: list[str] = []
    for p in parts:
        check_endpoint(p)
        if p not in seen:
            seen.append(p)
    return tuple(seen)


@dataclass(frozen=True)
class QueueSettings:
    """Everything a component needs to know about one queue, resolved once.

    ``endpoints`` lists every broker serving the queue (usually one);
    ``endpoint`` is the first of them.
    """

    queue: str
    endpoint: str
    rundir: str
    options: dict[str, Any] = field(default_factory=dict)
    endpoints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.endpoints:
            object.__setattr__(self, "endpoints", (self.endpoint,))

    def get(self, key: str, default: Any = None) -> Any:
        """A setting from ``queues.<name>`` or the top level of the config file."""
        return self.options.get(key, default)

    @property
    def bind(self) -> str:
        """What sqm binds: ``queues.<name>.bind`` if set, else the endpoint."""
        return check_endpoint(self.options.get("bind") or self.endpoint)

    @property
    def ipc_dir(self) -> str | None:
        """The directory of an ``ipc://`` endpoint (where mailboxes may live)."""
        if self.endpoint.startswith("ipc://"):
            return os.path.dirname(os.path.abspath(self.endpoint[len("ipc://"):]))
        return None


def resolve(
    queue: str | None = None,
    *,
    endpoint: str | list[str] | tuple[str, ...] | None = None,
    config: str | dict[str, Any] | None = None,
) -> QueueSettings:
    """Resolve a queue's name, endpoint and options in SPEC's order."""
    name = resolve_queue(queue)
    data = config if isinstance(config, dict) else load_config(config)
    section = (data.get("queues") or {}).get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"config: queues.{name} must be a mapping")
    options = {k: v for k, v in data.items() if k != "queues"}
    options.update(section)
    rundir = os.environ.get("SQM_RUNDIR") or options.get("rundir") or default_rundir()
    rundir = os.path.abspath(str(rundir))
    chosen = (
        endpoint
        or os.environ.get("SQM_ENDPOINT")
        or section.get("endpoint")
        or data.get("endpoint")
        or f"ipc://{os.path.join(rundir, name + '.sock')}"
    )
    endpoints = split_endpoints(chosen)
    return QueueSettings(name, endpoints[0], rundir, options, endpoints)
