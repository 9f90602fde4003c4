"""Live telemetry: what this box's GPUs, host and meshd links are doing, about once a second.

One sampler thread per daemon reads NVML (nvidia-ml-py) and psutil into frozen
:class:`~meshd.telemetry.snapshot.NodeSnapshot` records. Subscribers over the protocol (request op
``telemetry``) are pushed the latest snapshot, so ten dashboards cost the same NVML calls as one,
and a slow subscriber only receives fewer snapshots (its sends wait on the socket).

Every NVML reading is probed once per GPU when NVML opens: one the GPU, driver or binding does
not support reads ``None`` from then on and is never retried (btop's approach); it is never
reported as 0. No NVIDIA driver, no GPU, or a GPU that fell off the bus are normal states: the
GPU list is empty (``NodeSnapshot.nvml`` says why) or the GPU is marked ``lost``.
``pynvml`` is imported lazily, only when NVML is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import psutil

from ..errors import MeshError
from ..wire.link import LinkRegistry
from .snapshot import GpuSnapshot, HostSnapshot, InterfaceSnapshot, LinkSnapshot, NodeSnapshot

log = logging.getLogger(__name__)

#: Request op of a telemetry subscription, and the kind of the events it pushes.
TELEMETRY_OP = "telemetry"
TELEMETRY_EVENT = "telemetry"
#: Sampling period of the daemon's sampler, unless configured (``telemetry_interval``).
DEFAULT_INTERVAL_S = 1.0
#: A subscriber's requested period is clamped to this range.
MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 10.0
#: The sampler itself may run faster than subscribers may ask (benchmarks, tests), never faster than this.
MIN_SAMPLER_INTERVAL_S = 0.1
#: The first sample after start-up waits at most this long, so that rates (CPU, bytes/s) cover a
#: real window instead of reading "n/a" in the first snapshot.
PRIME_S = 0.5
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
#: A link that moved no byte for this long leaves the snapshot (inbound links are per connection).
LINK_ACTIVE_WINDOW_S = 60.0
#: Links listed per snapshot, most recently active first.
MAX_LINKS = 64
#: A subscription re-checks whether the daemon is draining at least this often.
DRAIN_CHECK_S = 1.0



# --- NVML -----------------------------------------------------------------------------------------


def _utilization(nvml, handle) -> tuple:
    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
    return float(rates.gpu), float(rates.memory)


def _encoder(nvml, handle) -> tuple:
    return (float(nvml.nvmlDeviceGetEncoderUtilization(handle)[0]),)  # [percent, sampling period us]


def _decoder(nvml, handle) -> tuple:
    return (float(nvml.nvmlDeviceGetDecoderUtilization(handle)[0]),)


def _memory(nvml, handle) -> tuple:
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.used), int(info.total)


def _pcie_tx(nvml, handle) -> tuple:
    return (nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES) * 1024.0,)  # KiB/s


def _pcie_rx(nvml, handle) -> tuple:
    return (nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES) * 1024.0,)


def _power(nvml, handle) -> tuple:
    return (nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,)  # mW


def _power_limit(nvml, handle) -> tuple:
    return (nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,)


def _temperature(nvml, handle) -> tuple:
    return (float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),)


def _sm_clock(nvml, handle) -> tuple:
    return (float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),)


def _mem_clock(nvml, handle) -> tuple:
    return (float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),)


@dataclass(frozen=True)
class GpuReading:
    """One NVML call and the :class:`GpuSnapshot` fields it fills, in the fields' units."""

    what: str  # in plain words, for logs and ``meshd check``
    fields: tuple[str, ...]
    read: Callable[[Any, Any], tuple]


GPU_READINGS: tuple[GpuReading, ...] = (
    GpuReading("GPU and memory utilization", ("gpu_util_pct", "mem_util_pct"), _utilization),
    GpuReading("NVENC utilization", ("encoder_util_pct",), _encoder),
    GpuReading("NVDEC utilization", ("decoder_util_pct",), _decoder),
    GpuReading("VRAM", ("vram_used_bytes", "vram_total_bytes"), _memory),
    GpuReading("PCIe TX", ("pcie_tx_bytes_per_s",), _pcie_tx),
    GpuReading("PCIe RX", ("pcie_rx_bytes_per_s",), _pcie_rx),
    GpuReading("power", ("power_w",), _power),
    GpuReading("power limit", ("power_limit_w",), _power_limit),
    GpuReading("temperature", ("temperature_c",), _temperature),
    GpuReading("SM clock", ("sm_clock_mhz",), _sm_clock),
    GpuReading("memory clock", ("mem_clock_mhz",), _mem_clock),
)

