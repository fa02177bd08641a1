"""The multi-host harness itself: reachability, isolation, pulled cables, cleanup."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.system.hosts import (
    REPO,
    WORKDIR_PARENT,
    HarnessError,
    Host,
    HostProc,
    Network,
    alive,
    ip,
    namespace_pids,
    namespaces,
    owner_pid,
    remove_namespace,
    require_tools,
    sweep_stale,
)

PORT = 7000  # each host has its own port space: a fixed port cannot clash

# Echoes every connection's bytes back; says "listening" once bound.
ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Holds one connection; each stdin line "WORD SECONDS" sends WORD ("-": nothing)
# and reports what one recv gets within SECONDS: "got ...", "got EOF" or "timeout".
ECHO_CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", flush=True)
for line in sys.stdin:
    word, seconds = line.split()
    sock.settimeout(float(seconds))
    if word != "-":
        sock.sendall(word.encode())
    try:
        data = sock.recv(4096)
        print("got", data.decode() if data else "EOF", flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    except OSError as exc:
        print("error", type(exc).__name__, flush=True)
"""


def echo_server(host: Host) -> HostProc:
    proc = host.python("-c", ECHO_SERVER, host.addr, str(PORT), name="echo")
    wait_for(lambda: "listening" in proc.stdout or proc.popen.poll() is not None, 10, "echo up")
    assert proc.popen.poll() is None, proc.stderr
    return proc


def lines(proc: HostProc) -> list[str]:
    return proc.stdout.splitlines()


def root_network_state() -> tuple[str, str, str]:
    """The root namespace's interfaces, addresses and routes (to prove we add none)."""
    def lines(*args: str) -> str:  # one line per object, without counters and timers
        return "\n".join(sorted(
            re.sub(r"expires \S+", "", line.split("\\")[0]) for line in ip(*args).splitlines()
        ))

    return lines("-o", "link", "show"), lines("-o", "addr", "show"), lines("route", "show",
                                                                             "table", "all")


def test_hosts_reach_each_other_over_tcp(net: Network) -> None:
    a, b, c = net(3)
    assert len({a.addr, b.addr, c.addr}) == 3
    assert all(h.name in namespaces() for h in (a, b, c))
    echo_server(b)

    client = a.python("-c", ECHO_CLIENT, b.addr, str(PORT), name="client", stdin=True)
    wait_for(lambda: "connected" in lines(client), 10, "client connected")
    client.write("hello 5\n")
    wait_for(lambda: "got hello" in lines(client), 10, f"echo reply: {client.stderr}")

    # The probe tells a listening port from a closed one, and c reaches b too.
    assert c.probe_tcp(b.addr, PORT) == "ok"
    assert c.probe_tcp(b.addr, PORT + 1) == "refused"


def test_hosts_are_isolated_from_the_root_namespace(net: Network) -> None:
    before = root_network_state()
    (a,) = net(1)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the root namespace itself reaches its listener...
        assert a.probe_tcp("127.0.0.1", port) == "refused"  # ...a host's loopback is its own
    # Only the private /24 is routed from a host: the root's own address is unreachable.
    root_addrs = [
        line.split()[3].split("/")[0] for line in ip("-o", "-4", "addr", "show").splitlines()
        if " lo " not in line
    ]
    for addr in root_addrs:
        assert a.probe_tcp(addr, 22) == "OSError 101", addr  # ENETUNREACH
    assert a.call(["ip", "route"]).stdout.split()[0] == f"{net.subnet}.0/24"
    # Nothing was added to the root namespace: same links, addresses, routes.
    assert root_network_state() == before
    assert net.subnet not in before[1]


def test_link_down_makes_a_peer_unreachable_and_link_up_restores_it(net: Network) -> None:
    a, b = net(2)
    server = echo_server(b)
    client = a.python("-c", ECHO_CLIENT, b.addr, str(PORT), name="client", stdin=True)
    wait_for(lambda: "connected" in lines(client), 10, "client connected")
    client.write("first 5\n")
    wait_for(lambda: "got first" in lines(client), 10, "first echo")

    b.link_down()
    assert a.probe_tcp(b.addr, PORT) == "timeout"  # not refused: nothing answers at all
    client.write("second 1.5\n")
    # A pulled cable sends no FIN and no RST: the open connection just hears nothing.
    wait_for(lambda: len(lines(client)) == 3, 10, "recv during link down")
    assert lines(client)[-1] == "timeout"
    assert server.popen.poll() is None

    b.link_up()
    assert a.probe_tcp(b.addr, PORT, timeout=10) == "ok"
    client.write("- 20\n")  # TCP retransmits "second" and its echo comes back
    wait_for(lambda: len(lines(client)) == 4, 30, "echo after link up")
    assert lines(client)[-1] == "got second"


