"""The README's synopsis runs exactly as printed; conf/sqm.yaml means what it says."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sqm.config import resolve
from tests.conftest import REPO, Proc, wait_for

pytestmark = pytest.mark.timeout(60)


def readme_file(name: str) -> str:
    """The python block of README.md whose first line is ``# name``."""
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if block.startswith(f"# {name}\n"):
            return block
    raise AssertionError(f"README has no python block for {name}")


def test_readme_first_screen_has_the_two_setup_commands():
    first_screen = "\n".join((REPO / "README.md").read_text().splitlines()[:20])
    commands = re.findall(r"^(?:bash \S+ && )?python3 -m venv .*$", first_screen, re.M)
    assert len(commands) == 2
    assert "sqm serve myqueue" in commands[0]
    assert "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    # .ci/run does what the README's test command does
    assert "python -m pytest" in ci and "bash .ci/install-browser" in ci
    assert commands[1].startswith("bash .ci/install-browser && ")


def test_synopsis_runs_as_printed(cluster, rundir):
    (rundir / "my_worker.py").write_text(readme_file("my_worker.py"))
    (rundir / "my_sender.py").write_text(readme_file("my_sender.py"))
    cluster.serve("myqueue", heartbeat=1.0)
    worker = Proc([sys.executable, str(rundir / "my_worker.py")], cluster.env, rundir, "w")
    cluster.procs.append(worker)
    cluster.wait_workers("myqueue", 1, proc=worker)
    out = subprocess.run(
        [sys.executable, str(rundir / "my_sender.py")], env=cluster.env, cwd=rundir,
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["{'response': 'I heard you!'}"] * 2
    # the oneway message was handled too (3 in all), then SIGTERM stops the worker cleanly
    wait_for(lambda: cluster.status("myqueue")["completed_total"] == 3, 10, "3 messages done")
    worker.signal(15)
    assert worker.wait(10) == 0


def test_example_config_resolves_as_documented(monkeypatch):
    for var in ("SQM_ENDPOINT", "SQM_RUNDIR", "SQM_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    conf = str(REPO / "conf" / "sqm.yaml")
    assert resolve("myqueue", config=conf).endpoint == "ipc:///tmp/sqm-example/myqueue.sock"
    resize = resolve("resize", config=conf)
    assert (resize.endpoint, resize.bind) == ("tcp://127.0.0.1:5555", "tcp://*:5555")
    assert resize.get("max_pending") == 5000 and resize.get("heartbeat") == 1.0
    assert resolve("reports", config=conf).endpoint == "ipc:///tmp/sqm-example/reports.sock"
