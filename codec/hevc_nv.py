"""HEVC 4:4:4 on NVIDIA video silicon through PyNvVideoCodec: NVENC to encode, NVDEC to decode.

PyNvVideoCodec is imported lazily: its import loads the driver's ``libnvidia-encode.so.1`` and fails
on machines without an NVIDIA driver (or in containers without the ``video`` capability). That is
a normal case reported by :func:`codec.probe` with a one-line reason, never a crash.

Sessions are expensive to open (hundreds of ms), so encoders and decoders are kept per frame
geometry and reused. Several sessions run in parallel threads to use several engines (an H200 has
seven NVDEC engines; a GeForce card two or three NVENC engines).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CodecError, CodecUnavailable
from .hevc_cpu import check_crc

log = logging.getLogger(__name__)

_PROBE_STREAM = Path(__file__).with_name("data") / "probe-444-144.hevc"
_PROBE_SIDE = 144

_nvc = None
_nvc_error: str | None = None
_nvc_lock = threading.Lock()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def import_nvc():
    """Import PyNvVideoCodec once; raise CodecUnavailable with a one-line reason if it cannot load."""
    global _nvc, _nvc_error
    with _nvc_lock:
        if _nvc is None and _nvc_error is None:
            # Its import logs a long troubleshooting text at ERROR when the driver is missing;
            # we report one line instead.
            quiet = logging.getLogger("PyNvVideoCodec")
            quiet.addHandler(logging.NullHandler())
            quiet.propagate = False
            try:
                import PyNvVideoCodec  # noqa: PLC0415

                _nvc = PyNvVideoCodec
            except Exception as exc:  # noqa: BLE001 - ImportError, RuntimeError, OSError...
                _nvc_error = f"PyNvVideoCodec cannot load: {_one_line(exc)}"
        if _nvc is None:
            raise CodecUnavailable(_nvc_error)
        return _nvc


def probe_pattern() -> np.ndarray:
    """The planes encoded in the probe stream (3 x 144 x 144 blocks of constant value)."""
    i = np.arange(_PROBE_SIDE)[:, None]
    j = np.arange(_PROBE_SIDE)[None, :]
    return np.stack(
        [(i // 16) * 16 + (j // 16), (j // 16) * 16 + (i // 16) + 64, ((i + j) // 16) * 8 + 128]
    ).astype(np.uint8)


def probe_stream() -> bytes:
    """A 144x144 lossless HEVC 4:4:4 IDR frame (made with libx265) used to prove a decoder works."""
    return _PROBE_STREAM.read_bytes()


@dataclass(frozen=True)
class NvCaps:
    nvenc: bool
    nvenc_reason: str
    nvenc_engines: int
    nvdec: bool
    nvdec_reason: str
    nvdec_engines: int


def _gpu_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _decoder_engines(nvc, gpu: int) -> int:
    try:
        chroma = next(getattr(nvc.cudaVideoChromaFormat, n) for n in dir(nvc.cudaVideoChromaFormat) if "444" in n)
        caps = nvc.GetDecoderCaps(gpu, nvc.cudaVideoCodec.HEVC, chroma, 8)
        return int(dict(caps).get("num_decoder_engines", 0)) or 1
    except Exception as exc:  # noqa: BLE001 - caps are advisory
        log.debug("GetDecoderCaps failed: %s", exc)
        return 1


def probe_nv(device: torch.device) -> NvCaps:
    """Establish NVENC/NVDEC support on ``device`` by opening a tiny encoder and decoding a frame."""
    try:
        nvc = import_nvc()
    except CodecUnavailable as exc:
        return NvCaps(False, str(exc), 0, False, str(exc), 0)
    gpu = _gpu_index(device)
    torch.cuda.init()
    try:
        enc = _open_encoder(nvc, gpu, 256, 256, qp=None)
        frame = torch.zeros((3 * 256, 256), dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        packets = list(enc.Encode(frame)) + list(enc.EndEncode())
        if not packets:
            raise CodecError("NVENC produced no packet for a test frame")
        caps = dict(nvc.GetEncoderCaps(gpuid=gpu, codec="hevc"))
        engines = int(caps.get("num_encoder_engines", 1)) or 1
        nvenc, nvenc_reason = True, f"NVENC HEVC 4:4:4 ({engines} engine{'s' if engines > 1 else ''})"
    except Exception as exc:  # noqa: BLE001 - PyNvVCException on GPUs without NVENC
        nvenc, nvenc_reason, engines = False, f"no NVENC on this GPU: {_one_line(exc)}", 0
    try:
        pool = NvDecoder(device, sessions=1)
        out = pool.decode([probe_stream()], _PROBE_SIDE, _PROBE_SIDE, device)
        if not np.array_equal(out[0].cpu().numpy().reshape(3, _PROBE_SIDE, _PROBE_SIDE), probe_pattern()):
            raise CodecError("NVDEC decoded the probe frame to wrong values")
        dec_engines = _decoder_engines(nvc, gpu)
        nvdec, nvdec_reason = True, f"NVDEC HEVC 4:4:4 ({dec_engines} engine{'s' if dec_engines > 1 else ''})"
    except Exception as exc:  # noqa: BLE001
        nvdec, nvdec_reason, dec_engines = False, f"NVDEC unusable: {_one_line(exc)}", 0
    return NvCaps(nvenc, nvenc_reason, engines, nvdec, nvdec_reason, dec_engines)


def _open_encoder(nvc, gpu: int, width: int, height: int, qp: int | None):
    options = {
        "gpu_id": gpu,
        "codec": "hevc",
        "preset": "P1",
        "gop": 1,
        "idrperiod": 1,
        "bf": 0,
        "repeatspspps": 1,
    }
    if qp is None:
        options["tuning_info"] = "lossless"
    else:
        options.update(tuning_info="ultra_low_latency", rc="constqp", constqp=qp)
    return nvc.CreateEncoder(width, height, "YUV444", False, **options)


class _SessionPool:
    """Open sessions per key (frame geometry), each used by one task at a time.

    Tasks run on a fixed-size thread pool, so at most that many sessions per key are ever opened.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, queue.SimpleQueue] = {}
        self._lock = threading.Lock()

    def acquire(self, key: tuple, make):
        with self._lock:
            free = self._free.setdefault(key, queue.SimpleQueue())
        try:
            return free.get_nowait()
        except queue.Empty:
            return make()

    def release(self, key: tuple, session) -> None:
        self._free[key].put(session)


