"""A user's own worker.py, sender.py or sqm.py in the current directory must
not replace sqm's packages in `sqm worker` or in the children it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

BOGUS = 'raise SystemExit("the user\'s own {name} was imported instead of sqm\'s")\n'
SQM_SCRIPT = Path(sys.executable).parent / "sqm"


def _app_dir(base: Path, *names: str) -> Path:
    """A directory holding a real app plus bogus modules named like sqm's packages."""
    app = base / "app"
    app.mkdir()
    (app / "myapp.py").write_text(
        "def add(worker, originator, payload):\n"
        "    return payload['a'] + payload['b']\n\n\n"
        "callbacks = {'add': add}\n"
    )
    for name in names:
        (app / name).write_text(BOGUS.format(name=name))
    return app


def _run_workers(cluster, app: Path, argv: list[str]) -> None:
    """Start a 2-process worker pool from ``app`` and wait for both to register."""
    err = open(app / "pool.stderr", "wb")
    proc = subprocess.Popen(argv, cwd=app, env=cluster.env, stdout=subprocess.DEVNULL,
                            stderr=err, start_new_session=True)
    try:
        cluster.wait_workers("q", 2, timeout=20,
                             proc=type("P", (), {"popen": proc, "name": "pool",
                                                 "stderr": property(lambda s: "")})())
        out = subprocess.run(
            [str(SQM_SCRIPT), "submit", "q", "add", '{"a": 2, "b": 3}'], cwd=app,
            env=cluster.env, capture_output=True, text=True, timeout=20,
        )
        assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr
    except AssertionError as exc:
        err.flush()
        raise AssertionError(f"{exc}\n{(app / 'pool.stderr').read_text()}") from None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        err.close()


def test_bogus_probe_modules_really_break_an_import(rundir):
    """The probe works: importing the bogus worker.py from its directory fails loudly."""
    app = _app_dir(rundir, "worker.py")
    out = subprocess.run([sys.executable, "-c", "import worker"], cwd=app,
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "the user's own worker.py" in out.stderr


def test_python_m_sqm_worker_processes_ignores_users_worker_and_sender_py(cluster, rundir):
    app = _app_dir(rundir, "worker.py", "sender.py")
    cluster.serve("q")
    _run_workers(cluster, app, [sys.executable, "-m", "sqm", "worker", "myapp:callbacks",
                                "--queue", "q", "--processes", "2", "--heartbeat", "0.2"])


def test_sqm_script_worker_processes_ignores_users_sqm_py(cluster, rundir):
    app = _app_dir(rundir, "worker.py", "sender.py", "sqm.py")
    cluster.serve("q")
    _run_workers(cluster, app, [str(SQM_SCRIPT), "worker", "myapp:callbacks",
                                "--queue", "q", "--processes", "2", "--heartbeat", "0.2"])
