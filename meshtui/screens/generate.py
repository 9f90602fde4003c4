"""Generate: the form, the live per-step progress across the mesh, the image, and the history of runs."""

from __future__ import annotations

import io

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Select, Static

from ..runs import RunRecord, RunState
from ..widgets.generate_form import GenerateForm
from ..widgets.image_view import ImageView
from ..widgets.run_view import STEP_CAPTION, RunHistory, RunSummary, StepTable
from .base import MeshScreen

#: Decoded images kept for quick re-display (the app keeps the last PNGs; older ones reload from disk).
DECODED_KEPT = 8


class GenerateScreen(MeshScreen):
    SECTION = "generate"
    HELP = """\
# Generate

Write a prompt and press **Enter** (or **ctrl+g** on any screen). Blank size, steps and guidance take
the model's defaults; the codec applies to every link whose codec the split leaves on `auto`.

**Esc** leaves the form (then `1`-`4` switch sections again); outside the form, **Esc** cancels a
running generation.

While it runs, each step adds a row per hop: the step's time, the head's own compute, then for every
link the codec, the bytes that crossed, encode / wire / decode times, the receiving stage's compute,
and the reconstruction error (cosine against the unencoded activations; `exact` for `raw`). When it is
done the per-link totals replace the progress, the image appears on the right, and the PNG is saved
with its parameters (seed, plan, codec) in its metadata. The history below
lists every run; select one to see its image again.
"""

    BINDINGS = [
        Binding("escape", "leave_field", "Leave field", tooltip="Leave the form, so that 1-4 switch sections",
                id="generate.leave_field"),
        Binding("ctrl+l", "focus_prompt", "Prompt", tooltip="Put the cursor in the prompt", id="generate.prompt"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.shown_run: int | None = None
        self._decoded: dict[int, PILImage.Image] = {}

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="generate-top"):
            yield GenerateForm(self.dashboard.settings, id="generate-form")
            with Vertical(id="run-panel"):
                yield RunSummary(id="run-summary")
                yield Static(STEP_CAPTION, id="step-caption")
                yield StepTable(id="step-table")
            with Vertical(id="image-panel"):
                yield ImageView(self.app.image_mode, id="image-view")
                yield Static("", id="image-caption")
        yield Static("History", classes="section-title")
        yield RunHistory(id="run-history")

    def on_mount(self) -> None:
        self.watch(self.app, "runs", self._show_runs)
        self.watch(self.app, "peers", lambda _: self.query_one(GenerateForm).set_preset(self.dashboard.preset()))
        self.set_interval(0.5, self._tick)
        self.action_focus_prompt()

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt").focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "leave_field":  # outside the form, Esc falls through to the app: cancel a run
            return isinstance(self.focused, (Input, Select))
        return True

    def action_leave_field(self) -> None:
        self.query_one(RunHistory).focus()

    def _run(self, run_id: int | None) -> RunRecord | None:
        return next((r for r in self.dashboard.runs if r.id == run_id), None)

    def _show_runs(self, runs: tuple[RunRecord, ...]) -> None:
        if runs and runs[-1].state is RunState.RUNNING:
            self.shown_run = runs[-1].id  # a new run takes the stage
        elif self.shown_run is None and runs:
            self.shown_run = runs[-1].id
        self.query_one(RunHistory).show(runs, self.shown_run)
        self._show_run()

    def _show_run(self) -> None:
        run = self._run(self.shown_run)
        self.query_one(RunSummary).show(run, self.dashboard.clock())
        self.query_one(StepTable).show(run, {p.name: p.label for p in self.dashboard.peers if p.name})
        view = self.query_one(ImageView)
        caption = self.query_one("#image-caption", Static)
        image = self._image(run)
        if run is not None and run.state is RunState.RUNNING:
            view.show(None, "generating...")
        else:
            view.show(image, "The image appears here when a generation finishes.")
        caption.update(f"{run.params.prompt[:80]}\n{run.path}" if image is not None and run is not None else "")

    def _image(self, run: RunRecord | None) -> PILImage.Image | None:
        if run is None or run.state is not RunState.DONE:
            return None
        if run.id in self._decoded:
            return self._decoded[run.id]
        png = self.dashboard.images.get(run.id)
        source = io.BytesIO(png) if png is not None else run.path
        if source is None:
            return None
        try:
            image = PILImage.open(source)
            image.load()
        except OSError:
            return None  # the file was moved or deleted since
        self._decoded[run.id] = image
        for old in sorted(self._decoded)[:-DECODED_KEPT]:  # a long session must not keep every image
            del self._decoded[old]
        return image

    def _tick(self) -> None:
        run = self._run(self.shown_run)
        if run is not None and run.state is RunState.RUNNING:
            self.query_one(RunSummary).show(run, self.dashboard.clock())

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "run-history" and event.row_key.value is not None:
            chosen = int(event.row_key.value)
            if chosen != self.shown_run:
                self.shown_run = chosen
                self._show_run()
