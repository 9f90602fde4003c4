"""encode / decode, whole tensors or chunk by chunk.

A tensor ``[..., tokens, channels]`` is viewed as ``[N, C]`` (N = all leading dims) and cut along
the tokens into chunks. Each chunk is encoded on its own, so a caller can send chunk ``i`` while
chunk ``i + 1`` encodes and the receiver decodes chunk ``i - 1``.

Buffers per chunk:

====== ===============================================================
raw    the tensor bytes
fp8    float32 scale per channel; fp8 e4m3 codes ``[count, C]``
u8     float32 (low, step) per channel; uint8 codes ``[count, C]``
hevc   float32 (low, step) per channel + (uint32 byte length, uint32 CRC-32)
       per frame; then one Annex-B HEVC 4:4:4 IDR frame per buffer
====== ===============================================================

All multi-byte values are little-endian.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import frames as framing
from .errors import CodecError, CodecUnavailable
from .header import ChunkInfo, Header, dtype_name
from .limits import FRAME_SLACK_BYTES, MAX_CHUNKS, MAX_DIM, MAX_ELEMENTS, MAX_FRAME_EXPANSION
from .metrics import ReconError, reconstruction_error
from . import hevc_nv
from .probe import forget_probes, mark_nvenc_failed, probe
from .quant import fp8_dequantize, fp8_quantize, u8_dequantize, u8_quantize
from .spec import CodecSpec, TokenLayout

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("codec assumes a little-endian host")


@dataclass
class Encoded:
    """A header plus the buffers of all chunks, in order."""

    header: Header
    buffers: list
    error: ReconError | None = None
    encode_ms: float = 0.0

    @property
    def nbytes(self) -> int:
        """Payload bytes (the buffers; the header adds a few hundred bytes)."""
        return sum(memoryview(b).nbytes for b in self.buffers)

    @property
    def ratio(self) -> float:
        """Raw tensor size over payload size."""
        return self.header.raw_bytes / max(1, self.nbytes)

    @classmethod
    def from_wire(cls, header: dict, buffers: Sequence) -> Encoded:
        """Validate a received header and its buffer list (sizes are checked again on decode)."""
        parsed = Header.from_dict(header)
        if len(buffers) != parsed.buffer_count:
            raise CodecError(f"header declares {parsed.buffer_count} buffers; {len(buffers)} arrived")
        return cls(parsed, list(buffers))


@dataclass(frozen=True)
class EncodedChunk:
    index: int
    buffers: list
    note: str | None = None  # set on the chunk where the encoder changed (NVENC failed, libx265 took over)


# --- chunk planning ---------------------------------------------------------------------------


def plan_chunks(shape: Sequence[int], spec: CodecSpec) -> list[tuple[int, int, tuple[int, int] | None]]:
    """Cut ``N`` tokens into ``(start, count, grid)`` chunks; ``grid`` is (rows, cols) or None."""
    if len(shape) < 1:
        raise CodecError("cannot encode a 0-d tensor")
    tokens = math.prod(shape[:-1])
    step = spec.chunk_tokens or max(tokens, 1)
    layout = spec.layout
    out: list[tuple[int, int, tuple[int, int] | None]] = []
    if layout is None:
        for start in range(0, tokens, step):
            out.append((start, min(step, tokens - start), None))
    else:
        per_item = layout.tokens_per_item
        if tokens % per_item:
            raise CodecError(
                f"{tokens} tokens do not split into items of {layout.prefix} + "
                f"{layout.height}x{layout.width} tokens"
            )
        rows_per_chunk = max(1, step // layout.width)
        for item in range(tokens // per_item):
            base = item * per_item
            for start in range(0, layout.prefix, step):
                out.append((base + start, min(step, layout.prefix - start), None))
            for row in range(0, layout.height, rows_per_chunk):
                rows = min(rows_per_chunk, layout.height - row)
                out.append((base + layout.prefix + row * layout.width, rows * layout.width, (rows, layout.width)))
    if len(out) > MAX_CHUNKS:
        raise CodecError(f"{len(out)} chunks exceed the limit of {MAX_CHUNKS}; raise chunk_tokens")
    return out


def _check_tensor(tensor: torch.Tensor, spec: CodecSpec) -> str:
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    name = dtype_name(tensor.dtype)
    if spec.name != "raw" and not tensor.dtype.is_floating_point:
        raise CodecError(f"codec {spec.name} encodes floating-point tensors, not {name}")
    if tensor.ndim < 1 or tensor.numel() == 0:
        raise CodecError(f"cannot encode a tensor of shape {tuple(tensor.shape)}")
    if tensor.numel() > MAX_ELEMENTS or max(tensor.shape) > MAX_DIM:
        raise CodecError(f"tensor of shape {tuple(tensor.shape)} exceeds the codec's size limits")
    return name


# --- backends ---------------------------------------------------------------------------------

_backends_lock = threading.Lock()
_encoders: dict[tuple[str, str], object] = {}
_decoders: dict[str, object] = {}


def hevc_encoder(device: torch.device, choice: str = "auto"):
    """The HEVC encoder for tensors on ``device``: NVENC where it works, else libx265.

    ``auto`` NVENC falls back to libx265 for good if NVENC fails in use (:class:`FallbackEncoder`).
    """
    caps = probe(device)
    auto = choice == "auto"  # only a choice left to us may fall back; a forced "nvenc" fails instead
    if auto:
        choice = caps.hevc_encoder or "x265"
    if choice == "nvenc" and not caps.nvenc:
        raise CodecUnavailable(f"NVENC was asked for but is unavailable: {caps.nvenc_reason}")
    if choice == "x265" and not caps.cpu_hevc:
        raise CodecUnavailable(f"libx265 was asked for but is unavailable: {caps.cpu_hevc_reason}")
    key = (choice, str(device) if choice == "nvenc" else "cpu")
    with _backends_lock:
        if key not in _encoders:
            if choice == "nvenc":
                from .hevc_nv import NvEncoder  # noqa: PLC0415

                sessions = min(max(1, caps.nvenc_engines), hevc_nv.SESSIONS.limit)
                _encoders[key] = NvEncoder(device, sessions=sessions)
            else:
                from .hevc_cpu import X265Encoder  # noqa: PLC0415

                _encoders[key] = X265Encoder()
        encoder = _encoders[key]
    if auto and choice == "nvenc" and caps.cpu_hevc:
        return FallbackEncoder(encoder, device)
    return encoder


class FallbackEncoder:
    """NVENC that hands over to libx265 when it fails: the frame goes out anyway.

    Both write the same all-intra Annex-B stream, so the receiver decodes frames of either kind in
    one tensor. The failure is recorded for the process (:func:`codec.probe.mark_nvenc_failed`):
    later ``auto`` encodes on this device go to libx265 directly. ``note`` says why, for the hop record.
    """

    name = "nvenc"

    def __init__(self, nvenc, device: torch.device) -> None:
        self.nvenc = nvenc
        self.device = device
        self.note: str | None = None

    def encode(self, frames: torch.Tensor, qp: int | None) -> list[bytes]:
        if self.note is None:
            try:
                return self.nvenc.encode(frames, qp)
            except CodecError as exc:
                self.note = f"NVENC failed ({exc}); libx265 encodes from here on"
                retire_nvenc(self.device, str(exc))
        return hevc_encoder(self.device, "x265").encode(frames, qp)


def retire_nvenc(device: torch.device, reason: str) -> None:
    """Stop using NVENC on ``device``'s GPU in this process: mark it failing and close its sessions,
    those of the host-input encoder too when that feeds the same GPU's NVENC (frames of the CPU)."""
    mark_nvenc_failed(device, reason)
    gpu = hevc_nv.gpu_of(torch.device(device))
    with _backends_lock:
        keys = [k for k, e in _encoders.items() if k[0] == "nvenc" and e.gpu == gpu]
        retired = [(k[1], _encoders.pop(k)) for k in keys]
    for name, encoder in retired:
        if name != str(device):
            mark_nvenc_failed(name, reason)
        encoder.close()


