"""A Sender removes its own mailbox socket file (issue 17, point 1).

Before: every Sender left ``mbox-<hex>.sock`` in the run directory, even
after close() / ``with``: 20 one-shot senders added 20 files.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from sender import AsyncSender, Sender
from tests.conftest import Cluster


def mailboxes(rundir: Path) -> list[Path]:
    return sorted(rundir.glob("mbox-*.sock"))


def run_child(cluster: Cluster, code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=cluster.env, cwd=cluster.rundir,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_close_and_with_remove_the_mailbox_file(cluster: Cluster) -> None:
    cluster.serve("q")
    cluster.worker("q")
    s = Sender("q")
    path = Path(s.mailbox[len("ipc://"):])
    assert path.parent == cluster.rundir and mailboxes(cluster.rundir) == [path]  # the probe sees it
    assert s.rpc("add", {"a": 1, "b": 2}) == 3
    s.close()
    assert mailboxes(cluster.rundir) == []
    with Sender("q") as s2:
        assert s2.rpc("add", {"a": 2, "b": 2}) == 4
        assert len(mailboxes(cluster.rundir)) == 1
    assert mailboxes(cluster.rundir) == []


def test_async_close_removes_the_mailbox_file(cluster: Cluster) -> None:
    cluster.serve("q")
    cluster.worker("q")

    async def main() -> int:
        async with AsyncSender("q") as s:
            assert len(mailboxes(cluster.rundir)) == 1
            return int(await s.rpc("add", {"a": 3, "b": 4}))

    assert asyncio.run(main()) == 7
    assert mailboxes(cluster.rundir) == []


def test_one_shot_sender_processes_leave_no_files(cluster: Cluster) -> None:
    cluster.serve("q")
    cluster.worker("q")
    with_close = (
        "from sender import Sender\n"
        "with Sender('q') as s:\n"
        "    print(s.rpc('add', {'a': 1, 'b': 1}))\n"
    )
    # never closed: the interpreter's exit removes the file
    left_open = (
        "from sender import Sender\n"
        "s = Sender('q')\n"
        "print(s.rpc('add', {'a': 1, 'b': 2}), s.mailbox)\n"
        "import builtins; builtins.keep = s\n"
    )
    for _ in range(3):
        assert run_child(cluster, with_close).strip() == "2"
    out = run_child(cluster, left_open).split()
    assert out[0] == "3" and out[1].startswith(f"ipc://{cluster.rundir}/mbox-")
    assert mailboxes(cluster.rundir) == []


def test_a_forked_child_leaves_its_parents_mailbox_alone(cluster: Cluster) -> None:
    cluster.serve("q")
    cluster.worker("q")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from sender import Sender\n"
        "s = Sender('q')\n"
        "path = Path(s.mailbox[len('ipc://'):])\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)  # a normal exit: atexit handlers run in the child\n"
        "os.waitpid(pid, 0)\n"
        "print(path.exists(), s.rpc('add', {'a': 5, 'b': 5}))\n"
        "s.close()\n"
        "print(path.exists())\n"
    )
    assert run_child(cluster, code).split() == ["True", "10", "False"]
    assert mailboxes(cluster.rundir) == []
