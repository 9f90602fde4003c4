"""The one client side of a peer, used by every part that talks to one: the head's pool of
authenticated channels to its stages (:class:`PeerPool`), the dashboard's and ``meshtui generate``'s
mesh, the dashboard's peer monitor, and discovery's verification.

One way to connect and read a peer's info (:func:`read_info`), one way to measure the link to it
(:func:`measure_bandwidth`): the head's figure for a link and the dashboard's own one are the same
quantity, so the Split screen can show them in one column.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .. import limits
from ..node.info import NodeInfo
from ..wire.channel import Channel
from ..wire.link import LinkEmulation, LinkRegistry
from .plan import PeerAddress


@dataclass(frozen=True)
class Bandwidth:
    """One measurement of a link: its throughput and round-trip time, and when it was taken."""

    bytes_per_s: float
    rtt_ms: float
    measured_at: float  # time.monotonic()


@dataclass(frozen=True)
class InfoReply:
    """A peer's ``info``, parsed: what it says about itself, its per-peer link counters (raw maps, read by
    the telemetry code) and the round trip the request took."""

    node: NodeInfo
    links: list
    rtt_ms: float


async def read_info(channel: Channel, timeout: float | None = limits.REQUEST_TIMEOUT_S) -> InfoReply:
    """Ask ``channel``'s peer for its ``info`` (MeshError when it cannot answer)."""
    t0 = time.perf_counter()
    reply = await channel.request("info", timeout=timeout)
    rtt_ms = (time.perf_counter() - t0) * 1e3
    links = reply.header.get("links")
    return InfoReply(NodeInfo.from_wire(reply.header.get("node")), links if isinstance(links, list) else [], rtt_ms)


async def measure_bandwidth(channel: Channel, nbytes: int = limits.BANDWIDTH_PROBE_BYTES,
                            timeout: float | None = limits.REQUEST_TIMEOUT_S) -> Bandwidth:
    """Bytes/s from this process to ``channel``'s peer: an echo (the round trip), then ``nbytes`` one way.

    The throughput is ``nbytes`` over the whole probe request. That is a lower bound, close on the slow
    links where the figure decides the codec; subtracting a round trip measured apart instead overshoots
    wildly on fast ones, where the probe takes little longer than the echo's jitter."""
    t0 = time.perf_counter()
    await channel.request("echo", timeout=timeout)
    rtt = time.perf_counter() - t0
    t0 = time.perf_counter()
    await channel.request("probe", {}, [bytes(nbytes)], timeout=timeout)
    return Bandwidth(nbytes / max(time.perf_counter() - t0, 1e-6), rtt * 1e3, time.monotonic())


class PeerPool:
    """The head's authenticated channels to other daemons, reused across jobs (least recently used
    idle ones closed beyond limits.MAX_POOLED_PEERS), with each link's last measurement."""

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
        """Close the least recently used idle channels beyond limits.MAX_POOLED_PEERS.

        All of them are taken out of the pool before the first is closed: a close awaits, and meanwhile
        another get() may take one of the others (then the most recent, and its caller's) or hold it out
        of the pool while it reconnects."""
        victims = []
        for key in list(self._channels)[: max(0, len(self._channels) - limits.MAX_POOLED_PEERS)]:
            channel, lock = self._channels[key], self._locks.get(key)
            if not channel.idle or (lock is not None and lock.locked()):
                continue
            del self._channels[key]
            self._locks.pop(key, None)
            self._bandwidth.pop(key, None)
            victims.append(channel)
        for channel in victims:
            await channel.close()

    async def bandwidth(self, address: PeerAddress) -> Bandwidth:
        """The link to ``address`` (:func:`measure_bandwidth`), measured again after BANDWIDTH_MAX_AGE_S."""
        key = str(address)
        known = self._bandwidth.get(key)
        if known and time.monotonic() - known.measured_at < limits.BANDWIDTH_MAX_AGE_S:
            return known
        measured = await measure_bandwidth(await self.get(address))
        self._bandwidth[key] = measured
        return measured

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
