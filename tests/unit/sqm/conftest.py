"""Fixtures shared by the server-level tests (test_dispatch_batches, test_accepted)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.sqm.test_dispatch_batches import Setup


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A real QueueServer on an ipc endpoint and a sender's DEALER, driven by hand."""
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()
