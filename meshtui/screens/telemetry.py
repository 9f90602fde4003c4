"""Telemetry: what every peer's GPUs, host and links have been doing over the last minutes."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from ..history import HISTORY_SAMPLES
from ..widgets.telemetry_card import NodeCard
from .base import MeshScreen


class TelemetryScreen(MeshScreen):
    SECTION = "telemetry"
    HELP = f"""\
# Telemetry

One card per peer with a sparkline per reading over the last {HISTORY_SAMPLES} samples (about five
minutes at one per second): per GPU its load, NVENC and NVDEC load (the video engines that carry the
compressed activations), VRAM, and PCIe TX/RX; the host's CPU and RAM; and the throughput of the
daemon's busiest links. **n/a** means the peer cannot take that reading (no NVIDIA driver, a GPU
without NVENC, an older daemon), never zero. A peer that falls silent keeps its last values, and
the card says how old they are.

Daemons that do not stream telemetry yet are sampled through their health polls: memory and link
throughput only, marked "from health polls".
"""

    def compose_body(self) -> ComposeResult:
        yield Static("Per-peer readings over the last minutes; n/a = this peer cannot take the reading.",
                     classes="section-title")
        yield VerticalScroll(id="cards")

    def on_mount(self) -> None:
        self.watch(self.app, "peers", self._sync_cards)
        self.watch(self.app, "telemetry", lambda _: self._refresh_cards())
        self.set_interval(1.0, self._refresh_cards)

    def _sync_cards(self, peers) -> None:
        holder = self.query_one("#cards", VerticalScroll)
        cards = {card.label: card for card in holder.query(NodeCard)}
        wanted = [p.label for p in peers]
        for label, card in cards.items():
            if label not in wanted:
                card.remove()
        new = [NodeCard(label, id=f"card-{label}") for label in wanted if label not in cards]
        if new:
            holder.mount_all(new)
        self._refresh_cards()

    def on_screen_resume(self) -> None:
        self._refresh_cards()

    def _refresh_cards(self) -> None:
        if not self.is_current:
            return  # drawn again when shown (on_screen_resume)
        dash, config = self.dashboard, self.app.config
        now = dash.clock()
        views = {p.label: p for p in dash.peers}
        names = {str(p.address): p.label for p in dash.peers}
        for card in self.query(NodeCard):
            history = dash.telemetry.nodes.get(card.label)
            interval = config.poll_interval if history is None or history.source != "daemon" \
                else config.telemetry_interval
            card.show(history, views.get(card.label), now, interval, names)
