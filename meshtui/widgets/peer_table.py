"""The peers: one row each with health, hardware, model span, codecs and the measured link."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import DataTable, Static

from ..views import PeerStatus, PeerView, describe_blocks
from . import units

STATUS_STYLE = {
    PeerStatus.ONLINE: ("online", "green"),
    PeerStatus.CONNECTING: ("connecting", "yellow"),
    PeerStatus.UNREACHABLE: ("unreachable", "red"),
    PeerStatus.UNAUTHENTICATED: ("wrong key", "red"),
    PeerStatus.INCOMPATIBLE: ("incompatible", "red"),
}

COLUMNS = ("Peer", "State", "Node", "Address", "Device", "Free memory", "Model / blocks", "HEVC enc/dec",
           "Link", "RTT", "Seen", "Via")


def state_text(view: PeerView) -> Text:
    word, style = STATUS_STYLE[view.status]
    return Text(("● " if view.online else "✕ " if style == "red" else "◌ ") + word, style=style)


def device_text(view: PeerView) -> str:
    name = view.gpu_name or view.device or view.hints.get("gpu", units.NA)
    return name.removeprefix("NVIDIA ").removeprefix("GeForce ")


def memory_text(view: PeerView) -> str:
    if view.free_bytes is None or view.total_bytes is None:
        return f"VRAM {view.hints['vram']} GiB (mDNS)" if view.hints.get("vram") else units.NA
    kind = "VRAM" if view.memory_kind == "gpu" else "RAM"
    return f"{kind} {units.gib(view.free_bytes)}/{units.gib(view.total_bytes)} GiB"


def codecs_text(view: PeerView) -> str:
    caps = view.caps
    if caps is None:
        return units.NA
    enc = "NVENC" if caps.nvenc else "x265" if caps.cpu_hevc else "-"
    if caps.nvenc_state == "failing":
        enc += "(NVENC failing)"
    dec = "NVDEC" if caps.nvdec else "ffmpeg" if caps.cpu_hevc else "-"
    return f"{enc}/{dec}"


def model_text(view: PeerView) -> str:
    if view.model_id is None:
        return view.hints.get("model", units.NA)
    return f"{view.model_id} {describe_blocks(view.blocks)}"


#: How a box's rows are drawn when it has several GPUs (one daemon each): first, middle, last.
BOX_MARKS = ("┌ ", "├ ", "└ ")


def by_box(views: Sequence[PeerView]) -> list[tuple[PeerView, str]]:
    """The peers with each box's GPUs together (boxes in the order their first peer comes), each with
    its mark: "" for a box of one peer (or an unknown box), else BOX_MARKS."""
    boxes: dict[str, list[PeerView]] = {}
    for i, view in enumerate(views):
        boxes.setdefault(view.box or f"\0unknown {i}", []).append(view)
    out = []
    for members in boxes.values():
        for i, view in enumerate(members):
            mark = "" if len(members) == 1 else BOX_MARKS[0 if i == 0 else 2 if i == len(members) - 1 else 1]
            out.append((view, mark))
    return out


def box_mates(view: PeerView, views: Sequence[PeerView]) -> list[str]:
    """Labels of the other peers on ``view``'s box."""
    return [v.label for v in views if v.box and v.box == view.box and v.label != view.label]


class PeerTable(DataTable):
    """Rows keyed by peer label; the cursor stays on the same peer across updates."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for name in COLUMNS:
            self.add_column(name, key=name)

    @property
    def selected_label(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def show(self, views: Sequence[PeerView], now: float) -> None:
        ordered = by_box(views)
        order = [view.label for view, _ in ordered]
        selected, rebuilt = self.selected_label, False
        if [key.value for key in self.rows] != order[: len(self.rows)]:
            # A peer joined a box listed earlier (or left one): rows must move, so lay them out again.
            self.clear()
            rebuilt = True
        for view, mark in ordered:
            cells = self.cells(view, now, mark)
            if view.label in self.rows:
                for column, value in zip(COLUMNS, cells):
                    self.update_cell(view.label, column, value, update_width=True)
            else:
                self.add_row(*cells, key=view.label)
        if rebuilt and selected in order:
            self.move_cursor(row=order.index(selected))

    @staticmethod
    def cells(view: PeerView, now: float, mark: str = "") -> list:
        seen = units.age(now - view.seen) if view.seen else "never"
        return [
            Text(mark + view.label, style="bold"), state_text(view), view.title, str(view.address), device_text(view),
            memory_text(view), model_text(view), codecs_text(view), units.link_rate(view.bandwidth_bytes_per_s),
            units.ms(view.rtt_ms), seen, ",".join(sorted(view.sources)),
        ]


class PeerDetails(Static):
    """Everything known about the selected peer, including the full error text."""

    def show(self, view: PeerView | None, now: float, others: Sequence[PeerView] = ()) -> None:
        if view is None:
            self.update("")
            return
        lines = Text()
        lines.append(f"{view.label}  {view.title}  ", style="bold")
        lines.append_text(state_text(view))
        if view.error:
            lines.append(f"\n{view.error}", style="red")
            if view.status is PeerStatus.UNAUTHENTICATED:
                lines.append("\nThe daemon and this dashboard must share one cluster key (meshd keygen; "
                             "meshtui --key-file PATH).", style="red")
            if not view.online and view.seen:
                lines.append(f"\nlast answered {units.age(now - view.seen)} ago; the values shown are from then",
                             style="yellow")
        facts = [
            ("node id", view.node_id), ("meshd", view.version), ("device", view.device),
            ("model", f"{view.model_id} ({view.preset}, {view.dtype}, sha256 {(view.model_hash or '')[:12]})"
             if view.model_id else None),
            ("weights", view.weights), ("compute", view.compute),
            ("blocks held", describe_blocks(view.blocks) if view.model_id else None),
            ("key fingerprint", view.key_fingerprint), ("emulated link", view.emulated_link),
            ("box", f"{view.box}" + (f", with {', '.join(box_mates(view, others))} (same host)"
                                     if box_mates(view, others) else "") if view.box else None),
        ]
        if view.caps is not None:
            facts += [("NVENC", "yes" if view.caps.nvenc else
                       f"FAILING ({view.caps.nvenc_reason})" if view.caps.nvenc_state == "failing" else
                       f"no ({view.caps.nvenc_reason})"),
                      ("NVDEC", "yes" if view.caps.nvdec else f"no ({view.caps.nvdec_reason})")]
        facts += [(f"mDNS {k}", v) for k, v in sorted(view.hints.items())]
        for name, value in facts:
            if value:
                lines.append(f"\n{name:>16}  ", style="dim")
                lines.append(str(value))
        self.update(lines)
