"""keygen as a real process and through click: pyzmq reads its output, the secret is 0600, errors are one line."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner

from sqm.security.cli import keygen

REPO = Path(__file__).resolve().parents[2]


def run_keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqm.security", "keygen", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def test_keygen_process_writes_a_pair_pyzmq_reads(tmp_path: Path) -> None:
    done = run_keygen("broker", "--dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "keys" / "broker.key", tmp_path / "keys" / "broker.key_secret"
    assert str(public) in done.stdout and str(secret) in done.stdout
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and sec is not None and pub == pub2 == zmq.curve_public(sec)


def test_keygen_defaults_to_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(keygen, ["here"])
    assert result.exit_code == 0, result.output
    assert zmq.auth.load_certificate(tmp_path / "here.key_secret")[1] is not None


@pytest.mark.parametrize("args, problem", [
    (["a/b"], "must be a plain file name"),
    ([".hidden"], "must be a plain file name"),
])
def test_keygen_bad_names_are_one_line_errors(tmp_path: Path, args: list[str], problem: str) -> None:
    done = run_keygen(*args, "--dir", str(tmp_path))
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and problem in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_keygen_existing_pair_is_kept_unless_forced(tmp_path: Path) -> None:
    assert run_keygen("w", "--dir", str(tmp_path)).returncode == 0
    before = (tmp_path / "w.key").read_text()
    done = run_keygen("w", "--dir", str(tmp_path))
    assert done.returncode != 0
    assert done.stderr.strip() == f"Error: key file {tmp_path}/w.key: already exists (use --force to replace it)"
    assert (tmp_path / "w.key").read_text() == before
    done = run_keygen("w", "--dir", str(tmp_path), "--force")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "w.key").read_text() != before
    assert stat.S_IMODE((tmp_path / "w.key_secret").stat().st_mode) == 0o600


def test_keygen_dir_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = run_keygen("k", "--dir", str(blocker / "sub"))
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and str(blocker / "sub") in done.stderr
    assert "Traceback" not in done.stderr


def test_keygen_help() -> None:
    result = CliRunner().invoke(keygen, ["--help"])
    assert result.exit_code == 0 and "NAME.key_secret" in result.output
