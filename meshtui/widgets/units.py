"""Quantities written for people: bytes, rates, times, ages; ``None`` is "n/a", never 0."""

from __future__ import annotations

from ..report import human_bytes

NA = "n/a"


def size(n: float | None) -> str:
    return NA if n is None else human_bytes(n)


def link_rate(bytes_per_s: float | None) -> str:
    """A network rate in bits per second, as links are sold."""
    if bytes_per_s is None:
        return NA
    bits = bytes_per_s * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.0f} bit/s"


def gib(n: float) -> str:
    """Bytes as GiB, with a decimal only where it matters (9.5, 24, 141)."""
    value = n / 2**30
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def byte_rate(bytes_per_s: float | None) -> str:
    return NA if bytes_per_s is None else f"{human_bytes(bytes_per_s)}/s"


def ms(value: float | None, digits: int = 1) -> str:
    return NA if value is None else f"{value:.{digits}f} ms"


def pct(value: float | None) -> str:
    return NA if value is None else f"{value:.0f} %"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def metric_value(unit: str, value: float | None, total: float | None = None) -> str:
    """A telemetry reading in its unit (``total`` for a used/total pair such as VRAM)."""
    if value is None:
        return NA
    if unit == "%":
        return pct(value)
    if unit == "bytes":
        return f"{size(value)} / {size(total)}" if total else size(value)
    if unit == "bytes/s":
        return byte_rate(value)
    return f"{value:.0f} {unit}"
