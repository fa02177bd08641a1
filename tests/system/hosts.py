"""Linux network namespaces as hosts, for tests that need more than loopback.

A ``Network`` is one namespace holding a bridge (the "switch") and one
namespace per host, each joined to the switch by a veth pair whose ends are
created inside those namespaces. Addresses come from a private /24 that
exists only there: nothing (no interface, address or route) is ever added to
the machine's own network namespace, and a host cannot reach its loopback.

Every name starts with ``sqmt-<pid>-`` (the pid of the test process that made
it), so parallel runs never collide and a later run can sweep what a killed
run left behind (``sweep_stale``) without touching a live run's namespaces.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
PREFIX = "sqmt"
_OWNED = re.compile(rf"^{PREFIX}-(\d+)-")
_SWITCH_PORT = "br0"  # the bridge inside the switch namespace
_HOST_NIC = "eth0"  # each host's end of its veth pair
WORKDIR_PARENT = "/tmp"  # short paths: ipc socket paths must stay under ~100 bytes
_pause = threading.Event().wait  # polling interval while waiting on a condition

# One random /24 per test session (10.231.N.0/24), so two runs never share one
# even if something went wrong with the namespaces' isolation.
_SESSION_SUBNET = f"10.231.{random.SystemRandom().randrange(1, 255)}"

# Process environment variables that would point a host's processes at the
# root namespace's sqm (or at another host's run directory).
_HOST_ENV_DROP = ("SQM_ENDPOINT", "SQM_CONFIG", "SQM_QUEUE", "SQM_RUNDIR", "SQM_TEST_LOG")


class HarnessError(RuntimeError):
    """The multi-host harness cannot work here, or could not clean up."""


def require_tools(path: str | None = None) -> str:
    """Return the path of ``ip``; raise ``HarnessError`` saying what is missing."""
    ip = shutil.which("ip", path=path)
    if ip is None:
        raise HarnessError(
            "the multi-host tests need the `ip` command (package iproute2): "
            "install it, e.g. `apt-get install -y iproute2` (.ci/run does this)"
        )
    if os.geteuid() != 0:
        raise HarnessError("the multi-host tests need root (they create network namespaces)")
    return ip


def ip(*args: str, check: bool = True, timeout: float = 10.0) -> str:
    """Run ``ip ARGS``; return stdout, or raise ``HarnessError`` with its stderr."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def session_subnet() -> str:
    """The first three octets of this session's private /24, e.g. ``10.231.57``."""
    return _SESSION_SUBNET


def namespaces() -> list[str]:
    """Names of all named network namespaces on the machine."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Pids of the processes whose network namespace is ``name``."""
    out = ip("netns", "pids", name, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent to reap it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def owner_pid(name: str) -> int | None:
    """The pid of the test process that created namespace ``name`` (None: not ours)."""
    match = _OWNED.match(name)
    return int(match.group(1)) if match else None


def remove_namespace(name: str, timeout: float = 10.0) -> None:
    """SIGKILL every process still in namespace ``name``, then delete it."""
    deadline = time.monotonic() + timeout
    while pids := namespace_pids(name):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} in namespace {name} survived SIGKILL")
        _pause(0.02)
    ip("netns", "delete", name, check=False)
    if name in namespaces():
        raise HarnessError(f"namespace {name} could not be deleted")


def _stale(name: str) -> bool:
    pid = owner_pid(name)
    return pid is not None and pid != os.getpid() and not alive(pid)


def sweep_stale() -> list[str]:
    """Remove namespaces (and work directories) left by earlier test runs whose
    process is gone; return the namespaces removed."""
    stale = [name for name in namespaces() if _stale(name)]
    for name in stale:
        remove_namespace(name)
    for workdir in Path(WORKDIR_PARENT).glob(f"{PREFIX}-*"):
        if workdir.is_dir() and _stale(workdir.name):
            shutil.rmtree(workdir, ignore_errors=True)
    return stale


