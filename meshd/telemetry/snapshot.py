"""Telemetry snapshots: immutable records of what a box's GPUs, host and links are doing.

Plain data with units in the field names; a reading this box cannot take is ``None`` (shown
"n/a"), never 0. Snapshots travel as dicts (``to_dict`` / ``from_dict``) over the authenticated
protocol; ``from_dict`` accepts only the known fields with the right types (a peer's data is
untrusted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_type_hints


def _check(cls, data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be a map")
    hints = get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kind = hints[f.name]
        allowed = {
            int | None: (int, type(None)), float | None: (int, float, type(None)), str | None: (str, type(None)),
            int: (int,), float: (int, float), str: (str,), bool: (bool,),
        }.get(kind)
        if allowed is not None:
            if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):
                raise ValueError(f"{cls.__name__}.{f.name} has the wrong type")
            if isinstance(value, str):
                value = value[:256]
            if kind in (float, float | None) and value is not None:
                value = float(value)
        out[f.name] = value
    return out


@dataclass(frozen=True)
class GpuSnapshot:
    uuid: str
    index: int
    name: str
    gpu_util_pct: float | None = None
    mem_util_pct: float | None = None
    encoder_util_pct: float | None = None
    decoder_util_pct: float | None = None
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    lost: bool = False  # the GPU fell off the bus / NVML says it is gone

    @classmethod
    def from_dict(cls, data: object) -> GpuSnapshot:
        return cls(**_check(cls, data))


@dataclass(frozen=True)
class InterfaceSnapshot:
    name: str
    rx_bytes_per_s: float | None = None
    tx_bytes_per_s: float | None = None

    @classmethod
    def from_dict(cls, data: object) -> InterfaceSnapshot:
        return cls(**_check(cls, data))


@dataclass(frozen=True)
class HostSnapshot:
    cpu_pct: float | None = None
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None
    interfaces: tuple[InterfaceSnapshot, ...] = ()

    @classmethod
    def from_dict(cls, data: object) -> HostSnapshot:
        values = _check(cls, data)
        raw = data.get("interfaces", []) if isinstance(data, dict) else []
        if not isinstance(raw, (list, tuple)) or len(raw) > 64:
            raise ValueError("HostSnapshot.interfaces must be a short list")
        values["interfaces"] = tuple(InterfaceSnapshot.from_dict(i) for i in raw)
        return cls(**values)


@dataclass(frozen=True)
class LinkSnapshot:
    """meshd's own traffic with one peer."""

    peer: str
    sent_bytes_per_s: float | None = None
    received_bytes_per_s: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    recent_hop_ms: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, data: object) -> LinkSnapshot:
        values = _check(cls, data)
        hops = data.get("recent_hop_ms", []) if isinstance(data, dict) else []
        if not isinstance(hops, (list, tuple)) or len(hops) > 64 or not all(isinstance(h, (int, float)) for h in hops):
            raise ValueError("LinkSnapshot.recent_hop_ms must be a short list of numbers")
        values["recent_hop_ms"] = tuple(float(h) for h in hops)
        return cls(**values)


@dataclass(frozen=True)
class NodeSnapshot:
    """One sample of one box: its GPUs, its host, its links; ``time`` is wall-clock seconds."""

    node_id: str
    time: float
    monotonic: float
    gpus: tuple[GpuSnapshot, ...] = ()
    host: HostSnapshot = field(default_factory=HostSnapshot)
    links: tuple[LinkSnapshot, ...] = ()
    nvml: str | None = None  # why NVML readings are missing, if they are (no driver, no GPU, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> NodeSnapshot:
        values = _check(cls, data)
        if not isinstance(data, dict):
            raise ValueError("NodeSnapshot must be a map")
        gpus, links = data.get("gpus", []), data.get("links", [])
        if not isinstance(gpus, (list, tuple)) or len(gpus) > 64 or not isinstance(links, (list, tuple)) or len(links) > 256:
            raise ValueError("NodeSnapshot gpus/links must be short lists")
        values["gpus"] = tuple(GpuSnapshot.from_dict(g) for g in gpus)
        values["links"] = tuple(LinkSnapshot.from_dict(link) for link in links)
        values["host"] = HostSnapshot.from_dict(data.get("host", {}))
        return cls(**values)