def reset_backends() -> None:
    """Close every encoder and decoder of this process and forget what was probed (re-probe next)."""
    with _backends_lock:
        encoders = list(_encoders.values())
        _encoders.clear()
        _decoders.clear()
    for encoder in encoders:
        close = getattr(encoder, "close", None)
        if close is not None:
            close()
    hevc_nv.SESSIONS.close_idle()
    forget_probes()
    hevc_nv.reset_import()


def set_nvenc_session_budget(sessions: int) -> None:
    """At most ``sessions`` NVENC sessions per GPU in this process (a GeForce system has 8 in all)."""
    if not isinstance(sessions, int) or isinstance(sessions, bool) or not 1 <= sessions <= 8:
        raise CodecError(f"NVENC session budget {sessions!r} must be 1-8 (a GeForce system allows 8 in all)")
    hevc_nv.SESSIONS.set_limit(sessions)


class ReplayCache:
    """Benchmark aid for GPUs without NVENC: keeps the HEVC frames an encoder produced, keyed by the
    frames' content, and returns them when the same frames are encoded again.

    A deterministic benchmark run twice thus measures its second run with HEVC "encoded ahead of
    time" by libx265 (encode cost: tiling and a checksum). Never enable it in production.
    """

    name = "x265"  # what produced the frames

    def __init__(self, inner, max_bytes: int) -> None:
        self.inner = inner
        self.max_bytes = max_bytes
        self._frames: dict[tuple, list[bytes]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def _key(frames: torch.Tensor, qp: int | None) -> tuple:
        flat = frames.reshape(-1)
        pad = (-flat.numel()) % 8
        words = torch.nn.functional.pad(flat, (0, pad)).view(torch.int64)
        weights = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64)
        return (tuple(frames.shape), qp, int(words.sum()), int((words * weights).sum()))

    def encode(self, frames: torch.Tensor, qp: int | None) -> list[bytes]:
        key = self._key(frames, qp)
        with self._lock:
            hit = self._frames.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        out = self.inner.encode(frames, qp)
        size = sum(len(b) for b in out)
        with self._lock:
            if self._bytes + size <= self.max_bytes:
                self._frames[key] = out
                self._bytes += size
        return out