class PendingFrames:
    """Frames being decoded on the session threads; :meth:`result` waits for them."""

    def __init__(self, out: torch.Tensor, futures: list) -> None:
        self._out = out
        self._futures = futures

    def done(self) -> bool:
        """True once every frame is decoded (or failed): :meth:`result` will not wait."""
        return all(future.done() for future in self._futures)

    def result(self) -> torch.Tensor:
        errors = []
        for future in self._futures:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - wait for all, report the first
                errors.append(exc)
        if errors:
            raise errors[0]
        return self._out


class NvEncoder:
    """NVENC HEVC 4:4:4 encoder: ``[F, 3H, W]`` uint8 CUDA frames -> one Annex-B IDR frame each."""

    name = "nvenc"

    def __init__(self, device: torch.device, sessions: int = 1) -> None:
        self._nvc = import_nvc()
        self._device = device
        self._gpu = _gpu_index(device)
        self._pool = _SessionPool()
        self._threads = ThreadPoolExecutor(max(1, sessions), thread_name_prefix="nvenc")

    def _encode_one(self, frame: torch.Tensor, qp: int | None) -> bytes:
        width, height = frame.shape[1], frame.shape[0] // 3
        key = (width, height, qp)
        enc = self._pool.acquire(key, lambda: _open_encoder(self._nvc, self._gpu, width, height, qp))
        ok = False
        try:
            packets = list(enc.Encode(frame))
            if not packets:
                packets = list(enc.EndEncode())
            if len(packets) != 1:
                raise CodecError(f"NVENC returned {len(packets)} packets for one all-intra frame")
            ok = True
            return bytes(packets[0]["data"])
        except CodecError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CodecError(f"NVENC could not encode a frame: {_one_line(exc)}") from exc
        finally:
            if ok:
                self._pool.release(key, enc)

    def encode(self, frames: torch.Tensor, qp: int | None) -> list[bytes]:
        frames = frames.to(self._device).contiguous()
        # NVENC reads the frames outside torch's stream order: finish the kernels that wrote them.
        torch.cuda.current_stream(frames.device).synchronize()
        futures = [self._threads.submit(self._encode_one, frames[i], qp) for i in range(frames.shape[0])]
        return [f.result() for f in futures]


