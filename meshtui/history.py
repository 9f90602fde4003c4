"""Telemetry over the last minutes: per-peer series of GPU, host and link readings.

A reading a peer cannot take is ``None`` and stays "n/a" (never drawn as 0). Every series keeps its
last good value and when it arrived, so a silent peer still shows what it last said and how old
that is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshd.telemetry.snapshot import GpuSnapshot, LinkSnapshot, NodeSnapshot

#: Samples kept per series (at 1 Hz: five minutes).
HISTORY_SAMPLES = 300


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str  # "%", "bytes", "bytes/s", "W", "C"


#: What the telemetry screen draws per GPU, in order.
GPU_METRICS = (
    Metric("gpu_util_pct", "GPU", "%"),
    Metric("encoder_util_pct", "NVENC", "%"),
    Metric("decoder_util_pct", "NVDEC", "%"),
    Metric("vram_used_bytes", "VRAM", "bytes"),
    Metric("pcie_tx_bytes_per_s", "PCIe TX", "bytes/s"),
    Metric("pcie_rx_bytes_per_s", "PCIe RX", "bytes/s"),
)
HOST_METRICS = (Metric("cpu_pct", "CPU", "%"), Metric("ram_used_bytes", "RAM", "bytes"))
LINK_METRICS = (Metric("sent_bytes_per_s", "TX", "bytes/s"), Metric("received_bytes_per_s", "RX", "bytes/s"))


class Series:
    """One reading over time; ``None`` samples count as gaps, not zeros."""

    def __init__(self, maxlen: int = HISTORY_SAMPLES) -> None:
        self._samples: deque[tuple[float, float | None]] = deque(maxlen=maxlen)
        self._last_good: tuple[float, float] | None = None

    def add(self, at: float, value: float | None) -> None:
        self._samples.append((at, value))
        if value is not None:
            self._last_good = (at, value)

    def values(self) -> list[float]:
        """The good values, oldest first (what a sparkline draws)."""
        return [v for _, v in self._samples if v is not None]

    @property
    def supported(self) -> bool:
        """False while every sample so far was ``None`` (the peer cannot take this reading)."""
        return self._last_good is not None

    @property
    def last_good(self) -> tuple[float, float] | None:
        """(arrival time, value) of the newest reading that was not ``None``."""
        return self._last_good

    @property
    def current(self) -> float | None:
        """The newest sample (``None`` if the newest reading was n/a)."""
        return self._samples[-1][1] if self._samples else None


@dataclass
class GpuHistory:
    uuid: str
    index: int
    name: str
    vram_total_bytes: int | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    lost: bool = False
    series: dict[str, Series] = field(default_factory=lambda: {m.key: Series() for m in GPU_METRICS})


@dataclass
class NodeHistory:
    """Everything one peer has reported, and where it came from."""

    label: str
    source: str = ""  # "daemon": pushed telemetry; "info": derived from health polls
    note: str | None = None  # why readings are missing (no NVML, older daemon...)
    received: float | None = None  # local wall time of the newest sample
    node_id: str | None = None
    ram_total_bytes: int | None = None
    gpus: dict[str, GpuHistory] = field(default_factory=dict)
    host: dict[str, Series] = field(default_factory=lambda: {m.key: Series() for m in HOST_METRICS})
    links: dict[str, dict[str, Series]] = field(default_factory=dict)

    def add(self, snapshot: NodeSnapshot, source: str, at: float) -> None:
        self.source = source
        self.received = at
        self.node_id = snapshot.node_id
        self.note = snapshot.nvml
        for gpu in snapshot.gpus:
            self._add_gpu(gpu, at)
        self.ram_total_bytes = snapshot.host.ram_total_bytes
        self.host["cpu_pct"].add(at, snapshot.host.cpu_pct)
        self.host["ram_used_bytes"].add(at, snapshot.host.ram_used_bytes)
        for link in snapshot.links:
            self._add_link(link, at)

    def _add_gpu(self, gpu: GpuSnapshot, at: float) -> None:
        history = self.gpus.get(gpu.uuid)
        if history is None:
            history = self.gpus[gpu.uuid] = GpuHistory(gpu.uuid, gpu.index, gpu.name)
        history.vram_total_bytes = gpu.vram_total_bytes
        history.power_w, history.temperature_c, history.lost = gpu.power_w, gpu.temperature_c, gpu.lost
        for metric in GPU_METRICS:
            history.series[metric.key].add(at, getattr(gpu, metric.key))

    def _add_link(self, link: LinkSnapshot, at: float) -> None:
        series = self.links.setdefault(link.peer, {m.key: Series() for m in LINK_METRICS})
        for metric in LINK_METRICS:
            series[metric.key].add(at, getattr(link, metric.key))

    def age(self, now: float) -> float | None:
        return None if self.received is None else max(0.0, now - self.received)


class TelemetryStore:
    """Per-peer histories, keyed by the peer's label."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.nodes: dict[str, NodeHistory] = {}

    def node(self, label: str) -> NodeHistory:
        if label not in self.nodes:
            self.nodes[label] = NodeHistory(label)
        return self.nodes[label]

    def add(self, label: str, snapshot: NodeSnapshot, source: str) -> None:
        self.node(label).add(snapshot, source, self.clock())

    def set_note(self, label: str, note: str | None) -> None:
        self.node(label).note = note

    def forget(self, label: str) -> None:
        self.nodes.pop(label, None)
