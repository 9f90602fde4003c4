"""The line above the footer on every screen: the state of the mesh and the next thing to do
(worded by :func:`meshtui.state.summary` and :func:`meshtui.state.next_step`)."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static


class MeshStatus(Static):
    """Shows :func:`~meshtui.state.summary` and :func:`~meshtui.state.next_step`."""

    def show(self, summary_text: str, hint: str) -> None:
        self.update(Content.from_markup("[b]$summary[/b]  [$accent]>[/] $hint", summary=summary_text, hint=hint))
