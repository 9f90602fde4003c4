"""Peers: every daemon this dashboard knows, found by mDNS or added by hand, and its health."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Static

from ..widgets.peer_table import PeerDetails, PeerTable
from .base import MeshScreen


class PeersScreen(MeshScreen):
    SECTION = "peers"
    HELP = """\
# Peers

Every **meshd** daemon this dashboard knows: found on the LAN by mDNS, added by hand (`a`, remembered in
the config file) or started by `meshtui demo`. Each row shows the daemon's health, its GPU (or CPU), free
memory, the model and the blocks it holds, whether it can encode/decode HEVC on NVENC/NVDEC (or on the
CPU with x265/FFmpeg), and the link from this machine: bandwidth and round-trip time, measured.

The daemons of one box (one per GPU, `meshd@0`, `meshd@1`, ...) are listed together, joined by `┌ ├ └`:
they advertise the same host, the planner keeps them adjacent in a split, and the link between them
stays on the box (CUDA IPC).

States: **online**; **connecting**; **unreachable** (nothing answers at that address, or it stopped
answering: the values shown are the last good ones, with their age); **wrong key** (the daemon refused
our cluster key: start meshtui with `--key-file` pointing at the daemons' key); **incompatible**
(another protocol version).
"""

    BINDINGS = [
        Binding("a", "app.add_peer", "Add peer", tooltip="Add a daemon by HOST:PORT (remembered in the config file)",
                id="peers.add"),
        Binding("x,delete", "remove_peer", "Remove", tooltip="Forget the selected peer", id="peers.remove"),
        Binding("r", "app.reconnect", "Retry now", tooltip="Poll every peer now instead of waiting",
                id="peers.reconnect"),
        Binding("m", "app.measure_links", "Measure links",
                tooltip="Measure bandwidth and round-trip time from here to every peer again", id="peers.measure"),
    ]

    @dataclass
    class RemoveRequested(Message):
        """The user asked to forget the peer ``label`` (the app stops its monitor and its connection)."""

        label: str

    def compose_body(self) -> ComposeResult:
        yield Static("", id="peers-banner")
        yield PeerTable(id="peer-table")
        yield PeerDetails(id="peer-details")

    def on_mount(self) -> None:
        self.watch(self.app, "peers", self._show_peers)
        self.watch(self.app, "banner", self._show_banner)
        self.set_interval(1.0, self._tick)

    def _show_banner(self, text: str) -> None:
        self.query_one("#peers-banner", Static).update(text)

    def _show_peers(self, peers) -> None:
        table = self.query_one(PeerTable)
        table.show(peers, self.dashboard.clock())
        self._show_details()

    def _show_details(self) -> None:
        label = self.query_one(PeerTable).selected_label
        view = next((p for p in self.dashboard.peers if p.label == label), None)
        self.query_one(PeerDetails).show(view, self.dashboard.clock(), self.dashboard.peers)

    def _tick(self) -> None:
        """Ages ("seen 3 s ago") move even when nothing else does."""
        self._show_peers(self.dashboard.peers)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_details()

    def action_remove_peer(self) -> None:
        label = self.query_one(PeerTable).selected_label
        if label is None:
            self.notify("no peer selected", severity="warning")
            return
        self.post_message(self.RemoveRequested(label))
