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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

import yaml

from .errors import ConfigError, SQMError

#: The longest ``ipc://`` path the kernel takes: sun_path is 108 bytes on
#: Linux, one of them the terminating NUL.
IPC_PATH_MAX = 107
#: A Sender's mailbox file name, ``mbox-<16 hex>.sock``; mailboxes live next
#: to the queue's socket (else in the run directory).
MAILBOX_NAME_LEN = len("mbox-0123456789abcdef.sock")

QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ENDPOINT = re.compile(r"^(ipc://.+|tcp://[^\s/]+:(\d+|\*)|inproc://.+)$")


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
    """Accept only ``tcp://host:port`` and ``ipc://path`` endpoints (and
    ``inproc://name``, for in-process tests on a shared zmq.Context)."""
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
    #: Where ``endpoint`` came from, for error messages ("$SQM_RUNDIR", ...).
    origin: str = "the endpoint argument"

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
    if os.environ.get("SQM_RUNDIR"):
        rundir, rundir_origin = os.environ["SQM_RUNDIR"], "$SQM_RUNDIR"
    elif options.get("rundir"):
        rundir, rundir_origin = options["rundir"], "the config's rundir"
    else:
        rundir, rundir_origin = default_rundir(), "the default run directory"
    rundir = os.path.abspath(str(rundir))
    candidates: list[tuple[Any, str]] = [
        (endpoint, "the endpoint argument"),
        (os.environ.get("SQM_ENDPOINT"), "$SQM_ENDPOINT"),
        (section.get("endpoint"), f"the config's queues.{name}.endpoint"),
        (data.get("endpoint"), "the config's endpoint"),
        (f"ipc://{os.path.join(rundir, name + '.sock')}", rundir_origin),
    ]
    chosen, origin = next((value, where) for value, where in candidates if value)
    endpoints = split_endpoints(chosen)
    return QueueSettings(name, endpoints[0], rundir, options, endpoints, origin)


# ------------------------------------------------------------ ipc paths


def ipc_path_fits(path: str) -> bool:
    """True when ``path`` (a file path or an ``ipc://`` endpoint) fits the kernel's limit."""
    if path.startswith("ipc://"):
        path = path[len("ipc://"):]
    return len(os.fsencode(os.path.abspath(path))) <= IPC_PATH_MAX


def mailbox_dir_fits(directory: str) -> bool:
    """True when a Sender's mailbox file in ``directory`` fits the ipc path limit."""
    return ipc_path_fits(os.path.join(directory, "m" * MAILBOX_NAME_LEN))


def mailbox_dir(settings: QueueSettings) -> str | None:
    """Where a Sender's ipc mailbox goes for this queue: beside the queue's socket,
    else in the run directory when that path would be too long; None if neither fits."""
    for directory in (settings.ipc_dir, settings.rundir):
        if directory and mailbox_dir_fits(directory):
            return directory
    return None


def prepare_ipc(settings: QueueSettings) -> None:
    """Check, before sqm binds, that its ipc socket and its senders' mailboxes can exist.

    Creates the socket's directory (private to this user) and raises
    :class:`ConfigError` naming where the path came from (``$SQM_RUNDIR``,
    the config, ...) when it cannot be created or a path would be too long
    for the kernel: otherwise sqm would start and every sender would fail.
    """
    if not settings.bind.startswith("ipc://"):
        return
    path = os.path.abspath(settings.bind[len("ipc://"):])
    directory = os.path.dirname(path)
    origin = settings.origin if settings.bind == settings.endpoint else "the config's bind"
    where = f"(from {origin})"
    if not ipc_path_fits(path):
        raise ConfigError(
            f"ipc path {path} {where} is {len(os.fsencode(path))} bytes, over the kernel's "
            f"limit of {IPC_PATH_MAX}: choose a shorter directory or queue name"
        )
    if settings.ipc_dir and not settings.get("mailbox_bind") and mailbox_dir(settings) is None:
        room = IPC_PATH_MAX - MAILBOX_NAME_LEN - 1
        raise ConfigError(
            f"directory {settings.ipc_dir} (from {settings.origin}) is too long for sender "
            f"mailboxes (mbox-<id>.sock must fit in {IPC_PATH_MAX} bytes): "
            f"use a directory of at most {room} bytes"
        )
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create directory {directory} {where}: {exc.strerror or exc}"
        ) from None


# ------------------------------------------------------------ broker limits


class QueueLimits(TypedDict):
    """One queue's limits, the keyword arguments of the broker's options."""

    heartbeat: float
    max_pending: int
    max_message_size: int
    max_deliveries: int | None


_N = TypeVar("_N", int, float)


def queue_limits(
    settings: QueueSettings,
    *,
    heartbeat: float | None = None,
    max_pending: int | None = None,
    max_message_size: int | None = None,
    max_deliveries: int | None = None,
    default_max_message_size: int,
) -> QueueLimits:
    """Each limit from its option, else ``queues.<name>.KEY``, else top-level KEY, else default."""

    def pick(option: _N | None, key: str, default: _N | None, cast: Callable[[Any], _N]) -> _N | None:
        value = option if option is not None else settings.get(key, default)
        try:
            value = None if value is None else cast(value)
        except (TypeError, ValueError):
            raise SQMError(
                f"queue {settings.queue!r}: {key} must be a number, got {value!r}"
            ) from None
        if value is not None and value <= 0:
            raise SQMError(f"queue {settings.queue!r}: {key} must be positive, got {value}")
        return value

    hb = pick(heartbeat, "heartbeat", 1.0, float)
    pending = pick(max_pending, "max_pending", 100_000, int)
    size = pick(max_message_size, "max_message_size", default_max_message_size, int)
    assert hb is not None and pending is not None and size is not None  # defaults are set
    return QueueLimits(heartbeat=hb, max_pending=pending, max_message_size=size,
                       max_deliveries=pick(max_deliveries, "max_deliveries", None, int))


# -------------------------------------------------------------- security


def client_key_paths(
    settings: QueueSettings,
    secret_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> tuple[str | None, str | None]:
    """A client's two key files: the argument, else ``$SQM_SECRET_KEY`` /
    ``$SQM_SERVER_KEY``, else the config (``secret_key`` / ``server_key``,
    per queue or top level). Each is resolved on its own."""

    def pick(given: str | os.PathLike[str] | None, env: str, key: str) -> str | None:
        if given is not None:
            return os.fspath(given)
        value = os.environ.get(env) or settings.get(key)
        return str(value) if value else None

    return (pick(secret_key, "SQM_SECRET_KEY", "secret_key"),
            pick(server_key, "SQM_SERVER_KEY", "server_key"))


def broker_security(
    settings: QueueSettings, secret_key: str | None, clients: str | None
) -> tuple[str | None, str | None]:
    """``sqm serve``'s key file and clients directory: options, else the
    config's ``security.secret_key`` / ``security.clients``."""
    section = settings.get("security") or {}
    if not isinstance(section, dict):
        raise ConfigError("config 'security' must be a mapping (secret_key, clients)")
    sk = secret_key or section.get("secret_key")
    cd = clients or section.get("clients")
    return (str(sk) if sk else None, str(cd) if cd else None)
