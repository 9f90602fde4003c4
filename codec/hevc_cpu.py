"""HEVC 4:4:4 on the CPU through PyAV: libx265 to encode, FFmpeg's decoder to decode.

For hosts without NVENC (every H100/H200/A100, and machines with no NVIDIA GPU) and for tests.
libx265 is slow (hundreds of ms per megapixel frame); it pays only on slow links. Its all-intra
Annex-B stream (VPS/SPS/PPS repeated, every frame an IDR) is what NVENC produces too, so NVDEC
decodes it and FFmpeg decodes NVENC's.
"""

from __future__ import annotations

import fractions
import threading
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from .errors import CodecError, CodecUnavailable

_X265_COMMON = "keyint=1:min-keyint=1:bframes=0:open-gop=0:repeat-headers=1:info=0:log-level=error"


def check_crc(data, crc: int, index: int) -> None:
    """Raise CodecError unless ``data`` has CRC-32 ``crc`` (damaged frames must not reach a decoder)."""
    if zlib.crc32(data) != crc:
        raise CodecError(f"frame {index} fails its CRC-32: the bitstream was damaged")


def _import_av():
    try:
        import av  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as exc:  # pragma: no cover - av is a declared dependency
        raise CodecUnavailable(f"PyAV is not installed ({exc}); the CPU HEVC path needs it") from exc
    return av


def x265_available() -> tuple[bool, str]:
    """Whether libx265 can encode here, and a one-line reason when it cannot."""
    try:
        av = _import_av()
        av.codec.Codec("libx265", "w")
        av.codec.Codec("hevc", "r")
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return False, f"libx265 through PyAV unavailable: {exc}"
    return True, "libx265 through PyAV"


class X265Encoder:
    """Encodes ``[F, 3H, W]`` uint8 frames into one Annex-B HEVC frame each.

    One libx265 context per (geometry, QP) is kept open and reused: with ``zerolatency`` every
    ``encode`` call returns its frame's packet at once, so no flush (which would end the stream)
    is needed between tensors.
    """

    name = "x265"

    def __init__(self, lossless_preset: str = "superfast", lossy_preset: str = "ultrafast") -> None:
        # Lossless needs superfast: ultrafast's reduced intra search makes lossless frames *larger*
        # than the raw codes (x1.09 vs x0.86 on the structured fixture); at constant QP ultrafast
        # is as small and faster.
        self._presets = (lossless_preset, lossy_preset)
        self._contexts: dict[tuple[int, int, int | None], tuple[threading.Lock, object, list[int]]] = {}
        self._lock = threading.Lock()

    def _context(self, width: int, height: int, qp: int | None):
        key = (width, height, qp)
        with self._lock:
            entry = self._contexts.get(key)
            if entry is None:
                av = _import_av()
                ctx = av.CodecContext.create("libx265", "w")
                ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv444p"
                ctx.time_base = fractions.Fraction(1, 30)
                rate = "lossless=1" if qp is None else f"qp={qp}"
                preset = self._presets[0] if qp is None else self._presets[1]
                ctx.options = {"x265-params": f"{rate}:{_X265_COMMON}", "preset": preset, "tune": "zerolatency"}
                entry = (threading.Lock(), ctx, [0])
                self._contexts[key] = entry
            return entry

    def encode(self, frames: torch.Tensor, qp: int | None) -> list[bytes]:
        av = _import_av()
        count, rows, width = frames.shape
        height = rows // 3
        planes = frames.cpu().numpy().reshape(count, 3, height, width)
        lock, ctx, pts = self._context(width, height, qp)
        out: list[bytes] = []
        with lock:
            for i in range(count):
                frame = av.VideoFrame.from_ndarray(planes[i], format="yuv444p")
                frame.pts = pts[0]
                pts[0] += 1
                packets = ctx.encode(frame)
                if len(packets) != 1:
                    raise CodecError(f"libx265 returned {len(packets)} packets for one frame; expected 1")
                out.append(bytes(packets[0]))
        return out


class _Done:
    """An already finished decode, with the same ``result()`` as a pending GPU one."""

    def __init__(self, out: torch.Tensor) -> None:
        self._out = out

    def result(self) -> torch.Tensor:
        return self._out

    def done(self) -> bool:
        return True


class FFmpegDecoder:
    """Decodes Annex-B HEVC 4:4:4 frames on the CPU into ``[F, 3H, W]`` uint8."""

    name = "ffmpeg"

    def submit(self, bitstreams: Sequence, width: int, height: int, crcs: Sequence[int] | None = None) -> _Done:
        if crcs is not None:
            for f, (data, crc) in enumerate(zip(bitstreams, crcs)):
                check_crc(data, crc, f)
        return _Done(self.decode(bitstreams, width, height, torch.device("cpu")))

    def decode(self, bitstreams: Sequence, width: int, height: int, device: torch.device) -> torch.Tensor:
        av = _import_av()
        ctx = av.CodecContext.create("hevc", "r")
        out = np.empty((len(bitstreams), 3 * height, width), dtype=np.uint8)
        decoded = 0

        def take(frames) -> None:
            nonlocal decoded
            for frame in frames:
                if decoded >= len(bitstreams):
                    raise CodecError("HEVC stream holds more frames than the header declares")
                if frame.width != width or frame.height != height or frame.format.name != "yuv444p":
                    raise CodecError(
                        f"HEVC frame is {frame.width}x{frame.height} {frame.format.name}; "
                        f"expected {width}x{height} yuv444p"
                    )
                out[decoded] = frame.to_ndarray(format="yuv444p").reshape(3 * height, width)
                decoded += 1

        try:
            for data in bitstreams:
                take(ctx.decode(av.Packet(bytes(data))))
            take(ctx.decode(None))
        except av.error.FFmpegError as exc:
            raise CodecError(f"HEVC bitstream is corrupt or truncated: {exc}") from exc
        if decoded != len(bitstreams):
            raise CodecError(f"HEVC stream decoded to {decoded} frames; the header declares {len(bitstreams)}")
        return torch.from_numpy(out).to(device)
