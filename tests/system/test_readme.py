"""The README's synopsis runs exactly as printed; conf/sqm.yaml means what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    assert "python -m pytest" in ci and "bash .ci/install-test-deps" in ci
    assert commands[1].startswith("bash .ci/install-test-deps && ")


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


# ---------------------------------------------------------------- Command line section


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_readme_named_python_files_pass_the_projects_ruff():
    """Saved in the repo root as named, every README file passes `ruff check .` (I001...)."""
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
              if re.match(r"# \w+\.py\n", b)]
    assert len(blocks) >= 2
    ruff = Path(sys.executable).parent / "ruff"
    for block in blocks:
        name = block.splitlines()[0][2:]
        out = subprocess.run(
            [str(ruff), "check", "--config", str(REPO / "pyproject.toml"),
             "--stdin-filename", str(REPO / name), "-"],
            input=block, capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, f"{name}:\n{out.stdout}{out.stderr}"


def test_readme_command_rows_list_every_option_of_their_command():
    """Each command's rows in the table name exactly its options (as --help lists them);
    --endpoint/--config are said once above the table, except for serve."""
    from sqm.cli import main

    rows: dict[str, set[str]] = {}
    for row in re.findall(r"^\| `(sqm .*?)` \|", readme_section("Command line"), re.M):
        for usage in row.split("` / `"):
            name = usage.split()[1]
            rows.setdefault(name, set()).update(re.findall(r"--[a-z][a-z-]*", usage))
    assert set(rows) == set(main.commands), "a command without a row, or a row without one"
    for name, command in main.commands.items():
        options = {o for p in command.params for o in p.opts if o.startswith("--")}
        options.discard("--help")
        if name != "serve":
            options -= {"--endpoint", "--config"}
        assert rows[name] == options, (name, rows[name] ^ options)


def test_readme_command_line_examples_run_outside_the_repo(cluster, rundir):
    """The section's sh block, line by line, from a directory outside the repo with
    only sqm's own packages importable (not tests.*), as a user with the venv active."""
    block = re.search(r"```sh\n(.*?)```", readme_section("Command line"), re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert lines[0].startswith(". .venv/bin/activate")
    assert (REPO / ".venv" / "bin" / "activate").exists() or "VIRTUAL_ENV" not in os.environ
    site = rundir / "site"  # sqm's packages only, so tests.apps cannot be found
    site.mkdir()
    for package in ("sqm", "sender", "worker"):
        (site / package).symlink_to(REPO / package)
    outside = rundir / "elsewhere"
    outside.mkdir()
    env = dict(cluster.env, PYTHONPATH=str(site),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert subprocess.run([sys.executable, "-c", "import tests.apps"], cwd=outside, env=env,
                          capture_output=True, timeout=30).returncode != 0  # the probe holds
    cluster.serve("myqueue")
    background = [line for line in lines[1:] if line.rstrip().endswith("&")]
    assert len(background) == 1 and "--processes 4" in background[0]
    worker = subprocess.Popen(["bash", "-c", "exec " + background[0].rstrip(" &")], cwd=outside,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        cluster.wait_workers("myqueue", 4, timeout=30)
        outputs = []
        for line in lines[1:]:
            if line in background:
                continue
            command, _, comment = line.partition("  #")
            out = subprocess.run(["bash", "-c", command], cwd=outside, env=env,
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, f"{command}: {out.stderr}"
            if "prints " in comment:
                assert out.stdout.strip() == comment.split("prints ")[1].strip(), command
            outputs.append(out.stdout)
        assert outputs[1].split() == ["3", "7"]  # the --input line
        assert json.loads(outputs[2])["workers_current"] == 4  # status --json
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(15)
