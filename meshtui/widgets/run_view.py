"""A generation as it runs and after: per-step rows with each hop's times and bytes, per-link
totals, and the history of runs."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.text import Text
from textual.widgets import DataTable, Static

from ..runs import RunRecord, RunState
from . import units

#: Times are in ms (the caption above the table says so; the cells stay narrow).
STEP_COLUMNS = ("Step", "Total", "Head", "Hop", "Codec", "Bytes", "Enc", "Wire", "Dec", "Next", "Cosine")
STEP_CAPTION = ("Per step, ms: total, head compute, then per hop: encode, wire, decode, the next stage's compute; "
                "cosine = reconstruction error")


def _ms(value: float | None, digits: int = 1) -> str:
    return units.NA if value is None else f"{value:.{digits}f}"


class StepTable(DataTable, can_focus=False):
    """One row per hop of each step, newest at the bottom (the table follows it)."""

    def on_mount(self) -> None:
        for name in STEP_COLUMNS:
            self.add_column(name, key=name)
        self._shown: tuple[int, int] = (-1, 0)  # (run id, steps shown)

    def show(self, run: RunRecord | None, names: dict[str, str] | None = None) -> None:
        """``names``: node name -> peer label, so hops read like the split (A→B)."""
        names = names or {}
        run_id = run.id if run else -1
        if self._shown[0] != run_id:
            self.clear()
            self._shown = (run_id, 0)
        if run is None:
            return
        for row in run.steps[self._shown[1]:]:
            first = True
            for hop in row.hops or (None,):
                lead = [f"{row.step}/{row.steps}", _ms(row.ms), _ms(row.head_ms)] if first else ["", "", ""]
                first = False
                if hop is None:
                    self.add_row(*lead, "all local", "-", "-", "-", "-", "-", "-", "-")
                    continue
                cosine = "exact" if hop.codec == "raw" else (f"{hop.cosine:.5f}" if hop.cosine is not None else "n/a")
                sender, _, receiver = hop.link.partition("→")
                link = f"{names.get(sender, sender)}→{names.get(receiver, receiver)}"
                self.add_row(*lead, link, hop.codec, units.size(hop.bytes), _ms(hop.encode_ms, 2),
                             _ms(hop.wire_ms, 2), _ms(hop.decode_ms, 2), _ms(hop.compute_ms), cosine)
        self._shown = (run_id, len(run.steps))
        self.scroll_end(animate=False)


class RunSummary(Static):
    """The run's state line: phase and progress, the error in red, or the totals per link when done."""

    def show(self, run: RunRecord | None, now: float) -> None:
        if run is None:
            self.update(Text("No run yet. Fill in the form and press Enter (or ctrl+g anywhere).", style="dim"))
            return
        head = Text()
        p = run.params
        head.append(f"run {run.id}: ", style="bold")
        head.append(f"{p.width}x{p.height}, {p.steps} steps, seed {p.seed}, codec {run.codec}, split {run.plan}\n")
        if run.state is RunState.RUNNING:
            done, total = run.done_steps, p.steps
            bar = "█" * int(30 * done / max(total, 1))
            head.append(f"{bar:<30}", style="green")
            head.append(f" {done}/{total}  {run.phase}  ({now - run.started:.1f} s)")
            self.update(head)
            return
        if run.state is not RunState.DONE:
            head.append(f"{run.state}: {run.error}", style="bold red")
            self.update(head)
            return
        head.append(f"done in {run.total_s:.2f} s", style="bold green")
        if run.path:
            head.append(f"  saved {run.path}")
        for hop in run.hops:  # one line per link: what crossed it per step, and how well
            worst = hop.get("error_worst")
            quality = f"cosine {worst['cosine']:.5f}" if worst else ("exact" if hop.get("codec") == "raw" else "")
            head.append(f"\n{hop.get('link')}: {hop.get('codec')}, {units.size(hop.get('bytes_per_step'))}/step"
                        f"  {quality}", style="bold")
            head.append(f"\n  encode {units.ms(hop.get('encode_ms'), 2)}  wire {units.ms(hop.get('wire_ms'), 2)}  "
                        f"decode {units.ms(hop.get('decode_ms'), 2)}  next stage {units.ms(hop.get('compute_ms'))}")
        self.update(head)


HISTORY_COLUMNS = ("#", "When", "State", "Seconds", "Size", "Steps", "Seed", "Codec", "Split", "Prompt")


class RunHistory(DataTable):
    """Every run, newest first; selecting one shows its steps and image."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._shown: tuple | None = None

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for name in HISTORY_COLUMNS:
            self.add_column(name, key=name)

    @property
    def selected_run(self) -> int | None:
        if not self.row_count:
            return None
        return int(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)

    def show(self, runs: Sequence[RunRecord], selected: int | None) -> None:
        shown = tuple((r.id, r.state, r.total_s) for r in runs)
        if shown == self._shown:  # steps of a running run change nothing here
            self._select(selected)
            return
        self._shown = shown
        self.clear()
        for run in reversed(runs):
            p = run.params
            state = Text(str(run.state), style={"done": "green", "running": "yellow"}.get(run.state, "red"))
            self.add_row(str(run.id), time.strftime("%H:%M:%S", time.localtime(run.started)), state,
                         f"{run.total_s:.2f}" if run.total_s is not None else "-", f"{p.width}x{p.height}",
                         str(p.steps), str(p.seed), run.codec, run.plan, p.prompt[:60], key=str(run.id))
        self._select(selected)

    def _select(self, run_id: int | None) -> None:
        if run_id is not None and str(run_id) in self.rows and self.selected_run != run_id:
            self.move_cursor(row=self.get_row_index(str(run_id)))
