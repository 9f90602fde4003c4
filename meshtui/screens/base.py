"""What every section of the dashboard shares: the section bar, the status line, the footer, F1 help."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Header

from ..widgets.nav import SectionBar
from ..widgets.status import MeshStatus

if TYPE_CHECKING:
    from ..state import Dashboard


class MeshScreen(Screen):
    """A top-level section (a Textual mode). Subclasses compose the body and say what the section is for."""

    SECTION: ClassVar[str] = ""
    #: Markdown shown by F1 above the list of keys.
    HELP: ClassVar[str] = ""

    @property
    def dashboard(self) -> Dashboard:
        """What the dashboard knows, to show (the app changes it; a screen watches the app's attributes)."""
        return self.app.dashboard  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        yield Header(icon="")
        yield SectionBar(self.SECTION, id="sections")
        yield from self.compose_body()
        yield MeshStatus(id="status")
        yield Footer()

    def compose_body(self) -> ComposeResult:
        raise NotImplementedError

    def on_mount(self) -> None:
        self.watch(self.app, "status", self._show_status)

    def _show_status(self, status: tuple[str, str]) -> None:
        self.query_one(MeshStatus).show(*status)