class HostProc:
    """A process in a host's namespace; stdout and stderr are kept in files."""

    def __init__(self, argv: Sequence[str], *, netns: str, env: Mapping[str, str],
                 logdir: Path, name: str, stdin: bool = False) -> None:
        self.name = name
        stem = logdir / f"{name}-{time.monotonic_ns()}"
        self.outfile = stem.with_suffix(".stdout")
        self.errfile = stem.with_suffix(".stderr")
        self._out = open(self.outfile, "wb")
        self._err = open(self.errfile, "wb")
        # `ip netns exec` enters the namespace and execs argv: the pid is argv's.
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], env=dict(env), cwd=REPO,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=self._out, stderr=self._err, start_new_session=True,
        )
        self.pid = self.popen.pid

    @property
    def stdout(self) -> str:
        self._out.flush()
        return self.outfile.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        self._err.flush()
        return self.errfile.read_text(errors="replace")

    def write(self, text: str) -> None:
        """Send ``text`` to the process's stdin (started with ``stdin=True``)."""
        assert self.popen.stdin is not None, f"{self.name} was started without stdin=True"
        self.popen.stdin.write(text.encode())
        self.popen.stdin.flush()

    def check_alive(self) -> None:
        """Raise AssertionError, with its stderr, if the process has exited."""
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.popen.returncode}):\n{self.stderr}")

    def said(self) -> list[dict[str, Any]]:
        """The JSON lines it has printed so far (what :func:`sender_main` reports); a
        last line still being written (no newline yet) waits for the next look."""
        out = self.stdout  # read once: the file grows meanwhile
        done = out[:out.rfind("\n") + 1]
        return [json.loads(line) for line in done.splitlines() if line.startswith("{")]

    def summary(self) -> dict[str, Any] | None:
        """A :func:`sender_main` batch's summary, once printed; raises if it died first."""
        found = next((line["summary"] for line in self.said() if "summary" in line), None)
        if found is None:
            self.check_alive()
        return found

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, term_timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL its whole session if it is not gone in ``term_timeout`` s."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(term_timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        self._out.close()
        self._err.close()

    def __repr__(self) -> str:
        return f"<HostProc {self.name} pid={self.pid} rc={self.popen.poll()}>"


