"""``python -m sqm.taskpool ...`` is ``sqm pool ...``."""

from .cli import run

run()