def enable_hevc_replay(max_bytes: int) -> None:
    """Wrap this process's libx265 encoder in a :class:`ReplayCache` (benchmarks only)."""
    from .hevc_cpu import X265Encoder  # noqa: PLC0415

    with _backends_lock:
        _encoders[("x265", "cpu")] = ReplayCache(X265Encoder(), max_bytes)


def hevc_decoder(device: torch.device):
    """The HEVC decoder for ``device``: NVDEC (several sessions) on a GPU that has it, else FFmpeg."""
    caps = probe(device)
    key = str(device) if caps.nvdec else "cpu"
    with _backends_lock:
        if key not in _decoders:
            if caps.nvdec:
                from .hevc_nv import NvDecoder  # noqa: PLC0415

                _decoders[key] = NvDecoder(device, sessions=min(8, max(2, caps.nvdec_engines)))
            elif caps.cpu_hevc:
                from .hevc_cpu import FFmpegDecoder  # noqa: PLC0415

                _decoders[key] = FFmpegDecoder()
            else:
                raise CodecUnavailable(f"no HEVC decoder here: {caps.nvdec_reason}; {caps.cpu_hevc_reason}")
        return _decoders[key]


# --- encode -----------------------------------------------------------------------------------


def host_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in host memory (no copy on CPU; a device-to-host copy for GPU tensors).

    Pageable memory on purpose: pinned blocks from torch's caching host allocator crashed the
    daemons on the H200 VM (cudaErrorInvalidResourceHandle when blocks freed on I/O threads were
    recycled), and the synchronous copy costs ~3 ms per 36 MiB there. The fast path for raw streams
    over TCP copies into memory the link pins and owns itself instead (meshd.wire.staging); this is what
    it falls back to, and what every other codec's (small) buffers use.
    """
    flat = t.contiguous().view(torch.uint8).reshape(-1)
    return memoryview(flat.cpu().numpy())


def encode_chunks(tensor: torch.Tensor, spec: CodecSpec) -> tuple[Header, Iterator[EncodedChunk]]:
    """Plan the chunks and return the header now and the encoded chunks lazily, in order.

    Buffers of a CPU tensor's ``raw`` chunks alias the tensor's memory: do not modify the tensor
    until they are sent.
    """
    name = _check_tensor(tensor, spec)
    channels = tensor.shape[-1]
    plan = plan_chunks(tensor.shape, spec)
    encoder = None
    chunks = []
    for start, count, grid in plan:
        geometry = framing.plan_geometry(count, channels, grid) if spec.name == "hevc" else None
        chunks.append(ChunkInfo(start, count, geometry))
    if spec.name == "hevc":
        encoder = hevc_encoder(tensor.device, spec.encoder)
    header = Header(
        codec=spec.name,
        dtype=name,
        shape=tuple(tensor.shape),
        chunks=tuple(chunks),
        qp=spec.qp,
        encoder=encoder.name if encoder is not None else None,
    )
    flat = tensor.detach().reshape(-1, channels)

    def generate() -> Iterator[EncodedChunk]:
        noted = None
        for index, info in enumerate(header.chunks):
            buffers = _encode_chunk(flat[info.start : info.start + info.count], header, info, encoder)
            note = getattr(encoder, "note", None)
            yield EncodedChunk(index, buffers, note if note != noted else None)
            noted = note

    return header, generate()


def _encode_chunk(x: torch.Tensor, header: Header, info: ChunkInfo, encoder) -> list:
    codec = header.codec
    if codec == "raw":
        return [host_bytes(x)]
    if codec == "fp8":
        codes, scale = fp8_quantize(x)
        return [host_bytes(scale), host_bytes(codes)]
    codes, params = u8_quantize(x)
    if codec == "u8":
        return [host_bytes(params), host_bytes(codes)]
    frames = framing.tile(codes, info.geometry)
    bitstreams = encoder.encode(frames, header.qp)
    # Lengths and CRCs catch a frame cut short or damaged on the way: decoders conceal such damage
    # silently instead of failing.
    table = np.array([(len(b), zlib.crc32(b)) for b in bitstreams], dtype="<u4")
    return [bytes(host_bytes(params)) + table.tobytes(), *bitstreams]


def encode(tensor: torch.Tensor, spec: CodecSpec | str, *, measure: bool = False) -> Encoded:
    """Encode a whole tensor. With ``measure``, decode it again here and report the error."""
    if isinstance(spec, str):
        spec = CodecSpec.parse(spec)
    t0 = time.perf_counter()
    header, chunks = encode_chunks(tensor, spec)
    buffers = [b for chunk in chunks for b in chunk.buffers]
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
    encoded = Encoded(header, buffers, encode_ms=(time.perf_counter() - t0) * 1e3)
    if measure:
        encoded.error = reconstruction_error(tensor, decode(encoded, tensor.device))
    return encoded


# --- decode -----------------------------------------------------------------------------------


def _host_view(buffer, dtype: torch.dtype) -> torch.Tensor:
    """Zero-copy tensor over a received buffer (never written to)."""
    view = memoryview(buffer)
    if not view.contiguous:
        raise CodecError("codec buffers must be contiguous")
    if view.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: we only read
        return torch.frombuffer(view.cast("B"), dtype=dtype)


class ChunkDecoder:
    """Decodes chunks as they arrive, into one tensor allocated up front.

    ``feed`` each chunk's buffers (any order, each once); ``result`` returns the tensor once all
    have arrived. HEVC chunks decode asynchronously on the decoder sessions.
    """

    def __init__(self, header: Header | dict, device: str | torch.device = "cpu", *,
                 expect_shape: Sequence[int] | None = None) -> None:
        self.header = header if isinstance(header, Header) else Header.from_dict(header)
        self.device = torch.device(device)
        h = self.header
        if expect_shape is not None and tuple(h.shape) != tuple(expect_shape):
            raise CodecError(f"tensor of shape {list(h.shape)} arrived; expected {list(expect_shape)}")
        self._out = torch.empty((h.tokens, h.channels), dtype=h.torch_dtype, device=self.device)
        self._done = [False] * len(h.chunks)
        self._pending: list[tuple[ChunkInfo, torch.Tensor, object]] = []
        self._keep: list = []  # received buffers stay alive until their async copies to the GPU finish
        self._async = self.device.type == "cuda"
        self._decoder = hevc_decoder(self.device) if h.codec == "hevc" else None

    def feed(self, index: int, buffers: Sequence) -> None:
        h = self.header
        if not isinstance(index, int) or not 0 <= index < len(h.chunks):
            raise CodecError(f"chunk index {index!r} is outside 0..{len(h.chunks) - 1}")
        if self._done[index]:
            raise CodecError(f"chunk {index} arrived twice")
        expected = h.buffers_per_chunk(index)
        if len(buffers) != expected:
            raise CodecError(f"chunk {index} of codec {h.codec} needs {expected} buffers, got {len(buffers)}")
        info = h.chunks[index]
        count, channels = info.count, h.channels
        sizes = [memoryview(b).nbytes for b in buffers]
        out = self._out[info.start : info.start + count]
        if h.codec == "raw":
            self._expect(index, sizes[0], count * channels * h.itemsize, "tensor data")
            data = _host_view(buffers[0], torch.uint8).view(h.torch_dtype).view(count, channels)
            out.copy_(data, non_blocking=self._pinned(data))
        elif h.codec in ("fp8", "u8"):
            self._expect(index, sizes[0], h.params_bytes(index), "channel parameters")
            self._expect(index, sizes[1], count * channels, "codes")
            params = self._to_device(_host_view(buffers[0], torch.float32))
            codes = self._to_device(_host_view(buffers[1], torch.uint8).view(count, channels))
            if h.codec == "fp8":
                out.copy_(fp8_dequantize(codes, params, h.torch_dtype))
            else:
                out.copy_(u8_dequantize(codes, params.view(2, channels), h.torch_dtype))
        else:
            g = info.geometry
            self._expect(index, sizes[0], h.params_bytes(index), "channel parameters and frame table")
            params_bytes = _host_view(buffers[0], torch.uint8)
            params = self._to_device(params_bytes[: 8 * channels].view(torch.float32).view(2, channels))
            table = np.frombuffer(memoryview(buffers[0])[8 * channels :], dtype="<u4").reshape(-1, 2)
            bound = int(g.frame_bytes * MAX_FRAME_EXPANSION) + FRAME_SLACK_BYTES
            for f, (declared, actual) in enumerate(zip(table[:, 0].tolist(), sizes[1:])):
                if declared != actual:
                    raise CodecError(
                        f"chunk {index} frame {f} is {actual} bytes but was encoded as {declared}: truncated stream"
                    )
                if not 0 < actual <= bound:
                    raise CodecError(f"chunk {index} frame {f} of {actual} bytes is outside 1..{bound}")
            # The decoder checks each frame's CRC-32 before decoding it (on its own threads).
            pending = self._decoder.submit(list(buffers[1:]), g.width, g.height, crcs=table[:, 1].tolist())
            self._pending.append((info, params, pending))
            # Put away the chunks whose frames are decoded already, so that after the last chunk only
            # its own frames are left to untile and dequantise (not the whole tensor's).
            self._finish_chunks(wait=False)
        self._done[index] = True
        if self._async:
            self._keep.append(buffers)

    def _pinned(self, host: torch.Tensor) -> bool:
        return self._async and host.is_pinned()

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy to the device; asynchronously from pinned buffers (``result`` synchronises)."""
        if self.device.type == "cpu":
            return host
        return host.to(self.device, non_blocking=self._pinned(host))

    def _finish_chunks(self, wait: bool) -> None:
        """Untile and dequantise the HEVC chunks whose frames are decoded (all of them if ``wait``)."""
        h, left = self.header, []
        for info, params, frames in self._pending:
            if not wait and not frames.done():
                left.append((info, params, frames))
                continue
            decoded = frames.result().to(self.device)
            codes = framing.untile(decoded, info.geometry, info.count, h.channels)
            self._out[info.start : info.start + info.count].copy_(u8_dequantize(codes, params, h.torch_dtype))
        self._pending = left

    @staticmethod
    def _expect(index: int, actual: int, expected: int, what: str) -> None:
        if actual != expected:
            raise CodecError(f"chunk {index} {what} is {actual} bytes; the header implies {expected}")

    @property
    def complete(self) -> bool:
        return all(self._done)

    def result(self) -> torch.Tensor:
        missing = [i for i, done in enumerate(self._done) if not done]
        if missing:
            raise CodecError(f"chunks {missing[:8]} never arrived")
        self._finish_chunks(wait=True)
        if self._async:
            torch.cuda.current_stream(self.device).synchronize()
            self._keep.clear()
        return self._out.view(self.header.shape)


