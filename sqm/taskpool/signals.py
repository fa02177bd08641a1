"""Signal names as users write them (``INT``, ``SIGINT``, ``2``), shared by API, CLI and supervisor."""

from __future__ import annotations

import signal


def signal_number(value: str | int) -> int:
    """``"INT"``, ``"SIGINT"``, ``"2"`` or ``2`` -> 2; ValueError for anything else."""
    try:
        if isinstance(value, int):
            return int(signal.Signals(value))
        text = value.strip().upper()
        if text.isdigit():
            return int(signal.Signals(int(text)))
        return int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {value!r}") from None
