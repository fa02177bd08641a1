"""The README's task pool synopsis runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sqm.taskpool import TaskPool
from tests.conftest import REPO


def readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if block.startswith(f"# {name}\n"):
            return block
    raise AssertionError(f"README has no python block for {name}")


def test_pool_synopsis_runs_as_printed(tmp_path: Path) -> None:
    (tmp_path / "pool_synopsis.py").write_text(readme_block("pool_synopsis.py"))
    out = subprocess.run([sys.executable, "pool_synopsis.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["running {'name': 'foo'}", "-2"]
    pool = TaskPool(tmp_path / "jobs")
    assert [t.info["state"] for t in pool.search({"meta": {"name": "foo"}})] == ["exited"]
