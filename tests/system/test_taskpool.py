"""Task pools with real supervisor processes: spawn, search, signals, restarts, locks, output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqm.errors import SQMError, Timeout
from sqm.taskpool import LockHeld, Task, TaskPool
from sqm.taskpool.store import pid_alive, process_start
from tests.conftest import REPO, wait_for

PY = sys.executable
HELPER = [PY, "-m", "tests.apps.taskpool"]


def pool_argv(path: Path, *args: str) -> list[str]:
    """The argv of ``sqm pool --path PATH ARGS``: through ``sqm`` once the group is wired in."""
    try:
        from sqm.cli import main

        wired = "pool" in getattr(main, "commands", {})
    except ImportError:
        wired = False
    prefix = ["-m", "sqm", "pool"] if wired else ["-m", "sqm.taskpool"]
    return [PY, *prefix, "--path", str(path), *args]


def run_cli(path: Path, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pool_argv(path, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            found.append(int(name))
    return found


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[TaskPool]:
    """A pool in a long tmp path (its sockets need the short-path route); emptied after."""
    task_pool = TaskPool(tmp_path / "pool", create=True)
    yield task_pool
    for pid in task_pool.store.pids():
        state = task_pool.store.read_state(pid) or {}
        for victim in (state.get("child_pid"), pid):
            if victim and pid_alive(victim, None):
                try:
                    if victim == state.get("child_pid"):
                        os.killpg(victim, signal.SIGKILL)
                    os.kill(victim, signal.SIGKILL)
                except OSError:
                    pass


def test_spawn_info_output_search(pool: TaskPool) -> None:
    foo = pool.spawn(cmd="echo hello; echo oops >&2; exec sleep 30", meta={"name": "foo"},
                     cwd=str(REPO))
    bar = pool.spawn(exec=["sleep", "30"], meta={"name": "bar", "deep": {"a": 1, "b": 2}})
    info = foo.info
    for key in ("pid", "child_pid", "cmd", "meta", "state", "exit_code", "restarts",
                "started_at", "output_path", "lockfile", "rss_bytes"):
        assert key in info, key
    assert info["pid"] == foo.pid and info["state"] == "running" and info["exit_code"] is None
    assert info["cmd"] == "echo hello; echo oops >&2; exec sleep 30"
    assert info["meta"] == {"name": "foo"} and info["restarts"] == 0
    assert pid_alive(info["child_pid"]) and info["rss_bytes"] > 0
    assert abs(info["started_at"] - time.time()) < 30
    assert bar.info["cmd"] == ["sleep", "30"]
    wait_for(lambda: "oops" in foo.output(), what="output")
    assert foo.output() == "hello\noops\n"  # stdout and stderr together, in order
    assert Path(info["output_path"]).read_text() == "hello\noops\n"

    assert pool.search({"meta": {"name": "foo"}}) == [foo]
    assert pool.search({"meta": {"deep": {"a": 1}}}) == [bar]  # nested dicts match recursively
    assert pool.search({"meta": {"deep": {"a": 2}}}) == []
    assert pool.search({"meta": {"name": "foo"}, "state": "running"}) == [foo]
    assert pool.search({"nosuchkey": 1}) == []
    assert pool.search(lambda i: i["meta"].get("name") == "bar") == [bar]
    assert pool.search(lambda i: i["meta"]["deep"]["a"] == 1) == [bar]  # KeyError on foo: no match
    assert pool.search(lambda i: 1 / 0) == []
    assert set(pool.search()) == {foo, bar}
    assert pool.task_by_pid(foo.pid) == foo
    assert pool.task_by_pid(os.getpid()) is None

    assert foo.terminate_supervisor() == -signal.SIGTERM
    assert foo.info["state"] == "exited" and foo.info["child_pid"] is None
    assert pool.search({"meta": {"name": "foo"}})[0].info["state"] == "exited"
    assert foo.output() == "hello\noops\n"  # still readable from the file after the end
    assert pool.search({"state": "running"}) == [bar]
    bar.terminate_supervisor()
    assert pool.clean() == 2 and pool.search() == [] and os.listdir(pool.path) == []


def test_exec_and_env(pool: TaskPool) -> None:
    script = "import os, sys; print(os.environ['K'], os.environ.get('HOME') is not None, sys.argv[1:])"
    task = pool.spawn(exec=[PY, "-c", script, "a b", "$HOME"], env={"K": "V 1"})
    assert task.wait(20) == 0
    assert task.output() == "V 1 True ['a b', '$HOME']\n"  # no shell: no splitting, no expansion
    shell = pool.spawn(cmd='echo "$K" $((1 + 2))', env={"K": "from env"}, inherit_env=False)
    assert shell.wait(20) == 0
    assert shell.output() == "from env 3\n"


def test_kill_reaches_child(pool: TaskPool) -> None:
    task = pool.spawn(exec=[*HELPER, "trap"], cwd=str(REPO))
    wait_for(lambda: "ready\n" in task.output(), 20, "child ready")
    assert task.kill("INT") is True
    assert task.wait(20) == 7
    assert task.output() == "ready\ngot INT\n"
    assert task.kill("TERM") is False  # nothing left to signal
    with pytest.raises(ValueError):
        pool.spawn(cmd="true").kill("NOSUCHSIG")

    # the whole process group: a shell's background and foreground children both
    shell = pool.spawn(cmd="sleep 30 & sleep 30; wait")
    child = shell.info["child_pid"]
    members = wait_for(lambda: len(group_members(child)) == 3 and group_members(child),
                       what="shell with two sleeps")
    assert shell.kill("TERM")
    wait_for(lambda: not any(pid_alive(p) for p in members), what="group killed")


def test_terminate_supervisor_leaves_nothing(pool: TaskPool) -> None:
    task = pool.spawn(cmd="sleep 30 & sleep 30 & wait", lockfile=str(Path(pool.path) / "t.lock"))
    child = task.info["child_pid"]
    members = wait_for(lambda: len(group_members(child)) == 3 and group_members(child),
                       what="shell with two sleeps")
    assert task.terminate_supervisor(10) is not None
    assert not pid_alive(task.pid)
    assert [p for p in members if pid_alive(p)] == []
    assert not os.path.exists(pool.store.socket_path(task.pid))
    assert task.info["state"] == "exited"
    pool.spawn(cmd="true", lockfile=str(Path(pool.path) / "t.lock")).wait(10)  # lock released

    # a child that ignores SIGTERM is SIGKILLed after stop_timeout
    stubborn = pool.spawn(exec=[*HELPER, "trap", "--ignore-term"], cwd=str(REPO),
                          stop_timeout=0.3)
    wait_for(lambda: "ready" in stubborn.output(), 20, "child ready")
    stubborn_child = stubborn.info["child_pid"]
    assert group_members(stubborn_child) == [stubborn_child]
    started = time.monotonic()
    assert stubborn.terminate_supervisor(10) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.3
    assert group_members(stubborn_child) == []


def test_restart_never_on_failure_always(pool: TaskPool, tmp_path: Path) -> None:
    never = pool.spawn(cmd="exit 3")
    counter = tmp_path / "count"
    script = (f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; '
              f'echo run $n; [ $n -ge 3 ] && exit 0; exit 1')
    on_failure = pool.spawn(cmd=script, restart="on-failure", start_secs=0, backoff=0.01)
    always = pool.spawn(cmd="echo run", restart="always", start_secs=0, backoff=0.01)
    assert never.wait(20) == 3 and never.info["restarts"] == 0
    assert on_failure.wait(20) == 0  # failed twice, restarted, then succeeded: no restart
    assert on_failure.info["restarts"] == 2
    assert on_failure.output() == "run 1\nrun 2\nrun 3\n"
    wait_for(lambda: always.info["restarts"] >= 3, what="always restarts even exit 0")
    assert always.terminate_supervisor(10) in (0, -signal.SIGTERM)  # between runs, or in one
    assert always.output().count("run\n") >= 4
    assert always.info["state"] == "exited"


def test_gives_up_after_startup_crashes_with_backoff(pool: TaskPool) -> None:
    started = time.monotonic()
    task = pool.spawn(cmd="echo crash; exit 1", restart="always", start_secs=5,
                      start_retries=3, backoff=0.1)
    assert task.wait(20) == 1
    elapsed = time.monotonic() - started
    info = task.info
    assert info["gave_up"] is True and info["restarts"] == 3 and info["state"] == "exited"
    assert elapsed >= 0.1 + 0.2 + 0.4  # exponential backoff between the crashes
    assert task.output().count("crash\n") == 4 and "gave up" in task.output()

    missing = pool.spawn(exec=["/nonexistent/program"], restart="on-failure", start_retries=1,
                         backoff=0.01)
    assert missing.wait(20) == 127
    assert "cannot start" in missing.output() and missing.info["restarts"] == 1


def test_lockfile_contention(pool: TaskPool, tmp_path: Path) -> None:
    lock = str(tmp_path / "countdate.lock")
    first = pool.spawn(exec=["sleep", "30"], lockfile=lock)
    assert first.info["lockfile"] == lock
    entries = pool.store.pids()
    with pytest.raises(LockHeld, match=str(first.pid)) as caught:
        pool.spawn(cmd="echo should not run", lockfile=lock)
    assert isinstance(caught.value, SQMError)
    assert pool.store.pids() == entries  # nothing started
    other = TaskPool(pool.path)  # another handle, as another process would have
    with pytest.raises(LockHeld):
        other.spawn(cmd="true", lockfile=lock, behavior="daemon")
    assert pool.store.pids() == entries
    # the kernel releases the lock when the supervisor dies, even by SIGKILL
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(first.pid), what="supervisor gone")
    second = pool.spawn(exec=["sleep", "30"], lockfile=lock)
    assert second.running
    second.terminate_supervisor()


def spawn_from_helper(pool: TaskPool, behavior: str) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([*HELPER, "spawn", pool.path, behavior], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None
    task_pid, spawner_sid = map(int, proc.stdout.readline().split())
    return proc, task_pid, spawner_sid


@pytest.mark.parametrize("behavior", ["background", "daemon"])
def test_background_and_daemon_outlive_spawner(pool: TaskPool, behavior: str) -> None:
    proc, pid, spawner_sid = spawn_from_helper(pool, behavior)
    assert proc.wait(20) == 0  # the spawner is gone ...
    task = pool.task_by_pid(pid)
    assert task is not None and task.running  # ... the task is not
    assert pid_alive(task.info["child_pid"])
    assert os.getsid(pid) != os.getsid(0)
    assert os.getpgid(pid) != spawner_sid  # not in the spawner's job: its Ctrl-C misses it
    if behavior == "background":
        assert os.getsid(pid) == spawner_sid  # detached, but in its spawner's session
    else:
        assert os.getsid(pid) not in (spawner_sid, os.getsid(0))  # a session of its own
        assert os.getsid(task.info["child_pid"]) == os.getsid(pid)
    task.terminate_supervisor()


def test_foreground_ends_with_its_spawner(pool: TaskPool) -> None:
    proc, pid, spawner_sid = spawn_from_helper(pool, "foreground")
    assert os.getsid(pid) == spawner_sid
    with open(f"/proc/{pid}/stat") as fh:
        assert int(fh.read().rsplit(")", 1)[1].split()[1]) == proc.pid  # still its child
    task = pool.task_by_pid(pid)
    assert task is not None and task.running
    child = task.info["child_pid"]
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not pid_alive(pid) and not pid_alive(child), what="task ended with spawner")
    assert task.info["state"] == "exited"


def test_foreground_wait_reaps(pool: TaskPool) -> None:
    task = pool.spawn(cmd="exit 4", behavior="foreground")
    assert task.wait(20) == 4
    assert process_start(task.pid) is None  # reaped, not a zombie


def test_output_bound_and_rotation(pool: TaskPool) -> None:
    task = pool.spawn(exec=[*HELPER, "lines", "300"], cwd=str(REPO), max_output=500,
                      output_file_bytes=1000, output_backups=2)
    wait_for(lambda: "done" in task.output(), 20, "all lines")
    live = task.output()
    assert len(live) <= 500 and live.endswith("line 00299\ndone\n")  # the ring holds the tail
    base = pool.store.output_path(task.pid)
    assert os.path.exists(base + ".1") and os.path.exists(base + ".2")
    assert not os.path.exists(base + ".3")  # only output_backups files are kept
    for name in (base, base + ".1", base + ".2"):
        assert os.path.getsize(name) <= 1000
    kept = b"".join(Path(n).read_bytes() for n in (base + ".2", base + ".1", base)).decode()
    lines = kept.splitlines()
    assert lines[-1] == "done" and lines[-2] == "line 00299"
    first = int(lines[1].split()[1])  # lines[0] may be the cut-off end of a rotated line
    assert lines[1:-1] == [f"line {i:05d}" for i in range(first, 300)]  # contiguous, no gaps
    assert first > 0  # older output was rotated away
    task.terminate_supervisor()
    assert task.output().endswith("line 00299\ndone\n") and len(task.output()) <= 500


def test_stale_entry_after_supervisor_sigkill(pool: TaskPool) -> None:
    task = pool.spawn(exec=["sleep", "30"], meta={"name": "doomed"})
    child = task.info["child_pid"]
    assert pool.search({"meta": {"name": "doomed"}, "state": "running"}) == [task]
    os.kill(task.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(task.pid), what="supervisor dead")
    assert (pool.store.read_state(task.pid) or {}).get("state") == "running"  # its last word
    assert pool.search({"meta": {"name": "doomed"}}) == []  # never reported running
    assert pool.task_by_pid(task.pid) is None
    assert not os.path.exists(pool.store.state_path(task.pid))  # cleaned
    assert task.info["state"] == "exited" and task.info["lost"] is True
    assert task.wait(5) is None
    wait_for(lambda: not pid_alive(child), what="orphaned child ended too")


def test_stale_entry_pid_reused_or_socket_gone(pool: TaskPool) -> None:
    me = os.getpid()
    state = {"pid": me, "state": "running", "meta": {"fake": 1}, "pid_start": 1}
    pool.store.write_state(me, state)  # our live pid, but another process's start time
    assert pool.search({"meta": {"fake": 1}}) == [] and pool.store.pids() == []
    pool.store.write_state(me, dict(state, pid_start=process_start(me)))  # right pid, no socket
    assert pool.task_by_pid(me) is None and pool.store.pids() == []


def test_wait_timeout_and_exit_code(pool: TaskPool) -> None:
    task = pool.spawn(exec=["sleep", "30"])
    started = time.monotonic()
    with pytest.raises(Timeout):
        task.wait(timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 5
    with pytest.raises(TimeoutError):  # Timeout is also the builtin
        task.wait(timeout=0.05)
    assert task.kill("TERM")
    assert task.wait(timeout=10) == -signal.SIGTERM
    assert pool.spawn(cmd="exit 5").wait(10) == 5


def test_task_by_pid_sees_other_processes_tasks(pool: TaskPool) -> None:
    proc, pid, _ = spawn_from_helper(pool, "background")
    proc.wait(20)
    task = pool.task_by_pid(pid)
    assert isinstance(task, Task) and task.info["meta"] == {"by": "helper"}
    assert task.terminate_supervisor() == -signal.SIGTERM


def test_cli(pool: TaskPool, tmp_path: Path) -> None:
    path = Path(pool.path)
    lock = str(tmp_path / "cli.lock")
    spawned = run_cli(path, "spawn", "--meta", "name=foo", "--meta", "team=a", "--env", "K=V",
                      "--lockfile", lock, "--restart", "on-failure", "--",
                      'echo "K is $K"; exec sleep 30')
    assert spawned.returncode == 0, spawned.stderr
    pid = int(spawned.stdout)
    held = run_cli(path, "spawn", "--lockfile", lock, "--", "true")
    assert held.returncode != 0 and "held" in held.stderr and len(held.stderr.splitlines()) == 1
    execd = run_cli(path, "spawn", "--meta", "name=bar", "--", *HELPER, "trap")
    assert execd.returncode == 0, execd.stderr
    bar = int(execd.stdout)

    listed = json.loads(run_cli(path, "list", "--json").stdout)
    assert {i["pid"] for i in listed} == {pid, bar}
    only = json.loads(run_cli(path, "list", "--json", "--meta", "name=foo").stdout)
    assert [(i["pid"], i["meta"], i["restart"]) for i in only] == [
        (pid, {"name": "foo", "team": "a"}, "on-failure")]
    table = run_cli(path, "list").stdout
    assert "PID" in table and str(pid) in table and "name=foo" in table and "running" in table
    info = json.loads(run_cli(path, "info", str(pid), "--json").stdout)
    assert info["state"] == "running" and info["lockfile"] == lock
    assert "state:" in run_cli(path, "info", str(pid)).stdout
    wait_for(lambda: run_cli(path, "output", str(pid)).stdout == "K is V\n", 20, "cli output")

    wait_for(lambda: "ready" in run_cli(path, "output", str(bar)).stdout, 20, "trap ready")
    assert run_cli(path, "kill", str(bar), "--signal", "INT").returncode == 0
    assert TaskPool(path).task_by_pid(bar).wait(10) == 7  # type: ignore[union-attr]
    assert run_cli(path, "output", str(bar)).stdout == "ready\ngot INT\n"

    assert run_cli(path, "stop", "--meta", "name=foo").returncode == 0
    assert not pid_alive(pid)
    assert json.loads(run_cli(path, "info", str(pid), "--json").stdout)["state"] == "exited"
    missing = run_cli(path, "kill", "999999")
    assert missing.returncode != 0 and "no task 999999" in missing.stderr
    assert run_cli(path, "kill").returncode != 0  # neither PID nor --meta
    assert run_cli(path, "stop", "--meta", "name=nobody").returncode != 0


def test_cli_output_follow(pool: TaskPool) -> None:
    path = Path(pool.path)
    pid = int(run_cli(path, "spawn", "--", "for i in 1 2 3; do echo tick $i; sleep 0.2; done").stdout)
    follow = run_cli(path, "output", str(pid), "--follow")  # returns when the task ends
    assert follow.returncode == 0 and follow.stdout == "tick 1\ntick 2\ntick 3\n"


def test_cli_in_process() -> None:
    from click.testing import CliRunner

    from sqm.taskpool.cli import pool as pool_group

    runner = CliRunner()
    with tempfile.TemporaryDirectory() as where:
        result = runner.invoke(pool_group, ["--path", where, "list", "--json"])
        assert result.exit_code == 0 and json.loads(result.output) == []
        result = runner.invoke(pool_group, ["--path", where, "spawn", "--meta", "oops", "--", "true"])
        assert result.exit_code != 0 and "KEY=VALUE" in result.output
        result = runner.invoke(pool_group, ["--path", where, "spawn", "--", "exit 2"])
        assert result.exit_code == 0, result.output
        task = TaskPool(where).task_by_pid(int(result.output))
        assert task is not None and task.wait(10) == 2
        assert "--follow" in runner.invoke(pool_group, ["output", "--help"]).output
