"""``python -m sqm``: the ``sqm`` command.

``-m`` puts the current directory first on sys.path, where a user's own
``worker.py`` or ``sender.py`` would shadow sqm's sibling packages: put the
directory holding this sqm there instead (``sqm worker`` still imports the
user's MODULE from the current directory).
"""

import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path[0] = _root

from sqm.cli import main  # noqa: E402 - after the sys.path fix above

main()
