"""This host's CPU, RAM and network interfaces (psutil), as rates between two reads."""

from __future__ import annotations

import psutil

from .snapshot import HostSnapshot, InterfaceSnapshot

#: Interfaces listed per host (a container host can have hundreds of veths); ``snapshot`` caps at 64.
MAX_INTERFACES = 32
#: Container bridges and veths, VM bridges, VPN tunnels and the like: listed after real NICs here,
#: and never advertised on by mDNS (their addresses are unreachable from other boxes, or multicast
#: does not cross them).
VIRTUAL_INTERFACE_PREFIXES = ("docker", "br-", "veth", "virbr", "vnet", "vmnet", "vboxnet", "podman", "cni",
                              "flannel", "cali", "weave", "kube", "lxcbr", "lxdbr", "tailscale", "zt", "wg",
                              "tun", "tap", "ifb", "dummy")
#: How often the set of interfaces that are up is re-read (cheap, but not free: one ioctl each).
INTERFACE_REFRESH_S = 10.0


def counter_rate(now: int, before: int, seconds: float) -> float | None:
    """Bytes per second between two readings of a counter; None when it went backwards (reset)."""
    if seconds <= 0 or now < before:  # counter reset (interface re-created)
        return None
    return (now - before) / seconds


def _cpu_busy_total(times) -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores. Linux counts guest time inside user time; idle and
    iowait are not busy."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0), total


class HostReader:
    """CPU, RAM and per-interface network rates of this host (psutil). Rates need two reads."""

    def __init__(self) -> None:
        # Our own CPU window: psutil.cpu_percent() keeps one per process, which any other caller would move.
        self._last_cpu: tuple[float, float] | None = None
        self._last_net: tuple[float, dict[str, tuple[int, int]]] | None = None
        self._up: tuple[str, ...] = ()
        self._up_read_at = -INTERFACE_REFRESH_S

    def _interfaces_up(self, now: float) -> tuple[str, ...]:
        if now - self._up_read_at >= INTERFACE_REFRESH_S:
            up = [name for name, s in psutil.net_if_stats().items() if s.isup]
            up.sort(key=lambda name: (name.startswith(VIRTUAL_INTERFACE_PREFIXES), name))
            self._up = tuple(up[:MAX_INTERFACES])
            self._up_read_at = now
        return self._up

    def read(self, now: float) -> HostSnapshot:
        busy, total = _cpu_busy_total(psutil.cpu_times())
        cpu = None
        if self._last_cpu is not None and total > self._last_cpu[1]:
            cpu = min(100.0, max(0.0, (busy - self._last_cpu[0]) / (total - self._last_cpu[1]) * 100))
        self._last_cpu = (busy, total)
        memory = psutil.virtual_memory()
        counters = psutil.net_io_counters(pernic=True)
        current = {name: (c.bytes_recv, c.bytes_sent) for name, c in counters.items()}
        interfaces = []
        last = self._last_net
        for name in self._interfaces_up(now):
            if name not in current:
                continue
            rx = tx = None
            if last is not None and name in last[1]:
                seconds = now - last[0]
                rx = counter_rate(current[name][0], last[1][name][0], seconds)
                tx = counter_rate(current[name][1], last[1][name][1], seconds)
            interfaces.append(InterfaceSnapshot(name, rx_bytes_per_s=rx, tx_bytes_per_s=tx))
        self._last_net = (now, current)
        return HostSnapshot(
            cpu_pct=cpu,
            ram_used_bytes=int(memory.total - memory.available),  # what other programs cannot have
            ram_total_bytes=int(memory.total),
            interfaces=tuple(interfaces),
        )