#: NVML error codes meaning "this reading does not exist here", by the binding's constant names.
_UNSUPPORTED_ERRORS = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NO_PERMISSION",
                       "NVML_ERROR_INVALID_ARGUMENT")
_LOST_ERRORS = ("NVML_ERROR_GPU_IS_LOST",)
#: Why NVML may not start, in words a user can act on.
_INIT_ERRORS = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": "no NVIDIA driver on this box (libnvidia-ml.so not found)",
    "NVML_ERROR_DRIVER_NOT_LOADED": "the NVIDIA kernel driver is not loaded",
    "NVML_ERROR_NO_PERMISSION": "no permission to open /dev/nvidia* (check the service's DeviceAllow= and groups)",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": "the NVIDIA driver library and kernel module differ (driver upgraded? "
                                          "reboot or reload the module)",
}


def _codes(nvml, names: Sequence[str]) -> frozenset[int]:
    return frozenset(getattr(nvml, name) for name in names if isinstance(getattr(nvml, name, None), int))


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class _Gpu:
    index: int
    uuid: str
    name: str
    handle: Any
    readings: list[GpuReading] = field(default_factory=list)  # supported: read every sample
    unsupported: dict[str, str] = field(default_factory=dict)  # what -> why
    vram_total_bytes: int | None = None
    lost: bool = False


