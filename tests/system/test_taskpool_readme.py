"""The README's task pool synopsis runs as printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqm.taskpool import TaskPool
from tests.system.test_readme import readme_file


def test_pool_synopsis_runs_as_printed(tmp_path: Path) -> None:
    (tmp_path / "pool_synopsis.py").write_text(readme_file("pool_synopsis.py"))
    out = subprocess.run([sys.executable, "pool_synopsis.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["running {'name': 'foo'}", "-2"]
    pool = TaskPool(tmp_path / "jobs")
    assert [t.info["state"] for t in pool.search({"meta": {"name": "foo"}})] == ["exited"]
