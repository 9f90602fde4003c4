"""Authenticated channels from this process to other daemons, reused across jobs, with measured
link bandwidth per peer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .. import limits
from ..wire.connection import Channel
from ..wire.link import LinkEmulation, LinkRegistry
from .plan import PeerAddress



@dataclass
class Bandwidth:
    bytes_per_s: float
    rtt_ms: float
    measured_at: float


class PeerPool:
    def __init__(self, key: bytes | None, links: LinkRegistry, emulation: LinkEmulation | None = None,
                 hello: dict | None = None, allocator=None) -> None:
        self.key = key
        self.allocator = allocator
        self.links = links
        self.emulation = emulation
        self.hello = hello or {}
        self._channels: dict[str, Channel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._callers: dict[str, int] = {}  # get() calls in progress per address
        self._bandwidth: dict[str, Bandwidth] = {}

    async def get(self, address: PeerAddress) -> Channel:
        key = str(address)
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._callers[key] = self._callers.get(key, 0) + 1
        try:
            async with lock:
                channel = self._channels.pop(key, None)  # re-inserted last: the dict's order is recency
                fresh = channel is None or not channel.alive
                if fresh:
                    if channel is not None:
                        await channel.close()
                        self._bandwidth.pop(key, None)
                    try:
                        channel = await Channel.connect(address.host, address.port, self.key,
                                                        stats=self.links.get(key), emulation=self.emulation,
                                                        hello=self.hello, allocator=self.allocator)
                    except BaseException:
                        if self._callers[key] == 1:  # nobody else waits for this address: forget it
                            self._locks.pop(key, None)
                        raise
                self._channels[key] = channel
        finally:
            self._callers[key] -= 1
            if not self._callers[key]:
                del self._callers[key]
        if fresh:
            await self._evict()
        return channel

    async def _evict(self) -> None:
        """Close the least recently used idle channels beyond limits.MAX_POOLED_PEERS."""
        for key in list(self._channels)[: max(0, len(self._channels) - limits.MAX_POOLED_PEERS)]:
            channel, lock = self._channels[key], self._locks.get(key)
            if not channel.idle or (lock is not None and lock.locked()):
                continue
            del self._channels[key]
            self._locks.pop(key, None)
            self._bandwidth.pop(key, None)
            await channel.close()

    async def bandwidth(self, address: PeerAddress) -> Bandwidth:
        """Measured bytes/s to ``address`` (a probe of BANDWIDTH_PROBE_BYTES, re-measured every 5 min)."""
        key = str(address)
        known = self._bandwidth.get(key)
        if known and time.monotonic() - known.measured_at < limits.BANDWIDTH_MAX_AGE_S:
            return known
        channel = await self.get(address)
        t0 = time.perf_counter()
        await channel.request("echo")
        rtt = time.perf_counter() - t0
        payload = bytes(limits.BANDWIDTH_PROBE_BYTES)
        t0 = time.perf_counter()
        await channel.request("probe", {}, [payload])
        elapsed = max(time.perf_counter() - t0 - rtt, 1e-6)
        measured = Bandwidth(len(payload) / elapsed, rtt * 1e3, time.monotonic())
        self._bandwidth[key] = measured
        return measured

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