class Host:
    """One network namespace on the switch, with one address and a run directory."""

    def __init__(self, network: Network, label: str, name: str, addr: str, port: str) -> None:
        self.network = network
        self.label = label  # short name for logs, e.g. "h1"
        self.name = name  # the namespace, e.g. "sqmt-1234-0-h1"
        self.addr = addr
        self._port = port  # this host's veth end inside the switch namespace
        self.rundir = network.workdir / label
        self.rundir.mkdir(mode=0o700)
        self.procs: list[HostProc] = []
        #: Added to the environment of every process started here from now on
        #: (e.g. ``SQM_SECRET_KEY`` / ``SQM_SERVER_KEY``: this host's CURVE keys).
        self.extra_env: dict[str, str] = {}

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of this host's processes: the repo importable, a private rundir."""
        env = {k: v for k, v in os.environ.items() if k not in _HOST_ENV_DROP}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["SQM_RUNDIR"] = str(self.rundir)
        env["SQM_TEST_LOG"] = str(self.rundir / "handled.jsonl")
        env["PYTHONUNBUFFERED"] = "1"  # output reaches the files as it is printed
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            name: str | None = None, stdin: bool = False) -> HostProc:
        """Start ``argv`` in this host's namespace (``env`` adds to ``self.env()``)."""
        proc = HostProc(argv, netns=self.name, env=self.env(env), logdir=self.network.workdir,
                        name=f"{self.label}-{name or Path(argv[0]).name}", stdin=stdin)
        self.procs.append(proc)
        return proc

    def python(self, *args: str, env: Mapping[str, str] | None = None,
               name: str | None = None, stdin: bool = False) -> HostProc:
        """Start the project's python (``sys.executable``) with ``args`` on this host."""
        return self.run([sys.executable, *args], env=env, name=name or "python", stdin=stdin)

    def sqm(self, *args: str, env: Mapping[str, str] | None = None,
            name: str | None = None) -> HostProc:
        """Start ``python -m sqm ARGS`` on this host."""
        return self.python("-m", "sqm", *args, env=env, name=name or f"sqm-{args[0]}")

    def call(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
             timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to its end on this host; return its exit code and output."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], env=self.env(env), cwd=REPO,
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def serve(self, queue: str, endpoint: str, *extra: str, name: str | None = None) -> HostProc:
        """Start ``sqm serve QUEUE --endpoint ENDPOINT EXTRA...`` on this host (see
        :func:`serve_args`: the one place that says how a broker across hosts starts)."""
        return self.sqm(*serve_args(queue, endpoint, *extra), name=name or "sqm-serve")

    def worker(self, endpoints: Sequence[str], *extra: str, queue: str = "q",
               name: str | None = None) -> HostProc:
        """Start ``sqm worker`` with :data:`callbacks` (below) registered with every broker
        in ``endpoints`` (one comma-separated ``--endpoint``)."""
        return self.sqm("worker", f"{__name__}:callbacks", "--queue", queue,
                        "--endpoint", ",".join(endpoints), *extra, name=name or "sqm-worker")

    def sender(self, endpoints: Sequence[str], name: str = "sender", **options: Any) -> HostProc:
        """Start :func:`sender_main` on this host: a Sender that reports on stdout
        (one JSON object a line) and takes orders on stdin; ``options`` as there."""
        options["endpoints"] = list(endpoints)
        return self.python("-c", f"from {__name__} import sender_main; sender_main()",
                           json.dumps(options), name=name, stdin=True)

    def status(self, queue: str, endpoint: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """``sqm status QUEUE --json`` asked from this host; None while sqm does not answer."""
        done = self.call([sys.executable, "-m", "sqm", "status", queue, "--endpoint", endpoint,
                          "--json", "--timeout", str(timeout)], timeout=timeout + 30)
        if done.returncode != 0:
            return None
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def wait_serving(self, broker: HostProc, endpoint: str, workers: int = 0,
                     timeout: float = 30.0, queue: str = "q") -> dict[str, Any]:
        """Wait until ``broker`` answers ``sqm status`` from this host with at least
        ``workers`` registered; return that status."""
        deadline = time.monotonic() + timeout
        while True:
            broker.check_alive()
            st = self.status(queue, endpoint, timeout=1.0)
            if st is not None and st["workers_current"] >= workers:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"sqm at {endpoint} did not answer {self.label} with "
                                     f"{workers} worker(s) in {timeout} s; last status {st}")
            _pause(0.05)

    def probe_tcp(self, addr: str, port: int, timeout: float = 1.0) -> str:
        """Try a TCP connection from this host: "ok", "refused", "timeout" or the error."""
        code = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({addr!r}, {port}), timeout={timeout}).close()\n"
            "    print('ok')\n"
            "except ConnectionRefusedError:\n"
            "    print('refused')\n"
            "except TimeoutError:\n"
            "    print('timeout')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, e.errno)\n"
        )
        done = self.call([sys.executable, "-c", code], timeout=timeout + 20)
        if done.returncode != 0:
            raise HarnessError(f"tcp probe on {self.label} failed: {done.stderr}")
        return done.stdout.strip()

    def link_down(self) -> None:
        """Pull this host's cable: its switch port goes down, so packets vanish both
        ways with no FIN or RST; addresses and routes stay, and the host's own end
        only sees its carrier lost."""
        ip("-n", self.network.switch, "link", "set", self._port, "down")

    def link_up(self) -> None:
        """Plug the cable back in (sockets that were open carry on where they were)."""
        ip("-n", self.network.switch, "link", "set", self._port, "up")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def __repr__(self) -> str:
        return f"<Host {self.label} {self.addr} netns={self.name}>"


# ---------------------------------------------------------------- brokers, workers, senders


