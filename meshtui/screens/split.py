"""Split: which peer runs which blocks, what that needs and costs, and loading it onto the peers."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from ..splitting import Forecast
from ..widgets import units
from ..widgets.split_view import SplitEditor, StageTable
from .base import MeshScreen


class SplitScreen(MeshScreen):
    SECTION = "split"
    HELP = """\
# Split

The model's transformer blocks (double-stream first, then single-stream) in order, as ranges on the
peers: stage 0 runs on the **head**, which also embeds the prompt, steps the scheduler and decodes the
image. Each step the activations cross every link once; the last stage returns the small noise
prediction to the head.

The proposal (`p`) uses every online peer, never exceeds a peer's free memory, and balances the stages
by the block speed measured in earlier runs and the measured link bandwidth. Edit it on the bar:
`↑`/`↓` select a stage, `←`/`→` move its end boundary, `[`/`]` move its peer earlier or later, `c` cycles
the codec of the link out of it (`auto` lets the head's policy choose from the link's bandwidth).
The table predicts memory per stage (weights + workspace; the head also holds embedders and the VAE),
compute per step (once measured) and the time and bytes of each link. `v` checks the plan; `a` loads
every peer's blocks, with progress.

`t` places the **text encoder**: on the head (the default), or on another online peer whose model
folder has one. The head then fetches the prompt's embeddings from that peer before each new prompt
(and checks they come from the same text encoder as its own): useful when the head has no
`text_encoder/` or no room for it next to its blocks.
"""

    BINDINGS = [
        Binding("p", "app.propose_split", "Propose", tooltip="Propose a split over the online peers from free "
                "memory, measured block speed and link bandwidth", id="split.propose"),
        Binding("v", "app.validate_split", "Validate", tooltip="Check the plan: coverage, memory, codecs, peers",
                id="split.validate"),
        Binding("a", "app.apply_split", "Apply", tooltip="Load every peer's blocks (progress below)",
                id="split.apply"),
        Binding("t", "app.cycle_text_encoder", "Text encoder", tooltip="Cycle where the prompt is encoded: the "
                "head, or another online peer whose model folder has a text encoder", id="split.text_encoder"),
    ]

    def compose_body(self) -> ComposeResult:
        yield Static("Blocks on peers", classes="section-title")
        yield SplitEditor(id="split-editor")
        yield StageTable(id="stage-table")
        yield Static("", id="forecast")
        yield Static("", id="loading")

    def on_mount(self) -> None:
        self.watch(self.app, "plan", self._show_plan)
        self.watch(self.app, "forecast", self._show_forecast)
        self.watch(self.app, "loading", self._show_loading)
        self.watch(self.app, "applied", lambda _: self._show_forecast(self.dashboard.forecast))
        self.watch(self.app, "text_encoder", lambda _: self._show_forecast(self.dashboard.forecast))
        self.query_one(SplitEditor).focus()

    def _show_plan(self, plan) -> None:
        editor = self.query_one(SplitEditor)
        preset = self.dashboard.preset()
        editor.num_double = preset.num_double if preset else 0
        editor.plan = plan

    def _show_forecast(self, forecast: Forecast | None) -> None:
        editor = self.query_one(SplitEditor)
        self.query_one(StageTable).show(forecast, editor.selected, self.dashboard.settings.codec)
        text = Text()
        plan = self.dashboard.plan
        if forecast is not None and forecast.stages:
            step = forecast.step_ms
            text.append("Predicted transformer time per step: ", style="bold")
            text.append(units.ms(step, 2) if step is not None else "not known until a run measures the peers")
            text.append("\n")
        if plan is not None:
            for a, b in zip(plan.stages, plan.stages[1:]):
                chosen = self.dashboard.links.get(a.peer, b.peer)
                if chosen is not None and chosen.why:
                    why = chosen.why if chosen.why.startswith(chosen.codec or "") else f"{chosen.codec} ({chosen.why})"
                    text.append(f"{a.label}→{b.label} last run: {why}\n", style="dim")
        if plan is not None:
            text.append(self.dashboard.text_encoder_line(), style="dim")
            text.append("\n")
        for note in forecast.notes if forecast is not None else ():
            text.append(f"! {note}\n", style="yellow")
        if forecast is not None and forecast.problems:
            for problem in forecast.problems:
                text.append(f"✕ {problem}\n", style="bold red")
        elif plan is not None:
            text.append("✓ the plan is valid", style="green")
            loaded = plan == self.dashboard.applied
            text.append("  |  loaded on the peers" if loaded else "  |  not loaded yet: a loads it (ctrl+g also "
                        "does, before generating)", style="green" if loaded else "yellow")
        self.query_one("#forecast", Static).update(text)

    def _show_loading(self, loading: tuple) -> None:
        text = Text()
        for label, done, total in loading:
            bar = "█" * int(20 * done / max(total, 1))
            style = "yellow" if done < total else "green"
            text.append(f"{label} loading blocks  {bar:<20} {done}/{total}\n", style=style)
        self.query_one("#loading", Static).update(text)

    def on_split_editor_selected(self, event: SplitEditor.Selected) -> None:
        self.query_one(StageTable).show(self.dashboard.forecast, event.index, self.dashboard.settings.codec)
