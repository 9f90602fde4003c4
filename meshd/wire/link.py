"""Link accounting and emulation.

:class:`LinkStats` counts bytes and recent hop times per peer (telemetry reads it).
:class:`LinkEmulation` shapes what a connection sends — a token bucket on bytes plus a fixed delay —
to measure a split over a slow link on a machine without one (figures so made are labelled
"emulated").
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

_RATE = re.compile(r"^\s*([\d.]+)\s*([kmg]?)(bit|byte)?(?:/s|ps)?\s*$", re.IGNORECASE)
_DELAY = re.compile(r"^\s*([\d.]+)\s*(us|ms|s)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class LinkEmulation:
    """A link of ``rate_bytes_per_s`` that delivers each frame ``delay_s`` late."""

    rate_bytes_per_s: float
    delay_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LinkEmulation:
        """``"1gbit,0.3ms"``, ``"100mbit"``, ``"2.5gbit,1ms"``, ``"500mbyte"`` (bits unless it says byte)."""
        parts = [p for p in text.split(",") if p.strip()]
        if not parts or len(parts) > 2:
            raise ValueError(f"link emulation {text!r} must be RATE[,DELAY], e.g. 1gbit,0.3ms")
        m = _RATE.match(parts[0])
        if not m:
            raise ValueError(f"cannot read link rate {parts[0]!r} (try 1gbit, 100mbit, 500mbyte)")
        value = float(m.group(1)) * _SCALE[m.group(2).lower()]
        unit = (m.group(3) or "bit").lower()
        rate = value if unit == "byte" else value / 8
        delay = 0.0
        if len(parts) == 2:
            d = _DELAY.match(parts[1])
            if not d:
                raise ValueError(f"cannot read link delay {parts[1]!r} (try 0.3ms)")
            delay = float(d.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[d.group(2).lower()]
        if rate <= 0:
            raise ValueError("link rate must be positive")
        return cls(rate, delay)

    def describe(self) -> str:
        return f"{self.rate_bytes_per_s * 8 / 1e9:g} Gbit/s, {self.delay_s * 1e3:g} ms (emulated)"


class TokenBucket:
    """Paces bytes to exactly ``rate`` bytes/s on average.

    Virtual-clock pacing: each send is due when the link would have finished everything before it;
    oversleeping delays one send but not the average rate (a plain bucket with sleeps ran ~8% slow
    at 1 Gbit/s). Up to ``window`` seconds of data may be handed to the kernel early.
    """

    def __init__(self, rate: float, window: float = 0.005) -> None:
        self.rate = rate
        self.window = window
        self._done = 0.0

    async def consume(self, nbytes: int) -> None:
        now = time.monotonic()
        self._done = max(self._done, now) + nbytes / self.rate
        delay = self._done - now - self.window
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class HopSample:
    at: float
    nbytes: int
    ms: float


@dataclass
class LinkStats:
    """Bytes moved to and from one peer, and its recent hop times (thread-safe)."""

    peer: str
    bytes_sent: int = 0
    bytes_received: int = 0
    hops: deque = field(default_factory=lambda: deque(maxlen=64))
    last_active: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n
            self.last_active = time.monotonic()

    def received(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n
            self.last_active = time.monotonic()

    def hop(self, nbytes: int, ms: float) -> None:
        with self._lock:
            self.hops.append(HopSample(time.time(), nbytes, ms))

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "peer": self.peer,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "recent_hop_ms": [round(h.ms, 3) for h in list(self.hops)[-8:]],
            }


class LinkRegistry:
    """Per-peer LinkStats of one daemon or client; peers idle for ``max_idle`` seconds are forgotten."""

    def __init__(self, max_idle: float = 3600.0) -> None:
        self._links: dict[str, LinkStats] = {}
        self._lock = threading.Lock()
        self.max_idle = max_idle

    def get(self, peer: str) -> LinkStats:
        with self._lock:
            if peer not in self._links:
                now = time.monotonic()
                for name in [n for n, link in self._links.items() if now - link.last_active > self.max_idle]:
                    del self._links[name]
                self._links[peer] = LinkStats(peer)
            return self._links[peer]

    def snapshot(self) -> list[dict]:
        with self._lock:
            links = list(self._links.values())
        return [link.snapshot() for link in links]