def keygen(directory: Path, *names: str) -> dict[str, Path]:
    """``sqm keygen NAME --dir DIRECTORY`` for each name; return each secret key file
    (the public one is beside it, ``NAME.key``)."""
    for name in names:
        done = subprocess.run([sys.executable, "-m", "sqm", "keygen", name, "--dir",
                               str(directory)], cwd=REPO, capture_output=True, text=True,
                              timeout=60, check=False)
        if done.returncode != 0:
            raise HarnessError(f"sqm keygen {name} failed: {done.stderr}")
    return {name: directory / f"{name}.key_secret" for name in names}


def admit(clients: Path, role: str, public_key: Path) -> None:
    """Put ``public_key`` in a broker's ``--clients`` folder for ``role``
    (``senders``, ``workers`` or ``admins``)."""
    folder = clients / role
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(public_key, folder / public_key.name)


@functools.cache
def serve_knows_insecure() -> bool:
    """True when ``sqm serve --help`` lists ``--insecure`` (asked once per session).

    Once the secure default exists, a broker bound on a host's non-loopback
    address needs ``--insecure`` (or CURVE keys); before, the flag is unknown.
    """
    done = subprocess.run([sys.executable, "-m", "sqm", "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise HarnessError(f"sqm serve --help failed ({done.returncode}): {done.stderr}")
    return "--insecure" in done.stdout


def serve_args(queue: str, endpoint: str, *extra: str) -> list[str]:
    """The arguments of ``sqm serve`` for a broker other hosts reach over plain tcp."""
    args = ["serve", queue, "--endpoint", endpoint, *extra]
    if serve_knows_insecure():
        args.append("--insecure")
    return args


def work(worker: Any, originator: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The multi-host tests' callback: log the start (``$SQM_TEST_LOG``), take
    ``payload["s"]`` seconds, answer with the payload's index and this pid."""
    path = os.environ.get("SQM_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "i": payload.get("i"),
                                 "t": time.time()}) + "\n")
    seconds = float(payload.get("s", 0))
    if seconds:
        _pause(seconds)
    return {"i": payload.get("i"), "pid": os.getpid()}


callbacks = {"work": work}


def _stdin_has(word: str) -> bool:
    """True once ``word`` has arrived as a line on stdin (never blocks)."""
    import select

    while select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()
        if not line or line.strip() == word:
            return True
    return False


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def sender_main() -> None:
    """A Sender on a host, driven by the JSON options in ``argv[1]``.

    It prints its mailbox (``{"mailbox": ...}``), then, by ``mode``:

    - ``"batch"``: ``Sender.map("work", ...)`` over ``count`` payloads (or,
      without ``count``, until a line ``stop`` arrives on stdin) with
      ``window`` outstanding, ``retries`` and a per-item ``timeout``; one line
      per item, ``{"i": ..., "ok": true, "pid": ...}`` or ``{"i": ...,
      "error": TYPE, "msg": ...}``, then ``{"summary": {...}}``;
    - ``"one"``: one message, ``{"started": T}`` when a worker has it, then
      the outcome with ``"t"`` (unix times);
    - ``"idle"``: nothing (only the mailbox).

    Then it waits for a line on stdin (or its end) before closing the Sender.
    """
    from sender import Sender, SQMError

    opts = json.loads(sys.argv[1])
    mode = opts.get("mode", "batch")
    seconds = float(opts.get("s", 0.0))
    with Sender("q", endpoint=opts["endpoints"], timeout=opts.get("timeout", 15.0),
                heartbeat=opts.get("heartbeat", 1.0)) as s:
        _say(mailbox=s.mailbox)
        if mode == "batch":
            count = opts.get("count")

            def payloads() -> Any:
                i = 0
                while (i < count) if count is not None else not _stdin_has("stop"):
                    yield {"i": i, "s": seconds}
                    i += 1

            seen: dict[int, int] = {}
            errors: dict[str, int] = {}
            for i, item in s.map("work", payloads(), max_concurrent=opts.get("window", 50),
                                 retries=opts.get("retries", 0), timeout=opts.get("timeout"),
                                 ordered=False):
                seen[i] = seen.get(i, 0) + 1
                if isinstance(item, SQMError):
                    errors[type(item).__name__] = errors.get(type(item).__name__, 0) + 1
                    _say(i=i, error=type(item).__name__, msg=str(item))
                else:
                    _say(i=i, ok=item["i"] == i, pid=item["pid"])
            _say(summary={
                "items": len(seen),
                "replies": sum(seen.values()) - sum(errors.values()),
                "errors": errors,
                "duplicates": sum(n - 1 for n in seen.values()),
                "dropped": s._core.dropped,  # late or duplicate replies the Sender dropped
                "resent": s._links.resent,  # copies re-sent through another broker
            })
        elif mode == "one":
            mid = s.submit("work", {"i": 0, "s": seconds}, retries=opts.get("retries", 0),
                           timeout=opts.get("timeout"), ack=True)
            while not s.started(mid) and mid not in s._core.ready:
                s.poll(0.02)
            _say(started=time.time())
            try:
                item = s.receive(id=mid)
            except SQMError as exc:
                _say(error=type(exc).__name__, msg=str(exc), t=time.time())
            else:
                _say(ok=True, pid=item["pid"], t=time.time())
        sys.stdin.readline()


class Network:
    """A switch and its hosts; ``net(3)`` adds three hosts and returns them.

    ``close()`` (also on ``with`` exit and at interpreter exit) stops every
    process, kills anything left in the namespaces and deletes them all.
    """

    _counter = 0
    _open: list[Network] = []

    def __init__(self, subnet: str | None = None) -> None:
        Network._counter += 1
        self.base = f"{PREFIX}-{os.getpid()}-{Network._counter}"
        self.subnet = subnet or session_subnet()
        self.switch = f"{self.base}-sw"
        self.hosts: list[Host] = []
        self.created: list[str] = []  # namespaces made so far, for close()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.base}-", dir=WORKDIR_PARENT))
        self.closed = False
        Network._open.append(self)
        try:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", _SWITCH_PORT, "type", "bridge")
            ip("-n", self.switch, "link", "set", _SWITCH_PORT, "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)

    def add_host(self) -> Host:
        """Create one more host on the switch, with the next address of the subnet."""
        index = len(self.hosts) + 1
        if index > 254:
            raise HarnessError("a /24 holds at most 254 hosts")
        label = f"h{index}"
        name = f"{self.base}-{label}"
        addr = f"{self.subnet}.{index}"
        self._add_namespace(name)
        # Both veth ends are born inside namespaces: the host's end in the host,
        # its peer moved straight into the switch; none in the root namespace.
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", _HOST_NIC, "type", "veth",
           "peer", "name", label, "netns", self.switch)
        ip("-n", self.switch, "link", "set", label, "master", _SWITCH_PORT)
        ip("-n", self.switch, "link", "set", label, "up")
        ip("-n", name, "addr", "add", f"{addr}/24", "dev", _HOST_NIC)
        ip("-n", name, "link", "set", _HOST_NIC, "up")
        host = Host(self, label, name, addr, label)
        self.hosts.append(host)
        return host

    def __call__(self, n: int) -> list[Host]:
        """Add ``n`` hosts and return them."""
        return [self.add_host() for _ in range(n)]

    def close(self) -> None:
        """Stop every process and delete every namespace; raise if any is left."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        for host in reversed(self.hosts):
            host.stop_all()
        for name in reversed(self.created):
            try:
                remove_namespace(name)
            except (HarnessError, subprocess.SubprocessError, OSError) as exc:
                errors.append(str(exc))
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self in Network._open:
            Network._open.remove(self)
        if errors:
            raise HarnessError("cleanup left something behind: " + "; ".join(errors))

    def __enter__(self) -> Network:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    """Last resort (e.g. the session interrupted between fixtures): delete what is open."""
    for network in list(Network._open):
        try:
            network.close()
        except HarnessError:
            pass
