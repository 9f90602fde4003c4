"""What this host can encode and decode, established by trying, not by GPU name."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from . import hevc_cpu, hevc_nv


@dataclass(frozen=True)
class Capabilities:
    """One device's codec abilities, as probed. Plain data: it travels in the meshd handshake."""

    device: str
    gpu_name: str | None = None
    nvenc: bool = False
    nvenc_engines: int = 0
    nvenc_reason: str = "not a CUDA device"
    #: "ok", "absent" (no NVENC here), "failing" (NVENC there but not working: shown loudly) or ""
    #: (not probed, or a peer too old to say)
    nvenc_state: str = ""
    nvdec: bool = False
    nvdec_engines: int = 0
    nvdec_reason: str = "not a CUDA device"
    cpu_hevc: bool = False
    cpu_hevc_reason: str = ""
    fp8: bool = field(default_factory=lambda: hasattr(torch, "float8_e4m3fn"))

    def can_encode(self, codec: str) -> bool:
        if codec == "hevc":
            return self.nvenc or self.cpu_hevc
        return codec == "raw" or (codec in ("u8", "fp8") and (codec != "fp8" or self.fp8))

    def can_decode(self, codec: str) -> bool:
        if codec == "hevc":
            return self.nvdec or self.cpu_hevc
        return self.can_encode(codec)

    @property
    def hevc_encoder(self) -> str | None:
        """The HEVC encoder ``auto`` picks here: ``nvenc``, ``x265`` or none."""
        return "nvenc" if self.nvenc else ("x265" if self.cpu_hevc else None)

    @property
    def hevc_decoder(self) -> str | None:
        return "nvdec" if self.nvdec else ("ffmpeg" if self.cpu_hevc else None)

    def summary(self) -> list[str]:
        """Plain-words lines for ``meshd check``."""
        lines = [f"device {self.device}" + (f" ({self.gpu_name})" if self.gpu_name else "")]
        lines.append(("NVENC yes: " if self.nvenc else
                      "NVENC FAILING: " if self.nvenc_state == "failing" else "NVENC no: ") + self.nvenc_reason)
        lines.append(("NVDEC yes: " if self.nvdec else "NVDEC no: ") + self.nvdec_reason)
        lines.append(("CPU HEVC yes: " if self.cpu_hevc else "CPU HEVC no: ") + self.cpu_hevc_reason)
        return lines

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Capabilities:
        """Build from a peer's (untrusted) dict: unknown keys are ignored, wrong types rejected."""
        if not isinstance(data, dict):
            raise ValueError("capabilities must be a map")
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
                expected = {"device": str, "gpu_name": (str, type(None)), "nvenc_reason": str, "nvdec_reason": str,
                            "nvenc_state": str,
                            "cpu_hevc_reason": str, "nvenc_engines": int, "nvdec_engines": int}.get(f.name, bool)
                if not isinstance(value, expected):
                    raise ValueError(f"capability {f.name} has the wrong type")
                kwargs[f.name] = value[:200] if isinstance(value, str) else value
        if "device" not in kwargs:
            raise ValueError("capabilities lack a device")
        return cls(**kwargs)


_cache: dict[str, Capabilities] = {}
_lock = threading.Lock()


def probe(device: str | torch.device = "cpu", refresh: bool = False) -> Capabilities:
    """Probe (once per device, cached; ``refresh`` probes again) what ``device`` can do.

    NVENC is tried by encoding a frame with each encoder configuration (lossless and constant QP),
    from device memory on a CUDA device and from host memory on the CPU; CUDA devices also decode a
    tiny HEVC frame through NVDEC; the CPU path checks libx265 and FFmpeg's HEVC decoder in PyAV. A
    missing piece is reported with a one-line reason and a state, never raised.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    with _lock:
        if key in _cache and not refresh:
            return _cache[key]
        if refresh:
            hevc_nv.reset_import()
        cpu_ok, cpu_reason = hevc_cpu.x265_available()
        nv = hevc_nv.probe_nv(device)
        caps = Capabilities(
            device=key,
            gpu_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            nvenc=nv.nvenc,
            nvenc_engines=nv.nvenc_engines,
            nvenc_reason=nv.nvenc_reason,
            nvenc_state=nv.nvenc_state,
            nvdec=nv.nvdec,
            nvdec_engines=nv.nvdec_engines,
            nvdec_reason=nv.nvdec_reason,
            cpu_hevc=cpu_ok,
            cpu_hevc_reason=cpu_reason,
        )
        _cache[key] = caps
        return caps


def mark_nvenc_failed(device: str | torch.device, reason: str) -> Capabilities:
    """Record that NVENC failed in use on ``device``: from now on this process (and the peers it
    tells) treat it as failing, and ``auto`` picks the next best encoder."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    caps = probe(device)
    with _lock:
        caps = replace(caps, nvenc=False, nvenc_engines=0, nvenc_state="failing",
                       nvenc_reason=f"NVENC failed in use: {reason}"[:200])
        _cache[str(device)] = caps
        return caps


def forget_probes() -> None:
    """Drop every cached probe result (the next :func:`probe` of a device tries again)."""
    with _lock:
        _cache.clear()
