"""The ``net`` fixture: hosts in network namespaces (see tests/system/hosts.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.system.hosts import HarnessError, Network, require_tools, session_subnet, sweep_stale


@pytest.fixture(scope="session")
def netns_ready() -> str:
    """Check the harness can run (fail, never skip), sweep dead runs' leftovers."""
    try:
        require_tools()
        sweep_stale()
    except HarnessError as exc:
        pytest.fail(f"multi-host harness unavailable: {exc}", pytrace=False)
    return session_subnet()


@pytest.fixture
def net(netns_ready: str) -> Iterator[Network]:
    """A private network; ``hosts = net(3)`` gives three hosts on one switch.

    Everything it made is stopped and deleted after the test, pass or fail.
    """
    network = Network(subnet=netns_ready)
    try:
        yield network
    finally:
        network.close()
