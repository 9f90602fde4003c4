"""Typed messages from the workers (network I/O) up to the app, which pushes state down to screens.

High-frequency messages (a peer's health, its telemetry) replace an older queued one of the same
peer instead of piling up behind a busy UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.message import Message

from meshd.pipeline.plan import PeerAddress, SplitPlan
from meshd.telemetry.snapshot import NodeSnapshot

from .events import Event
from .views import PeerView


@dataclass
class PeerUpdated(Message):
    """A peer's health or facts changed (connected, polled, failed, link measured)."""

    view: PeerView

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, PeerUpdated) and message.view.label == self.view.label


@dataclass
class TelemetrySampled(Message):
    """One telemetry sample of a peer; ``source`` is "daemon" (pushed) or "info" (from health polls)."""

    label: str
    snapshot: NodeSnapshot
    source: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TelemetrySampled) and message.label == self.label


@dataclass
class TelemetryNote(Message):
    """Why a peer's telemetry is partial or missing (``None``: full telemetry again)."""

    label: str
    note: str | None


@dataclass
class PeerDiscovered(Message):
    """mDNS found a daemon (its TXT hints are unverified until we connect)."""

    name: str
    node_id: str | None
    address: PeerAddress
    hints: dict[str, str]


@dataclass
class PeerVanished(Message):
    """An mDNS advertisement went away."""

    name: str
    address: PeerAddress | None


@dataclass
class DiscoveryState(Message):
    """Whether mDNS browsing runs, and if not, why."""

    running: bool
    note: str


@dataclass
class LocalDaemonsStarted(Message):
    """``meshtui demo``: the loopback daemons are serving."""

    addresses: list[PeerAddress]


@dataclass
class SpanLoading(Message):
    """A peer reports progress loading its blocks while a split is applied."""

    label: str
    done: int
    total: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SpanLoading) and message.label == self.label


@dataclass
class SpanCompiling(Message):
    """A peer compiles its newly loaded blocks for the default size (or is done): the line to show."""

    label: str
    text: str


@dataclass
class SplitApplied(Message):
    plan: SplitPlan
    seconds: float


@dataclass
class GenerationEvent(Message):
    """One event of the running generation (queued, prepared, step, decode). Never coalesced: each step is a row."""

    run_id: int
    event: Event


@dataclass
class GenerationDone(Message):
    run_id: int
    summary: dict
    png: bytes
    path: Path
