"""The split drawn as block ranges on a bar (editable with the keyboard), and its forecast per stage."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import DataTable

from meshd.pipeline.plan import PlanError, SplitPlan

from .. import splitting
from ..splitting import Forecast
from . import units

STAGE_COLORS = ("dodger_blue2", "green3", "dark_orange", "medium_purple2", "cyan3", "indian_red", "gold3")


class SplitEditor(Widget, can_focus=True):
    """The plan as a bar of blocks. Up/down select a stage; the keys below edit the plan and post
    :class:`SplitEditor.Edited` (the app owns the plan)."""

    BINDINGS = [
        Binding("up", "select(-1)", "Prev stage", show=False, id="split.select_prev"),
        Binding("down", "select(1)", "Next stage", show=False, id="split.select_next"),
        Binding("left", "boundary(-1)", "Boundary", key_display="←→", tooltip="Move the end of the selected "
                "stage one block left (the next stage grows)", id="split.boundary_left"),
        Binding("right", "boundary(1)", "Boundary right", show=False, tooltip="Move the end of the "
                "selected stage one block right", id="split.boundary_right"),
        Binding("[", "reorder(-1)", "Reorder", key_display="[ ]", tooltip="Swap the selected stage's peer with "
                "the one before it", id="split.stage_earlier"),
        Binding("]", "reorder(1)", "Stage later", show=False, tooltip="Swap the selected stage's peer with the "
                "one after it", id="split.stage_later"),
        Binding("c", "codec", "Link codec", tooltip="Cycle the codec of the link out of the selected stage: "
                + ", ".join(splitting.CODEC_CHOICES), id="split.codec"),
    ]

    class Edited(Message):
        def __init__(self, plan: SplitPlan) -> None:
            super().__init__()
            self.plan = plan

    class Selected(Message):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    plan: reactive[SplitPlan | None] = reactive(None)
    num_double: reactive[int] = reactive(0)
    selected: reactive[int] = reactive(0)

    def watch_plan(self, plan: SplitPlan | None) -> None:
        if plan is not None and self.selected >= len(plan.stages):
            self.selected = len(plan.stages) - 1

    def watch_selected(self, index: int) -> None:
        self.post_message(self.Selected(index))

    def _edit(self, change) -> None:
        if self.plan is None:
            self.notify("no split yet: press p to propose one", severity="warning")
            return
        try:
            self.post_message(self.Edited(change(self.plan)))
        except PlanError as exc:
            self.notify(str(exc), severity="warning")

    def action_select(self, delta: int) -> None:
        if self.plan is not None:
            self.selected = max(0, min(len(self.plan.stages) - 1, self.selected + delta))

    def action_boundary(self, delta: int) -> None:
        self._edit(lambda plan: splitting.move_boundary(plan, self.selected, delta))

    def action_reorder(self, delta: int) -> None:
        if self.plan is not None and 0 <= self.selected + delta < len(self.plan.stages):
            self._edit(lambda plan: splitting.move_stage(plan, self.selected, delta))
            self.selected += delta

    def action_codec(self) -> None:
        self._edit(lambda plan: splitting.cycle_codec(plan, self.selected))

    def render(self) -> Text:
        plan = self.plan
        if plan is None or not plan.stages:
            return Text("No split yet. Press p to propose one from the online peers.", style="dim")
        blocks = plan.stages[-1].end
        width = max(blocks, self.size.width - 2)
        cell = max(1, width // blocks)
        labels, bar, axis, marks = Text(), Text(), Text(), Text()
        for i, stage in enumerate(plan.stages):
            span = cell * stage.blocks
            color = STAGE_COLORS[i % len(STAGE_COLORS)]
            chosen = i == self.selected
            title = f" {stage.label or stage.peer} {stage.start}-{stage.end - 1} "
            labels.append(title[:span].center(span), style=f"bold {color}" if chosen else color)
            for b in range(stage.start, stage.end):
                glyph = "█" if b < self.num_double else "▓"
                bar.append(glyph * cell, style=f"bold {color}" if chosen else f"{color}")
            ticks = str(stage.start).ljust(span)
            axis.append(ticks[:span], style="dim")
            marks.append(("^" * span) if chosen and self.has_focus else (" " * span), style=color)
        legend = Text("█ double-stream blocks  ▓ single-stream blocks", style="dim")
        if self.has_focus:
            legend.append("   ↑↓ stage  ←→ boundary  [ ] order  c codec", style="dim")
        return Text("\n").join([labels, bar, marks, axis, legend])

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()


STAGE_COLUMNS = ("Stage", "Peer", "Blocks", "Memory need / free", "Compute / step", "Link out", "Codec",
                 "Link time / step", "Wire bytes / step")


class StageTable(DataTable, can_focus=False):
    """The forecast of each stage: memory, compute, the link to the next stage."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for name in STAGE_COLUMNS:
            self.add_column(name, key=name)

    def show(self, forecast: Forecast | None, selected: int, run_codec: str = "auto") -> None:
        self.clear()
        if forecast is None:
            return
        for i, s in enumerate(forecast.stages):
            st = s.stage
            fits = Text(f"{units.size(s.need_bytes)} / {units.size(s.available_bytes)}",
                        style="" if s.fits else "bold red")
            link = s.link
            if link is None:
                out, codec, link_ms, wire = "returns to head", "-", "-", "-"
            elif link.codec == "cuda-ipc":
                out, codec, link_ms, wire = "same host", "CUDA IPC", "~0", "0 B"
            else:
                out = units.link_rate(link.bandwidth_bytes_per_s) + ("" if link.measured or link.bandwidth_bytes_per_s is None
                                                             else " (est.)")
                if link.same_host:  # one box: never the network (CUDA IPC once the head finds it works)
                    out = f"same host · {out}"
                # "auto: raw" = the policy's pick; "fp8 (run)" = the Generate form's codec for auto links.
                codec = link.codec
                if st.codec == "auto":
                    codec = f"{codec} (run)" if run_codec != "auto" else f"auto: {codec}"
                link_ms = units.ms(link.ms, 2)
                wire = units.size(link.wire_bytes)
            compute = units.ms(s.compute_ms, 2) if s.compute_ms is not None else "not measured yet"
            self.add_row(Text(str(i), style=STAGE_COLORS[i % len(STAGE_COLORS)]), st.label or str(st.peer),
                         f"{st.start}-{st.end - 1} ({st.blocks})", fits, compute, out, codec, link_ms, wire)
        if forecast.stages:
            self.move_cursor(row=min(selected, len(forecast.stages) - 1))
