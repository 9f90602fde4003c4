"""Fields of a peer's map, read as their type or None: the one reading every layer uses (the wire,
the pipeline, node records, the dashboard's events).

A bool is neither an integer nor a number here (msgpack and JSON keep ``true`` apart from ``1``, and a
peer that sends one where a count belongs is wrong). No torch and nothing of meshd's: anything may
import this.
"""

from __future__ import annotations

#: Text fields are cut to this many characters unless the caller bounds them otherwise.
MAX_TEXT = 200


def wire_int(value: object) -> int | None:
    """An integer field, or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def wire_number(value: object) -> float | None:
    """A number field as a float, or None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def wire_bool(value: object) -> bool | None:
    """A true/false field, or None (``1``, ``0`` and the text ``"false"`` are none)."""
    return value if isinstance(value, bool) else None


def wire_text(value: object, limit: int = MAX_TEXT) -> str | None:
    """A text field cut to ``limit`` characters, or None."""
    return value[:limit] if isinstance(value, str) else None
