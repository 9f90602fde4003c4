"""The head's pool of channels to other daemons (meshd.pipeline.peers.PeerPool): which channels it closes
beyond MAX_POOLED_PEERS, while other generations use the pool. Fake channels, so the test chooses when each
close finishes (the real ones: tests/test_fuzz.py, a bounded number of channels)."""

from __future__ import annotations

import asyncio

from meshd import limits
from meshd.pipeline import peers
from meshd.pipeline.plan import PeerAddress
from meshd.wire.link import LinkRegistry


class FakeChannel:
    """What the pool reads of a channel: alive, idle, close (which waits for ``release`` when given one)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.idle = True
        self.release: asyncio.Event | None = None

    @property
    def alive(self) -> bool:
        return not self.closed

    async def close(self) -> None:
        if self.release is not None:
            await self.release.wait()
        self.closed = True


def fake_pool(monkeypatch) -> tuple[peers.PeerPool, list[FakeChannel]]:
    made: list[FakeChannel] = []

    async def connect(host, port, key, **_):
        await asyncio.sleep(0)
        made.append(FakeChannel(f"{host}:{port}"))
        return made[-1]

    monkeypatch.setattr(peers, "Channel", type("FakeChannelClass", (), {"connect": staticmethod(connect)}))
    return peers.PeerPool(None, LinkRegistry()), made


A, B, C = (PeerAddress("10.0.0.1", port) for port in (7001, 7002, 7003))


async def test_a_channel_taken_while_others_are_closed_is_not_closed_under_its_user(monkeypatch):
    """Two channels over the limit: while the first closes, a generation takes the second from the pool.
    The eviction chose both before closing any, so the generation gets a fresh channel, not one the
    eviction closes a moment later (it was the least recently used no more)."""
    pool, _ = fake_pool(monkeypatch)
    monkeypatch.setattr(limits, "MAX_POOLED_PEERS", 3)
    first_a, first_b = await pool.get(A), await pool.get(B)
    first_a.release = asyncio.Event()
    monkeypatch.setattr(limits, "MAX_POOLED_PEERS", 1)
    evicting = asyncio.ensure_future(pool.get(C))  # connects C, then closes A (held open) and B
    while not pool._channels.get(str(C)):
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    used = await pool.get(B)  # another generation, while A is still closing
    first_a.release.set()
    await evicting
    assert used.alive
    assert first_a.closed and (used is not first_b or not first_b.closed)


async def test_a_channel_replaced_while_others_are_closed_does_not_fail_the_eviction(monkeypatch):
    """A generation reconnects a dead channel the eviction also chose (it is out of the pool while its old
    connection closes): the eviction must not look it up again after closing the others."""
    pool, _ = fake_pool(monkeypatch)
    monkeypatch.setattr(limits, "MAX_POOLED_PEERS", 3)
    first_a, first_b = await pool.get(A), await pool.get(B)
    first_a.release, first_b.release = asyncio.Event(), asyncio.Event()
    first_b.closed = True  # dropped by its peer: the next get(B) closes it and connects again
    monkeypatch.setattr(limits, "MAX_POOLED_PEERS", 1)
    evicting = asyncio.ensure_future(pool.get(C))
    while not pool._channels.get(str(C)):
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    replacing = asyncio.ensure_future(pool.get(B))
    await asyncio.sleep(0)
    first_a.release.set()
    first_b.release.set()
    channel_c = await evicting  # not a KeyError
    assert channel_c.name == str(C)
    assert (await replacing).alive
