"""sqm: a one-of-many queue manager over ZeroMQ.

The broker lives here (``sqm serve``); clients are in the sibling packages
``sender`` and ``worker``.
"""

__version__ = "0.1.0"
