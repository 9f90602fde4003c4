"""This box's NVIDIA GPUs through NVML (nvidia-ml-py): probed once, then read every sample.

Every reading is probed once per GPU when NVML opens: one the GPU, driver or binding does not support
reads ``None`` from then on and is never retried (btop's approach); it is never reported as 0. No
NVIDIA driver, no GPU, or a GPU that fell off the bus are normal states: the GPU list is empty
(:attr:`NvmlGpus.reason` says why) or the GPU is marked ``lost``. ``pynvml`` is imported lazily, only
when NVML is opened.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .snapshot import GpuSnapshot

log = logging.getLogger(__name__)


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