def test_close_stops_every_process_and_deletes_every_namespace() -> None:
    require_tools()
    network = Network()
    a, b = network(2)
    names = [network.switch, a.name, b.name]
    assert set(names) <= set(namespaces())
    # A process that ignores SIGTERM and a grandchild in a session of its own:
    # only the sweep of the namespace's pids can reach the latter.
    stubborn = a.python(
        "-c",
        "import os, signal, subprocess, sys, threading\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import threading; "
        "threading.Event().wait()'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "threading.Event().wait()\n",
        name="stubborn",
    )
    grandchild = int(wait_for(lambda: stubborn.stdout.strip(), 10, "grandchild pid"))
    assert set(namespace_pids(a.name)) == {stubborn.pid, grandchild}
    workdir = network.workdir

    for proc in a.procs:
        proc.stop(term_timeout=0.5)  # what close() does first, with a short grace
    assert namespace_pids(a.name) == [grandchild]  # the grandchild escaped the group kill
    assert alive(grandchild)
    network.close()

    assert not set(names) & set(namespaces())
    assert not any(owner_pid(n) == os.getpid() and n.startswith(network.base)
                   for n in namespaces())
    assert not alive(stubborn.pid) and not alive(grandchild)
    assert not workdir.exists()
    network.close()  # twice is harmless


def test_a_failure_while_building_the_network_still_cleans_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_tools()
    network = Network()
    network(1)
    made = list(network.created)

    def broken(*args: str) -> None:
        raise HarnessError("simulated failure halfway through add_host")

    monkeypatch.setattr(Host, "__init__", broken)
    with pytest.raises(HarnessError, match="simulated"), network:
        network.add_host()  # its namespace and veth are made, then Host() fails
    assert len(network.created) == len(made) + 1
    assert not set(network.created) & set(namespaces())


INNER_CONFTEST = "from tests.system.conftest import net, netns_ready  # noqa: F401\n"

INNER_TESTS = """
import json, os
import pytest

RECORD = os.environ["RECORD"]

def record(net, proc):
    with open(RECORD, "a") as fh:
        fh.write(json.dumps({"names": net.created, "pid": proc.pid}) + "\\n")

def test_body_fails(net):
    (a,) = net(1)
    record(net, a.python("-c", "import threading; threading.Event().wait()"))
    assert False, "inner test fails on purpose"

@pytest.fixture
def broken(net):
    a, b = net(2)
    record(net, b.python("-c", "import threading; threading.Event().wait()"))
    raise RuntimeError("inner fixture fails on purpose")

def test_fixture_fails(broken):
    pass
"""


def run_inner_pytest(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run INNER_TESTS in a pytest of their own, with the real ``net`` fixture."""
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "40",
         "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50, check=False,
    )


@pytest.mark.timeout(90)
def test_failing_tests_and_fixtures_still_clean_up(tmp_path: Path) -> None:
    import json

    record = tmp_path / "record.jsonl"
    done = run_inner_pytest(tmp_path, {"RECORD": str(record)})
    summary = done.stdout.strip().splitlines()[-1]
    assert "1 failed" in summary and "1 error" in summary, done.stdout + done.stderr
    assert "inner test fails on purpose" in done.stdout
    assert "inner fixture fails on purpose" in done.stdout

    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(runs) == 2  # both inner tests got as far as making hosts and a process
    left = set(namespaces())
    for run in runs:
        assert len(run["names"]) >= 2 and not set(run["names"]) & left, run
        assert not alive(run["pid"])


def test_missing_ip_fails_the_fixture_with_a_clear_message(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(HarnessError, match="iproute2"):
        require_tools(path=str(empty))
    assert require_tools().endswith("/ip")  # while on this machine's PATH it is found

    done = run_inner_pytest(tmp_path, {"RECORD": str(tmp_path / "r"), "PATH": str(empty)})
    summary = done.stdout.strip().splitlines()[-1]
    assert "2 error" in summary and "skipped" not in summary, done.stdout + done.stderr
    assert "multi-host harness unavailable" in done.stdout
    assert "apt-get install -y iproute2" in done.stdout


def test_sweep_removes_only_namespaces_of_dead_runs() -> None:
    require_tools()
    dead_pid = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True,
                                  check=True).stdout)  # a pid that has just exited
    live = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"])
    dead_ns = f"sqmt-{dead_pid}-1-h1"
    live_ns = f"sqmt-{live.pid}-1-h1"
    mine = f"sqmt-{os.getpid()}-999-h1"
    dirs = {name: Path(WORKDIR_PARENT, f"sqmt-{pid}-1-test") for name, pid in
            (("dead", dead_pid), ("live", live.pid), ("mine", os.getpid()))}
    try:
        for name in (dead_ns, live_ns, mine):
            ip("netns", "add", name)
        for path in dirs.values():
            path.mkdir()
        swept = sweep_stale()
        assert dead_ns in swept
        left = namespaces()
        assert dead_ns not in left
        assert live_ns in left and mine in left
        assert live_ns not in swept and mine not in swept
        assert not dirs["dead"].exists()
        assert dirs["live"].exists() and dirs["mine"].exists()
    finally:
        live.kill()
        live.wait()
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)
        for name in (dead_ns, live_ns, mine):
            if name in namespaces():
                remove_namespace(name)
