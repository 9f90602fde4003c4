"""One peer's telemetry: a sparkline per reading over the last minutes, "n/a" where the peer cannot
take it, and the age of the newest sample when the peer falls silent."""

from __future__ import annotations

from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline, Static

from ..history import GPU_METRICS, HOST_METRICS, LINK_METRICS, Metric, NodeHistory, Series
from ..views import PeerView
from . import units

#: Links shown per peer (the busiest); a daemon can hold many idle connections.
MAX_LINKS = 4
#: A peer whose newest sample is older than this many sample intervals is called silent.
SILENT_INTERVALS = 3


class MetricRow(Horizontal):
    """``TITLE  ▁▂▅▇█▅  value`` for one series."""

    def __init__(self, title: str, metric: Metric, series: Series,
                 total: Callable[[], float | None] = lambda: None) -> None:
        super().__init__(classes="metric")
        self.title, self.metric, self.series, self.total = title, metric, series, total
        # Held, not queried: a card may update a row whose children are not mounted yet.
        self.spark = Sparkline([], classes="metric-spark")
        self.value = Label("", classes="metric-value")
        self.update_values()

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="metric-title")
        yield self.spark
        yield self.value

    def update_values(self) -> None:
        total = self.total()
        values = self.series.values()
        self.spark.display = self.series.supported
        self.spark.data = values if values else [0.0]
        value = self.value
        if not self.series.supported:
            value.update("n/a")
        else:
            current = self.series.current
            text = units.metric_value(self.metric.unit, current, total)
            if current is None:  # this sample lacked it: show the last good one and its age
                text = f"n/a (last {units.metric_value(self.metric.unit, self.series.last_good[1], total)})"
            value.update(text)


def _structure(history: NodeHistory | None) -> tuple:
    if history is None:
        return ()
    return (tuple(history.gpus), tuple(_busy_links(history)))


def _busy_links(history: NodeHistory) -> list[str]:
    traffic = {name: sum(series["sent_bytes_per_s"].values()) + sum(series["received_bytes_per_s"].values())
               for name, series in history.links.items()}
    return [name for name, total in sorted(traffic.items(), key=lambda kv: -kv[1]) if total > 0][:MAX_LINKS]


class NodeCard(Vertical):
    """Everything one peer reports; rebuilt when its GPUs or busy links change, updated otherwise."""

    def __init__(self, label: str, **kwargs) -> None:
        super().__init__(classes="node-card", **kwargs)
        self.label = label
        self.history: NodeHistory | None = None
        self.link_names: dict[str, str] = {}
        self._structure: tuple = ()

    def compose(self) -> ComposeResult:
        note = Static(self._note(), classes="card-note")
        note.display = bool(self._note())
        yield note
        h = self.history
        if h is None:
            return
        for gpu in sorted(h.gpus.values(), key=lambda g: g.index):
            yield Label(_gpu_title(gpu), classes="gpu-title", id=f"gpu-{_safe(gpu.uuid)}")
            for metric in GPU_METRICS:
                total = (lambda g=gpu: g.vram_total_bytes) if metric.key == "vram_used_bytes" else (lambda: None)
                yield MetricRow(metric.title, metric, gpu.series[metric.key], total)
        yield Label("Host", classes="gpu-title")
        for metric in HOST_METRICS:
            total = (lambda: h.ram_total_bytes) if metric.key == "ram_used_bytes" else (lambda: None)
            yield MetricRow(metric.title, metric, h.host[metric.key], total)
        for name in _busy_links(h):
            known = self.link_names.get(name)
            yield Label(f"Link to {known} ({name})" if known else f"Connection with {name}", classes="gpu-title")
            for metric in LINK_METRICS:
                yield MetricRow(metric.title, metric, h.links[name][metric.key])

    def show(self, history: NodeHistory | None, view: PeerView | None, now: float, interval: float,
             link_names: dict[str, str]) -> None:
        self.history, self.link_names = history, link_names
        title = f"{self.label}  {view.title if view else ''}"
        if view is not None and (view.gpu_name or view.device):
            title += f"  ({view.gpu_name or view.device})"
        self.border_title = title
        age = history.age(now) if history else None
        if age is None:
            subtitle = "no sample yet"
        elif age > SILENT_INTERVALS * interval:
            subtitle = f"silent for {units.age(age)}: last good values shown"
        else:
            subtitle = f"sample {units.age(age)} ago" + (" (from health polls)" if history.source == "info" else "")
        self.border_subtitle = subtitle
        self.set_class(age is not None and age > SILENT_INTERVALS * interval, "silent")
        structure = _structure(history)
        if structure != self._structure:
            self._structure = structure
            self.refresh(recompose=True)
            return
        # Queries, not query_one: a rebuild may still be pending from an earlier update.
        for note in self.query(".card-note").results(Static):
            note.update(self._note())
            note.display = bool(self._note())
        for row in self.query(MetricRow):
            row.update_values()
        for gpu in history.gpus.values() if history else ():
            for label in self.query(f"#gpu-{_safe(gpu.uuid)}").results(Label):
                label.update(_gpu_title(gpu))

    def _note(self) -> str:
        if self.history is None:
            return "waiting for the first sample"
        return self.history.note or ""


def _gpu_title(gpu) -> str:
    extra = [f"{gpu.power_w:.0f} W" if gpu.power_w is not None else "",
             f"{gpu.temperature_c:.0f} C" if gpu.temperature_c is not None else "", "LOST" if gpu.lost else ""]
    extra_text = ", ".join(x for x in extra if x)
    return f"GPU {gpu.index}  {gpu.name}" + (f"  ({extra_text})" if extra_text else "")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)
