"""A snapshot in plain words (``meshd telemetry``, ``meshtui peers``)."""

from __future__ import annotations

import time

from .snapshot import NodeSnapshot


def _num(value: float | None, unit: str, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def _rate_text(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B/s"


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / (1 << 30):.1f}"


def snapshot_lines(snapshot: NodeSnapshot) -> list[str]:
    """A snapshot for people: one line per GPU, host, interface and link; "n/a" where unreadable."""
    lines = [f"node {snapshot.node_id} at {time.strftime('%H:%M:%S', time.localtime(snapshot.time))}"]
    for g in snapshot.gpus:
        if g.lost:
            lines.append(f"GPU {g.index} {g.name} ({g.uuid}): LOST (fell off the bus or the driver reset it)")
            continue
        lines.append(
            f"GPU {g.index} {g.name} ({g.uuid}): load {_num(g.gpu_util_pct, '%')}, "
            f"memory load {_num(g.mem_util_pct, '%')}, "
            f"NVENC {_num(g.encoder_util_pct, '%')}, NVDEC {_num(g.decoder_util_pct, '%')}, "
            f"VRAM {_gib(g.vram_used_bytes)}/{_gib(g.vram_total_bytes)} GiB, "
            f"PCIe tx {_rate_text(g.pcie_tx_bytes_per_s)} rx {_rate_text(g.pcie_rx_bytes_per_s)}, "
            f"power {_num(g.power_w, 'W')}/{_num(g.power_limit_w, 'W')}, {_num(g.temperature_c, 'C')}, "
            f"clocks {_num(g.sm_clock_mhz, 'MHz')} SM / {_num(g.mem_clock_mhz, 'MHz')} memory"
        )
    if not snapshot.gpus:
        lines.append(f"no GPU readings: {snapshot.nvml or 'no GPU'}")
    h = snapshot.host
    lines.append(f"host: CPU {_num(h.cpu_pct, '%')}, RAM {_gib(h.ram_used_bytes)}/{_gib(h.ram_total_bytes)} GiB")
    for i in h.interfaces:
        lines.append(f"  {i.name}: in {_rate_text(i.rx_bytes_per_s)}, out {_rate_text(i.tx_bytes_per_s)}")
    for link in snapshot.links:
        hops = ", ".join(f"{ms:.1f}" for ms in link.recent_hop_ms[-4:])
        lines.append(f"link {link.peer}: sent {_rate_text(link.sent_bytes_per_s)}, received "
                     f"{_rate_text(link.received_bytes_per_s)}" + (f", recent hops {hops} ms" if hops else ""))
    return lines
