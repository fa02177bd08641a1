"""What a new user met in the first hour with the command line (issue 17),
each checked with real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def sqm(env: dict[str, str], *args: str, cwd: Path | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqm", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


# ---------------------------------------------------------------- 3: one-line errors


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("callbacks = {\n    'add': lambda w, o, p: p +\n}\n", "SyntaxError"),
        ("import os\n\nraise RuntimeError('config missing')\ncallbacks = {}\n",
         "RuntimeError: config missing"),
        ("import no_such_module_xyz\n", "No module named 'no_such_module_xyz'"),
    ],
    ids=["syntax-error", "raises-at-import", "imports-missing-module"],
)
def test_worker_on_a_broken_module_is_one_line_naming_the_users_file(cluster, rundir,
                                                                       source, expected):
    app = rundir / "app"
    app.mkdir()
    (app / "broken.py").write_text(source)
    out = sqm(cluster.env, "worker", "broken:callbacks", "--queue", "q", cwd=app)
    line = _one_line_error(out)
    assert "cannot import 'broken'" in line and expected in line, line
    if "No module" not in expected:
        assert "broken.py, line" in line, line  # the user's own file and line
    # --log-level debug adds the full traceback
    debug = sqm(cluster.env, "worker", "broken:callbacks", "--queue", "q",
                "--log-level", "debug", cwd=app)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line


def test_worker_with_a_callback_that_is_not_callable_is_one_line(cluster, rundir):
    app = rundir / "app"
    app.mkdir()
    (app / "notcallable.py").write_text("callbacks = {'add': 1, 'echo': print}\n")
    line = _one_line_error(sqm(cluster.env, "worker", "notcallable:callbacks", "--queue", "q",
                               cwd=app))
    assert "not callable: add" in line, line


def test_serve_names_sqm_rundir_when_it_cannot_create_it(cluster):
    env = dict(cluster.env, SQM_RUNDIR="/proc/x")
    line = _one_line_error(sqm(env, "serve", "q"))
    assert "SQM_RUNDIR" in line and "/proc/x" in line, line


def _dir_of_length(base: Path, length: int) -> Path:
    path = base / ("d" * (length - len(str(base)) - 1))
    assert len(str(path)) == length
    return path


def test_serve_refuses_a_rundir_too_long_for_sender_mailboxes(cluster, rundir):
    """90 bytes: q.sock fits in 107, but mbox-<16 hex>.sock beside it does not."""
    long_dir = _dir_of_length(rundir, 90)
    assert len(str(long_dir / "q.sock")) <= 107 < len(str(long_dir / ("m" * 26)))
    env = dict(cluster.env, SQM_RUNDIR=str(long_dir))
    line = _one_line_error(sqm(env, "serve", "q"))
    assert "SQM_RUNDIR" in line and "mailbox" in line and "107" in line, line


def test_serve_refuses_a_queue_socket_path_over_the_limit(cluster, rundir):
    long_dir = _dir_of_length(rundir, 104)
    env = dict(cluster.env, SQM_RUNDIR=str(long_dir))
    line = _one_line_error(sqm(env, "serve", "q"))
    assert "SQM_RUNDIR" in line and "107" in line and "q.sock" in line, line


def test_serve_refuses_a_too_long_endpoint_naming_the_option(cluster, rundir):
    path = str(_dir_of_length(rundir, 100)) + "/queue.sock"
    line = _one_line_error(sqm(cluster.env, "serve", "q", "--endpoint", f"ipc://{path}"))
    assert "endpoint argument" in line and "107" in line, line


# ---------------------------------------------------------------- 5: pickle from the CLI


def test_submit_allow_pickle_reaches_a_worker_that_allows_it(cluster):
    cluster.serve("q")
    cluster.worker("q", "--allow-pickle", target="sqm.examples:callbacks")
    ok = sqm(cluster.env, "submit", "q", "add", '{"a": 1, "b": 2}', "--serializer", "pickle",
             "--allow-pickle")
    assert ok.returncode == 0 and ok.stdout.strip() == "3", ok.stderr
    refused = sqm(cluster.env, "submit", "q", "add", '{"a": 1, "b": 2}',
                  "--serializer", "pickle")
    line = _one_line_error(refused)
    assert "SerializerError" in line and "pickle" in line, line
    assert cluster.status("q")["completed_total"] == 1


# ---------------------------------------------------------------- 6: bare `sqm`


def test_sqm_without_arguments_prints_the_help_without_error_framing(cluster):
    out = sqm(cluster.env)
    assert out.returncode == 2, out
    text = out.stdout + out.stderr
    assert text.startswith("Usage: ") and "Commands:" in text, text
    assert "Error" not in text and "see '" not in text, text


def test_unknown_command_is_still_a_one_line_usage_error(cluster):
    out = sqm(cluster.env, "serv")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