def decode(encoded: Encoded, device: str | torch.device = "cpu", *,
           expect_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Decode a whole tensor onto ``device`` (optionally refusing any shape but ``expect_shape``)."""
    h = encoded.header if isinstance(encoded.header, Header) else Header.from_dict(encoded.header)
    if len(encoded.buffers) != h.buffer_count:
        raise CodecError(f"header declares {h.buffer_count} buffers; {len(encoded.buffers)} were given")
    if h.codec != "hevc":  # sizes are fixed by the header: check them before allocating the output
        declared = sum(memoryview(b).nbytes for b in encoded.buffers)
        expected = sum(h.params_bytes(i) if h.codec != "raw" else 0 for i in range(len(h.chunks)))
        expected += h.tokens * h.channels * (h.itemsize if h.codec == "raw" else 1)
        if declared != expected:
            raise CodecError(f"buffers hold {declared} bytes; the header implies {expected}")
    decoder = ChunkDecoder(h, device, expect_shape=expect_shape)
    pos = 0
    for index in range(len(h.chunks)):
        n = h.buffers_per_chunk(index)
        decoder.feed(index, encoded.buffers[pos : pos + n])
        pos += n
    return decoder.result()


__all__ = [
    "ChunkDecoder",
    "Encoded",
    "EncodedChunk",
    "TokenLayout",
    "decode",
    "encode",
    "encode_chunks",
    "plan_chunks",
]
