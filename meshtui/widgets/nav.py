"""The row of sections at the top of every screen: where you are, and the key to go elsewhere."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

#: (mode name, key, title) in the order they are shown.
SECTIONS = (("peers", "1", "Peers"), ("split", "2", "Split"), ("generate", "3", "Generate"),
            ("telemetry", "4", "Telemetry"))


class SectionBar(Static):
    """``[1] Peers  [2] Split ...`` with the current section highlighted; each one is clickable."""

    def __init__(self, current: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.current = current

    def on_mount(self) -> None:
        parts = []
        for mode, key, title in SECTIONS:
            style = "reverse bold" if mode == self.current else "dim"
            parts.append(Content.from_markup(f"[@click=app.switch_section('{mode}')][{style}] {key} $title [/][/]",
                                             title=title))
        self.update(Content("  ").join(parts))
