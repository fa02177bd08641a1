"""``python -m sqm.security keygen NAME [--dir DIR]``."""

from .cli import main

main(prog_name="python -m sqm.security")
