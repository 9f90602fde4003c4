"""The command palette (ctrl+p) lists every action of the dashboard, built from the key bindings so
that a key and its palette entry can never disagree.

Actions of the app (``app.*``) run from anywhere, whichever section binds them; the actions of the
current screen and of its widgets are listed while that screen is shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.dom import DOMNode


@dataclass(frozen=True)
class PaletteCommand:
    title: str
    help: str
    action: str
    node: DOMNode


def _ours(binding: object) -> bool:
    """Bindings of this dashboard carry an id (Textual's own ones mostly do not)."""
    return isinstance(binding, Binding) and bool(binding.id) and bool(binding.description)


def palette_commands(app, screen) -> Iterator[PaletteCommand]:
    """Every command available from ``screen``, each action once."""
    seen: set[str] = set()

    def command(binding: Binding, node: DOMNode) -> PaletteCommand | None:
        if not _ours(binding) or binding.action in seen:
            return None
        seen.add(binding.action)
        key = binding.key_display or app.get_key_display(binding)
        return PaletteCommand(binding.description, f"{binding.tooltip or binding.description}  [{key}]",
                              binding.action, node)

    candidates: list[tuple[Binding, DOMNode]] = [(b, app) for b in app.BINDINGS]
    for mode_screen in app.MODES.values():
        candidates += [(b, app) for b in getattr(mode_screen, "BINDINGS", ()) if _ours(b) and
                       b.action.startswith("app.")]
    candidates += [(b, screen) for b in screen.BINDINGS]
    for widget in screen.query("*"):
        candidates += [(b, widget) for b in getattr(type(widget), "BINDINGS", ())]
    for binding, node in candidates:
        found = command(binding, node)
        if found is not None:
            yield found


class MeshCommands(Provider):
    """Fuzzy search over :func:`palette_commands`."""

    def _commands(self) -> list[PaletteCommand]:
        return list(palette_commands(self.app, self.screen))

    def _run(self, command: PaletteCommand) -> None:
        action = command.action.removeprefix("app.") if command.action.startswith("app.") else command.action
        node = self.app if command.action.startswith("app.") else command.node
        self.app.call_later(self.app.run_action, action, node)

    async def discover(self) -> Hits:
        for command in self._commands():
            yield DiscoveryHit(command.title, partial(self._run, command), help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(score, matcher.highlight(command.title), partial(self._run, command), help=command.help)
