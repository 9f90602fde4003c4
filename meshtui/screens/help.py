"""F1: what the current section is for, every key that works there, and where the settings live."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown


def keys_markdown(screen) -> str:
    """The bindings active on ``screen`` (app, screen and focused widget), one line each."""
    lines, seen = [], set()
    for active in screen.active_bindings.values():
        binding = active.binding
        if not binding.id or not binding.description or binding.action in seen:  # ours only
            continue
        seen.add(binding.action)
        display = binding.key_display or screen.app.get_key_display(binding)
        tip = f": {binding.tooltip}" if binding.tooltip else ""
        lines.append(f"- `{display}` **{binding.description}**{tip}")
    return "\n".join(lines)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,f1,q", "dismiss", "Close help", id="help.close"),
    ]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(self.text)

    def on_mount(self) -> None:
        self.query_one("#help-box").border_title = "Help (Esc closes)"
