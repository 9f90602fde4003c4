"""Who gets in, and who gets a generation: pre-auth connections by source, the head's generation slots.

A daemon on a LAN meets hosts without the key. They may open connections, never authenticate and
reconnect in a loop from many addresses; :class:`HalfOpen` keeps such a flood from taking the
handshake slots a cluster member needs (docs/security.md). Once in, a key holder competes with the
other key holders for the head's generation slots, fairly (:class:`GenerationSlots`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

from .. import limits
from ..wire.connection import Connection


def source_of(addr: object) -> str:
    """Whom a connection counts against before it authenticates: its IPv4 address, or its IPv6 /64
    (one host's share of a LAN; an attacker there holds many addresses of it)."""
    host = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class HalfOpen:
    """The connections in their handshake: counted per source, and the one to drop when all are taken."""

    def __init__(self) -> None:
        self._conns: dict[Connection, tuple[str, float]] = {}  # source, accepted at
        self._by_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def admits(self, source: str) -> bool:
        """Whether a new connection from ``source`` may start its handshake (dropping another one to
        make room for it, where that is fair)."""
        if self._by_source.get(source, 0) >= limits.MAX_PREAUTH_PER_SOURCE:
            return False
        return len(self._conns) < limits.MAX_PREAUTH_CONNECTIONS or self._make_room_for(source)

    def add(self, conn: Connection, source: str) -> None:
        self._conns[conn] = (source, time.monotonic())
        self._by_source[source] = self._by_source.get(source, 0) + 1

    def _make_room_for(self, source: str) -> bool:
        """With every handshake slot taken, drop the half-open connection least likely to be a cluster
        member's, if that is fair to the newcomer from ``source``: one that has sent nothing yet before
        one that has, from the busiest source, the one waiting longest (a real client sends its hello
        in its first round trip). A flood from many addresses then churns through its own
        connections, and a client that connects among them gets its hello in."""
        newcomer = self._by_source.get(source, 0) + 1

        def unlikely_member(item) -> tuple:
            conn, (src, accepted) = item
            return conn.frames_received, -self._by_source[src], accepted

        victim, (victim_source, _) = min(self._conns.items(), key=unlikely_member)
        if self._by_source[victim_source] < newcomer:
            return False  # the newcomer's source already holds more: refuse it instead
        self.done(victim)
        victim.abort()
        return True

    def done(self, conn: Connection) -> None:
        """``conn`` finished its handshake, failed it, or was dropped."""
        entry = self._conns.pop(conn, None)
        if entry is None:
            return  # already counted out (dropped to make room)
        left = self._by_source.pop(entry[0]) - 1
        if left:
            self._by_source[entry[0]] = left


class GenerationSlots:
    """The head's generation slots: ``total`` at once, at most ``per_source`` for one source, granted
    first come first served among the waiters that may take one."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total, self.per_source = total, per_source
        self.held: dict[str, int] = {}
        self._waiters: list[tuple[str, asyncio.Future]] = []

    def _may_take(self, source: str) -> bool:
        return sum(self.held.values()) < self.total and self.held.get(source, 0) < self.per_source

    def _take(self, source: str) -> None:
        self.held[source] = self.held.get(source, 0) + 1

    async def acquire(self, source: str) -> None:
        """Wait for a slot for ``source``."""
        if self._may_take(source) and not any(s == source or self._may_take(s) for s, _ in self._waiters):
            self._take(source)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((source, waiter))
        try:
            await waiter  # granted (and counted) by release()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(source)  # granted just as we gave up: pass it on
            raise
        finally:
            self._waiters = [(s, w) for s, w in self._waiters if w is not waiter]

    def release(self, source: str) -> None:
        """Give a slot back (synchronous: safe in a cancelled task's ``finally``) and grant waiting ones."""
        self.held[source] -= 1
        if not self.held[source]:
            del self.held[source]
        for waiting_source, waiter in self._waiters:
            if not waiter.done() and self._may_take(waiting_source):
                self._take(waiting_source)
                waiter.set_result(None)
