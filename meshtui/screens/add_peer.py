"""The dialog that adds a peer by address, for daemons mDNS cannot see (another VLAN, a VPN)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from meshd.pipeline.plan import PeerAddress, PlanError


class AddPeerScreen(ModalScreen[PeerAddress | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="add_peer.cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="add-peer-box"):
            yield Label("Address of a meshd daemon: HOST, HOST:PORT or [IPv6]:PORT (port 7777 if left out)")
            yield Input(placeholder="10.0.0.7:7777", id="address")
            yield Static("", id="address-error")
            yield Label("Enter adds it (and remembers it in the config file); Esc cancels.", classes="dim")

    def on_mount(self) -> None:
        self.query_one("#add-peer-box").border_title = "Add a peer"

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            address = PeerAddress.parse(event.value)
        except PlanError as exc:
            self.query_one("#address-error", Static).update(str(exc))
            return
        self.dismiss(address)

    def action_cancel(self) -> None:
        self.dismiss(None)