class NvmlGpus:
    """This box's NVIDIA GPUs as NVML sees them, probed once and then read every sample.

    ``nvml`` is the binding module; None imports ``pynvml`` (nvidia-ml-py) when :meth:`open` runs.
    Tests pass a fake binding, since CI machines have no GPU.
    """

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._module = nvml
        self.nvml: Any = None
        self.reason: str | None = "NVML not opened yet"  # None once NVML answers and sees a GPU
        self.gpus: list[_Gpu] = []
        self._error: type[BaseException] = Exception  # the binding's NVMLError
        self._unsupported: frozenset[int] = frozenset()
        self._lost: frozenset[int] = frozenset()

    def open(self) -> NvmlGpus:
        """Start NVML, list the GPUs and probe every reading on each (never raises)."""
        try:
            nvml = self._module if self._module is not None else _import_pynvml()
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return self
        error = self._error = getattr(nvml, "NVMLError", Exception)
        try:
            nvml.nvmlInit()
        except error as exc:
            code = getattr(exc, "value", None)
            known = {getattr(nvml, name, None): text for name, text in _INIT_ERRORS.items()}
            self.reason = known.get(code) or f"NVML did not start: {_text(exc)}"
            log.info("no GPU telemetry: %s", self.reason)
            return self
        self.nvml = nvml
        self._unsupported = _codes(nvml, _UNSUPPORTED_ERRORS)
        self._lost = _codes(nvml, _LOST_ERRORS)
        try:
            count = nvml.nvmlDeviceGetCount()
        except error as exc:
            self.reason = f"NVML cannot count GPUs: {_text(exc)}"
            return self
        for index in range(count):
            self.gpus.append(self._probe(index))
        self.reason = None if self.gpus else "NVML found no NVIDIA GPU"
        return self

    def _probe(self, index: int) -> _Gpu:
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu = _Gpu(index, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)), handle)
        except self._error as exc:
            log.warning("GPU %d cannot be read: %s", index, _text(exc))
            return _Gpu(index, f"unreadable-gpu-{index}", "unreadable GPU", None, lost=True)
        for reading in GPU_READINGS:
            try:
                values = reading.read(nvml, handle)
            except self._error as exc:
                code = getattr(exc, "value", None)
                if code in self._lost:
                    gpu.lost = True
                    log.error("GPU %d (%s) is lost: %s", index, gpu.name, _text(exc))
                    break
                if code in self._unsupported:
                    gpu.unsupported[reading.what] = _text(exc)
                    continue
                # A transient failure (timeout, unknown): keep the reading, it may answer next time.
                log.debug("GPU %d %s probe failed: %s", index, reading.what, _text(exc))
            except Exception as exc:  # noqa: BLE001 - e.g. AttributeError: this nvidia-ml-py lacks the call
                gpu.unsupported[reading.what] = f"{type(exc).__name__}: {exc}"
                continue
            else:
                probed = dict(zip(reading.fields, values, strict=True))
                if "vram_total_bytes" in probed:
                    gpu.vram_total_bytes = probed["vram_total_bytes"]
            gpu.readings.append(reading)
        if gpu.unsupported:
            log.info("GPU %d (%s): n/a here: %s", index, gpu.name,
                     "; ".join(f"{what} ({why})" for what, why in gpu.unsupported.items()))
        return gpu

    def read(self) -> tuple[GpuSnapshot, ...]:
        """One snapshot per GPU; readings that fail this time are None."""
        return tuple(self._read(gpu) for gpu in self.gpus)

    def _read(self, gpu: _Gpu) -> GpuSnapshot:
        values: dict[str, Any] = {}
        if not gpu.lost:
            for reading in list(gpu.readings):
                try:
                    values.update(zip(reading.fields, reading.read(self.nvml, gpu.handle), strict=True))
                except Exception as exc:  # noqa: BLE001 - NVMLError, or a ctypes surprise: n/a this time
                    code = getattr(exc, "value", None) if isinstance(exc, self._error) else None
                    if code in self._lost:
                        gpu.lost = True
                        log.error("GPU %d (%s) is lost: %s", gpu.index, gpu.name, _text(exc))
                        values = {}
                        break
                    if code in self._unsupported:  # e.g. a permission withdrawn at run time
                        gpu.readings.remove(reading)
                        gpu.unsupported[reading.what] = _text(exc)
                        log.info("GPU %d (%s): %s no longer available: %s", gpu.index, gpu.name, reading.what,
                                 _text(exc))
        return GpuSnapshot(uuid=gpu.uuid, index=gpu.index, name=gpu.name, lost=gpu.lost, **values)

    def inventory(self) -> tuple[GpuSnapshot, ...]:
        """What does not change: each GPU's identity and VRAM size (for mDNS hints and ``meshd check``)."""
        return tuple(GpuSnapshot(uuid=g.uuid, index=g.index, name=g.name, vram_total_bytes=g.vram_total_bytes,
                                 lost=g.lost) for g in self.gpus)

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()
            self.nvml = None


def _import_pynvml():
    import pynvml  # noqa: PLC0415 - lazy: the daemon must start on boxes without it

    return pynvml


# --- host and links ---------------------------------------------------------------------------------


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


@dataclass
class _LinkSeen:
    at: float
    sent: int
    received: int
    changed_at: float


class LinkReader:
    """meshd's own per-peer traffic (from its :class:`LinkRegistry`), as rates."""

    def __init__(self, links: LinkRegistry) -> None:
        self.links = links
        self._seen: dict[str, _LinkSeen] = {}

    def read(self, now: float) -> tuple[LinkSnapshot, ...]:
        active: list[tuple[float, LinkSnapshot]] = []
        for stats in self.links.snapshot():
            peer, sent, received = stats["peer"], int(stats["bytes_sent"]), int(stats["bytes_received"])
            before = self._seen.get(peer)
            tx = rx = None
            changed_at = now
            if before is not None:
                tx = counter_rate(sent, before.sent, now - before.at)
                rx = counter_rate(received, before.received, now - before.at)
                if (sent, received) == (before.sent, before.received):
                    changed_at = before.changed_at
            self._seen[peer] = _LinkSeen(now, sent, received, changed_at)
            if now - changed_at > LINK_ACTIVE_WINDOW_S:
                continue
            active.append((changed_at, LinkSnapshot(peer, sent_bytes_per_s=tx, received_bytes_per_s=rx,
                                                    bytes_sent=sent, bytes_received=received,
                                                    recent_hop_ms=tuple(stats.get("recent_hop_ms", ())))))
        active.sort(key=lambda item: item[0], reverse=True)
        return tuple(link for _, link in active[:MAX_LINKS])


