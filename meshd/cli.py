"""The ``meshd`` command."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("meshd: not built yet", file=sys.stderr)
    return 2