class NvDecoder:
    """NVDEC HEVC 4:4:4 decoder into ``[F, 3H, W]`` uint8 CUDA tensors, several sessions in parallel."""

    name = "nvdec"

    def __init__(self, device: torch.device, sessions: int = 4) -> None:
        self._nvc = import_nvc()
        self._device = device
        self._gpu = _gpu_index(device)
        self._pool = _SessionPool()
        self._threads = ThreadPoolExecutor(max(1, sessions), thread_name_prefix="nvdec")

    def _open(self, width: int, height: int):
        nvc = self._nvc
        stream = torch.cuda.Stream(self._device)
        dec = nvc.CreateDecoder(
            gpuid=self._gpu,
            codec=nvc.cudaVideoCodec.HEVC,
            cudastream=stream.cuda_stream,
            usedevicememory=True,
            maxwidth=width,
            maxheight=height,
            latency=nvc.DisplayDecodeLatencyType.ZERO,
        )
        return dec, stream

    def _decode_one(self, bitstream, slot: torch.Tensor, crc: int | None, index: int) -> None:
        if crc is not None:
            check_crc(bitstream, crc, index)
        nvc = self._nvc
        width, height = slot.shape[1], slot.shape[0] // 3
        key = (width, height)
        dec, stream = self._pool.acquire(key, lambda: self._open(width, height))
        reusable = False
        try:
            data = np.frombuffer(bitstream, dtype=np.uint8)
            packet = nvc.PacketData()
            packet.bsl_data = data.ctypes.data
            packet.bsl = data.size
            packet.decode_flag = int(nvc.VideoPacketFlag.ENDOFPICTURE)
            frames = list(dec.Decode(packet))
            reusable = True
            if not frames:  # only if the session holds pictures back; the flush ends its stream
                frames = list(dec.Decode(nvc.PacketData()))
                reusable = False
            if len(frames) != 1:
                raise CodecError(f"NVDEC returned {len(frames)} pictures for one frame: truncated or corrupt stream")
            with torch.cuda.device(self._device), torch.cuda.stream(stream):
                view = torch.from_dlpack(frames[0])
                if tuple(view.shape) != tuple(slot.shape):
                    raise CodecError(
                        f"NVDEC picture has shape {tuple(view.shape)}; expected {tuple(slot.shape)} (HEVC 4:4:4 8-bit)"
                    )
                slot.copy_(view)  # NVDEC reuses its surfaces: copy out before the next Decode
            stream.synchronize()
        except CodecError:
            reusable = False
            raise
        except Exception as exc:  # noqa: BLE001 - PyNvVCException and friends
            reusable = False
            raise CodecError(f"NVDEC could not decode the HEVC stream: {_one_line(exc)}") from exc
        finally:
            if reusable:
                self._pool.release(key, (dec, stream))

    def submit(self, bitstreams: Sequence, width: int, height: int, crcs: Sequence[int] | None = None) -> PendingFrames:
        """Start decoding ``bitstreams`` (one frame each) on the session threads; each frame's CRC-32
        (when given) is checked on its thread before the frame reaches NVDEC."""
        out = torch.empty((len(bitstreams), 3 * height, width), dtype=torch.uint8, device=self._device)
        futures = [self._threads.submit(self._decode_one, b, out[i], None if crcs is None else crcs[i], i)
                   for i, b in enumerate(bitstreams)]
        return PendingFrames(out, futures)

    def decode(self, bitstreams: Sequence, width: int, height: int, device: torch.device) -> torch.Tensor:
        out = self.submit(bitstreams, width, height).result()
        return out if out.device == device else out.to(device)
