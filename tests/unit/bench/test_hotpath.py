"""bench.hotpath still drives this tree's worker and Sender (it stubs the sends
module-wide, so it runs in a process of its own)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)


def test_it_times_each_step_of_this_tree() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.hotpath", "--n", "300", "--rounds", "1"],
                         cwd=REPO, check=True, timeout=100, capture_output=True, text=True).stdout
    figures = dict(re.findall(r"^  (.+?)\s+([\d.]+) µs/msg$", out, re.M))
    assert set(figures) == {"worker handle", "worker run", "worker handle (compact)",
                            "sender feed (4-frame ACK)", "sender feed (3-frame ACK)",
                            "sender feed (compact RESULT)"}, out
    assert all(float(us) > 0 for us in figures.values())
    # handle() is run() plus the runner's part: it cannot cost less
    assert float(figures["worker handle"]) > float(figures["worker run"]) * 0.8
