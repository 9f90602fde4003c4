"""Fields of a peer's map, read as their type or None: the one reading every layer uses (the wire,
the pipeline, node records, the dashboard's events).

A bool is neither an integer nor a number here (msgpack and JSON keep ``true`` apart from ``1``, and a
peer that sends one where a count belongs is wrong), and a number is finite. No torch and nothing of
meshd's: anything may import this.
"""

from __future__ import annotations

import math

#: Text fields are cut to this many characters unless the caller bounds them otherwise.
MAX_TEXT = 200


def wire_int(value: object) -> int | None:
    """An integer field, or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def wire_number(value: object) -> float | None:
    """A number field as a finite float, or None: NaN, an infinity or an integer past a float's range
    is no figure any field of ours can hold (and NaN would pass every comparison a caller makes)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def wire_bool(value: object) -> bool | None:
    """A true/false field, or None (``1``, ``0`` and the text ``"false"`` are none)."""
    return value if isinstance(value, bool) else None


def wire_text(value: object, limit: int = MAX_TEXT) -> str | None:
    """A text field cut to ``limit`` characters, or None."""
    return value[:limit] if isinstance(value, str) else None
