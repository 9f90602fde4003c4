"""Block ranges: half-open ``[start, end)`` inside, as plans and the wire hold them, and inclusive
(``0-15``) only where a user reads them (:meth:`BlockRange.shown`), the notation of ``--split A:0-15``.

No torch here: the headless command's output and its parser use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..fields import wire_int

#: At most this many block ranges are read from one wire list (a span is one or two ranges in practice).
MAX_RANGES = 256


@dataclass(frozen=True, order=True)
class BlockRange:
    """Blocks ``start`` to ``end - 1`` of the flattened order [double..., single...]."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"block range [{self.start}, {self.end}) is empty or negative")

    @classmethod
    def from_wire(cls, value: object) -> BlockRange | None:
        """``[start, end)`` as the wire sends it; None for anything else."""
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            return None
        start, end = (wire_int(v) for v in value)
        return cls(start, end) if start is not None and end is not None and 0 <= start < end else None

    @classmethod
    def from_inclusive(cls, value: object) -> BlockRange | None:
        """``[first, last]``, as a hop record names the blocks its receiver ran; None for anything else."""
        pair = value if isinstance(value, (list, tuple)) and len(value) == 2 else (None, None)
        first, last = (wire_int(v) for v in pair)
        return cls.from_wire([first, last + 1]) if first is not None and last is not None else None

    @classmethod
    def many_from_wire(cls, value: object) -> tuple[BlockRange, ...]:
        ranges = (cls.from_wire(item) for item in (value[:MAX_RANGES] if isinstance(value, list) else ()))
        return tuple(r for r in ranges if r is not None)

    def to_wire(self) -> list[int]:
        return [self.start, self.end]

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def shown(self) -> str:
        """Inclusive, as a user writes a split: ``0-15``, or ``7`` for one block."""
        return f"{self.start}-{self.end - 1}" if len(self) > 1 else str(self.start)


def blocks_shown(ranges: Iterable[BlockRange]) -> str:
    """``0-15,20`` (``none`` for no blocks): how a user reads the blocks a peer holds."""
    return ",".join(r.shown() for r in ranges) or "none"
