"""CI-sized runs of ``python -m bench.fuzz`` (parser + core): no crash, invariants hold.

The full run (1,000,000 inputs, coverage-guided with atheris) is
``python -m bench.fuzz``; its figures are in docs/GUARANTEES.md.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bench import fuzz
from sqm.broker.server import QueueServer


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("sqm").setLevel(logging.CRITICAL)


def test_ci_sized_core_fuzz_finds_no_crash() -> None:
    driver = fuzz.CoreFuzz()
    tried = fuzz.run_random(driver, 150_000, seed=7)
    driver.close()
    assert tried == 150_000
    reached = driver.reached
    # the inputs got deep: messages accepted, dispatched and completed, workers
    # registered, refusals by the rights table, malformed input counted
    assert reached["accepted"] > 500 and reached["assigned_total"] > 500
    assert reached["completed_total"] > 100 and reached["workers_ever"] > 100
    assert reached["denied_total"] > 100 and reached["malformed_total"] > 1000


def test_the_fuzz_harness_catches_an_undocumented_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe works: a handler that raises something other than Malformed is a crash."""
    def broken(self: QueueServer, rid_frame: object, frames: list[bytes], now: float) -> None:
        raise KeyError("planted")

    monkeypatch.setattr(QueueServer, "_on_credit", broken)
    driver = fuzz.CoreFuzz()
    with pytest.raises(fuzz.Crash, match="planted"):
        fuzz.run_random(driver, 20_000, seed=7)


def test_the_fuzz_harness_catches_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe works: a core that loses count of what is in flight is caught."""
    from sqm.core import QueueCore

    real = QueueCore.done

    def leaky(self: QueueCore, *args: Any, **kw: Any) -> bool:
        ok = real(self, *args, **kw)
        self.in_flight += 1
        return ok

    monkeypatch.setattr(QueueCore, "done", leaky)
    driver = fuzz.CoreFuzz()
    with pytest.raises(fuzz.Crash):
        fuzz.run_random(driver, 50_000, seed=7)