# --- the sampler ------------------------------------------------------------------------------------


class TelemetrySampler:
    """Samples GPUs, host and links on one thread into :class:`NodeSnapshot` records.

    :meth:`start` opens NVML and probes it (so :meth:`inventory` answers at once), then the thread
    publishes a snapshot every ``interval`` seconds to :attr:`latest` and to each listener.
    """

    def __init__(self, node_id: str, *, interval: float = DEFAULT_INTERVAL_S, links: LinkRegistry | None = None,
                 nvml: Any | None = None) -> None:
        self.node_id = node_id
        self.interval = min(max(float(interval), MIN_SAMPLER_INTERVAL_S), MAX_INTERVAL_S)
        self.gpus = NvmlGpus(nvml)
        self.host = HostReader()
        self.links = LinkReader(links) if links is not None else None
        self.listeners: list[Callable[[NodeSnapshot], None]] = []
        self.latest: NodeSnapshot | None = None
        self.samples = 0
        self._opened = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> TelemetrySampler:
        """Open NVML and take a first, unpublished reading so that rates have a start."""
        with self._lock:
            if not self._opened:
                self.gpus.open()
                self._opened = True
                now = time.monotonic()
                self.host.read(now)
                if self.links is not None:
                    self.links.read(now)
        return self

    def sample(self) -> NodeSnapshot:
        """Read everything now (thread-safe; opens NVML on first use)."""
        self.open()
        with self._lock:
            now = time.monotonic()
            return NodeSnapshot(
                node_id=self.node_id,
                time=time.time(),
                monotonic=now,
                gpus=self.gpus.read(),
                host=self.host.read(now),
                links=self.links.read(now) if self.links is not None else (),
                nvml=self.gpus.reason,
            )

    def inventory(self) -> tuple[GpuSnapshot, ...]:
        return self.gpus.inventory()

    def age(self) -> float | None:
        """Seconds since the latest snapshot, None before the first."""
        latest = self.latest
        return None if latest is None else time.monotonic() - latest.monotonic

    def start(self) -> TelemetrySampler:
        self.open()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="meshd-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self.gpus.close()

    def _run(self) -> None:
        next_at = time.monotonic() + min(self.interval, PRIME_S)
        failures = 0
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                snapshot = self.sample()
            except Exception:  # noqa: BLE001 - a bad reading must not end telemetry for good
                failures += 1
                if failures == 1 or failures % 600 == 0:
                    log.exception("telemetry sample failed (%d times so far)", failures)
            else:
                self.latest = snapshot
                self.samples += 1
                for listener in list(self.listeners):
                    try:
                        listener(snapshot)
                    except Exception:  # noqa: BLE001
                        log.exception("telemetry listener failed")
            # Fixed cadence without drift; after a stall (suspend, a hung call) skip the missed ticks.
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.interval


# --- serving it -------------------------------------------------------------------------------------


def clamp_interval(value: object) -> float:
    """A subscriber's requested period, clamped to MIN_INTERVAL_S..MAX_INTERVAL_S."""
    if value is None:
        return DEFAULT_INTERVAL_S
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise MeshError("bad-request", f"telemetry interval must be a number of seconds, got {value!r:.40}")
    return min(max(float(value), MIN_INTERVAL_S), MAX_INTERVAL_S)


