"""The ``meshtui`` command."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("meshtui: not built yet", file=sys.stderr)
    return 2
