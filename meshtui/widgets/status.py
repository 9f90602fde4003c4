"""The line above the footer on every screen: the state of the mesh and the next thing to do."""

from __future__ import annotations

from collections.abc import Sequence

from textual.content import Content
from textual.widgets import Static

from meshd.plan import SplitPlan

from ..runs import RunRecord, RunState
from ..views import PeerStatus, PeerView


def next_step(peers: Sequence[PeerView], plan: SplitPlan | None, applied: SplitPlan | None,
              runs: Sequence[RunRecord], starting: str | None = None) -> str:
    """One sentence telling a new user what to do now."""
    if starting:
        return starting
    running = next((r for r in reversed(runs) if r.state is RunState.RUNNING), None)
    if running is not None:
        return f"generating: {running.phase} - Esc (outside a form field) cancels"
    if not peers:
        return "no peers yet: press a on Peers (1) to add the HOST:PORT of a meshd"
    online = [p for p in peers if p.online]
    if not online:
        if any(p.status is PeerStatus.UNAUTHENTICATED for p in peers):
            return "peers refuse our cluster key: start meshtui with --key-file pointing at the daemons' key"
        if all(p.status is PeerStatus.CONNECTING for p in peers):
            return "connecting to peers..."
        return "no peer answers: check that meshd runs there (r on Peers retries now)"
    if plan is None:
        return "press p on Split (2) to propose how to split the model over the peers"
    if plan != applied:
        return "ctrl+g generates (the split is loaded first), or a on Split (2) loads it now"
    return "ready: ctrl+g generates with the settings on Generate (3)"


def summary(peers: Sequence[PeerView], plan: SplitPlan | None, applied: SplitPlan | None) -> str:
    online = sum(p.online for p in peers)
    parts = [f"{online}/{len(peers)} peers online"]
    if plan is not None:
        parts.append(f"split {plan.describe()}" + (" (loaded)" if plan == applied else " (not loaded)"))
    return " | ".join(parts)


class MeshStatus(Static):
    """Shows :func:`summary` and :func:`next_step`."""

    def show(self, summary_text: str, hint: str) -> None:
        self.update(Content.from_markup("[b]$summary[/b]  [$accent]>[/] $hint", summary=summary_text, hint=hint))