class TelemetryService:
    """The daemon side of telemetry: the ``telemetry`` request and the ``telemetry`` field of node info.

    Create it inside the running event loop; :meth:`attach` registers it on a daemon and
    :meth:`close` ends every subscription (a final reply ``{"ended": ...}``) and stops the sampler.
    """

    def __init__(self, sampler: TelemetrySampler) -> None:
        self.sampler = sampler
        self._loop = asyncio.get_running_loop()
        self._tick: asyncio.Future = self._loop.create_future()
        self._closed = asyncio.Event()
        self._daemon = None
        sampler.listeners.append(self._from_thread)

    def attach(self, daemon) -> TelemetryService:
        """Serve ``telemetry`` requests on ``daemon`` and add the latest snapshot to its node info."""
        self._daemon = daemon
        daemon.extra_ops[TELEMETRY_OP] = self.handle
        daemon.info_providers.append(self.info)
        return self

    def info(self) -> dict:
        latest = self.sampler.latest
        return {"telemetry": latest.to_dict() if latest is not None else None}

    def _from_thread(self, snapshot: NodeSnapshot) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._publish, snapshot)

    def _publish(self, snapshot: NodeSnapshot | None) -> None:
        tick, self._tick = self._tick, self._loop.create_future()
        if not tick.done():
            tick.set_result(snapshot)

    def _ending(self) -> str | None:
        if self._closed.is_set():
            return "telemetry stopped"
        if self._daemon is not None and self._daemon.draining:
            return "daemon is shutting down"
        return None

    async def handle(self, request) -> tuple[dict, list]:
        """Push ``{"kind": "telemetry", "snapshot": {...}}`` events until the client cancels."""
        interval = clamp_interval(request.header.get("interval"))
        sent: NodeSnapshot | None = None
        while (reason := self._ending()) is None:
            latest = self.sampler.latest
            if latest is None or latest is sent:
                # Wait for the sampler's next snapshot (subscribers never trigger a reading).
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._tick), DRAIN_CHECK_S)
                continue
            await request.event({"kind": TELEMETRY_EVENT, "snapshot": latest.to_dict()})
            sent = latest
            await self._pause(interval)
        return {"ended": reason}, []

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, waking early when telemetry closes or the daemon starts draining."""
        deadline = time.monotonic() + seconds
        while self._ending() is None and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), min(left, DRAIN_CHECK_S))

    async def close(self) -> None:
        """End the subscriptions and stop the sampler thread (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._publish(None)
        with contextlib.suppress(ValueError):
            self.sampler.listeners.remove(self._from_thread)
        await asyncio.to_thread(self.sampler.stop)


def serve_telemetry(daemon, *, interval: float | None = None, nvml: Any | None = None) -> TelemetryService:
    """Start a sampler for ``daemon`` (its node id, its links) and serve it; call in the event loop."""
    sampler = TelemetrySampler(daemon.node_id, interval=interval or daemon.config.telemetry_interval,
                               links=daemon.links, nvml=nvml)
    sampler.start()
    return TelemetryService(sampler).attach(daemon)


# --- the client side ----------------------------------------------------------------------------------


async def subscribe(channel, on_snapshot: Callable[[NodeSnapshot], Any], interval: float = DEFAULT_INTERVAL_S) -> dict:
    """Receive a peer's snapshots until cancelled (or until the daemon ends the subscription, whose
    final reply header is returned). A malformed snapshot raises MeshError: the peer is broken."""

    async def event(frame) -> None:
        if frame.header.get("kind") != TELEMETRY_EVENT:
            return
        try:
            snapshot = NodeSnapshot.from_dict(frame.header.get("snapshot"))
        except (ValueError, TypeError) as exc:
            raise MeshError("protocol", f"bad telemetry snapshot: {exc}", peer=channel.name) from None
        result = on_snapshot(snapshot)
        if asyncio.iscoroutine(result):
            await result

    reply = await channel.request(TELEMETRY_OP, {"interval": interval}, on_event=event, timeout=None)
    return {k: v for k, v in reply.header.items() if k not in ("op", "id")}


async def first_snapshot(channel, timeout: float = 10.0) -> NodeSnapshot:
    """One snapshot from a peer: subscribe, take the first push, cancel."""
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    def take(snapshot: NodeSnapshot) -> None:
        if not got.done():
            got.set_result(snapshot)

    task = asyncio.ensure_future(subscribe(channel, take))
    try:
        await asyncio.wait({got, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if got.done():
            return got.result()
        if task.done():
            task.result()  # raises the peer's error
            raise MeshError("peer-lost", "telemetry ended before the first snapshot", peer=channel.name)
        raise MeshError("peer-lost", f"no telemetry within {timeout:.0f} s", peer=channel.name)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


# --- in plain words ---------------------------------------------------------------------------------


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
