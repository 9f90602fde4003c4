"""meshd's own per-peer traffic, from the daemon's :class:`~meshd.wire.link.LinkRegistry`, as rates."""

from __future__ import annotations

from dataclasses import dataclass

from ..wire.link import LinkRegistry
from .host import counter_rate
from .snapshot import LinkSnapshot

#: A link that moved no byte for this long leaves the snapshot (inbound links are per connection).
LINK_ACTIVE_WINDOW_S = 60.0
#: Links listed per snapshot, most recently active first.
MAX_LINKS = 64


@dataclass
class _LinkSeen:
    at: float
    sent: int
    received: int
    changed_at: float


class LinkReader:
    """meshd's own per-peer traffic (from its :class:`LinkRegistry`), as rates."""

    def __init__(self, links: LinkRegistry) -> None:
        self.links = links
        self._seen: dict[str, _LinkSeen] = {}

    def read(self, now: float) -> tuple[LinkSnapshot, ...]:
        active: list[tuple[float, LinkSnapshot]] = []
        for stats in self.links.snapshot():
            peer, sent, received = stats["peer"], int(stats["bytes_sent"]), int(stats["bytes_received"])
            before = self._seen.get(peer)
            tx = rx = None
            changed_at = now
            if before is not None:
                tx = counter_rate(sent, before.sent, now - before.at)
                rx = counter_rate(received, before.received, now - before.at)
                if (sent, received) == (before.sent, before.received):
                    changed_at = before.changed_at
            self._seen[peer] = _LinkSeen(now, sent, received, changed_at)
            if now - changed_at > LINK_ACTIVE_WINDOW_S:
                continue
            active.append((changed_at, LinkSnapshot(peer, sent_bytes_per_s=tx, received_bytes_per_s=rx,
                                                    bytes_sent=sent, bytes_received=received,
                                                    recent_hop_ms=tuple(stats.get("recent_hop_ms", ())))))
        active.sort(key=lambda item: item[0], reverse=True)
        return tuple(link for _, link in active[:MAX_LINKS])
