"""Benchmark suite for sqm: ``python -m bench`` (see ``bench/README.md``).

Compares the sqm queue manager (sync ``Sender`` and ``AsyncSender``) against a
minimal raw-pyzmq load-balancing broker with the same topology
(:mod:`bench.baseline`), on the workloads defined in :mod:`bench.common`.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
