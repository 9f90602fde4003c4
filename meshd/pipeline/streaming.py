"""Moving tensors over a channel: the big stream chunk by chunk through the codec, small tensors raw.

The sender encodes chunk ``i + 1`` on a codec thread while chunk ``i`` is on the wire; the receiver
decodes each chunk as it lands. Both ends time their part; the per-hop figures come from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import codec
from codec import CodecError, CodecSpec

from ..errors import MeshError
from ..wire.connection import Channel, Request

#: Codec work (quantise, D2H/H2D copies, HEVC) runs here, off the event loop and off the GPU queue.
CODEC_THREADS = ThreadPoolExecutor(4, thread_name_prefix="codec")


def side_stream(device: torch.device):
    """A CUDA stream for one tensor's codec work, so its copies overlap the compute queue's kernels
    (None on the CPU). The tensor handed over is complete: the GPU worker synchronises every job."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def pack_raw(tensors: Sequence[torch.Tensor]) -> tuple[list[dict], list]:
    """Small tensors (modulation vectors, ids, predictions) as raw codec headers + buffers."""
    headers, buffers = [], []
    for t in tensors:
        enc = codec.encode(t.contiguous(), CodecSpec("raw", chunk_tokens=0))
        headers.append(enc.header.to_dict())
        buffers.extend(enc.buffers)
    return headers, buffers


def unpack_raw(headers: object, buffers: Sequence, device: torch.device, shapes: Sequence | None = None) -> list[torch.Tensor]:
    """Inverse of :func:`pack_raw`, validating each header (and shape, when ``shapes`` is given)."""
    if not isinstance(headers, list) or len(headers) != len(buffers):
        raise MeshError("bad-request", f"{len(buffers)} tensor buffers do not match their headers")
    out = []
    for i, (header, buf) in enumerate(zip(headers, buffers)):
        try:
            parsed = codec.Header.from_dict(header)
            if parsed.codec != "raw" or len(parsed.chunks) != 1:
                raise CodecError("small tensors travel raw, in one chunk")
            expect = None if shapes is None or shapes[i] is None else shapes[i]
            out.append(codec.decode(codec.Encoded(parsed, [buf]), device, expect_shape=expect))
        except CodecError as exc:
            raise MeshError("codec", f"tensor {i}: {exc}") from None
    return out


@dataclass
class SendStats:
    codec: str = "raw"
    raw_bytes: int = 0
    wire_bytes: int = 0
    encode_ms: float = 0.0
    error: dict | None = None
    chunks: int = 0
    encoder_note: str | None = None  # why the encoder changed mid-stream (NVENC failed: libx265 took over)

    def to_dict(self) -> dict:
        out = {"codec": self.codec, "raw_bytes": self.raw_bytes, "bytes": self.wire_bytes,
               "encode_ms": round(self.encode_ms, 3), "chunks": self.chunks}
        if self.error is not None:
            out["error"] = self.error
        if self.encoder_note is not None:
            out["encoder_note"] = self.encoder_note
        return out


@dataclass
class ReceiveStats:
    wire_ms: float = 0.0
    decode_ms: float = 0.0
    bytes: int = 0
    codec: str = ""


async def send_stream(channel: Channel, op: str, fields: dict, segments: list, tensor: torch.Tensor,
                      spec: CodecSpec, *, measure_error: bool = False, timeout: float | None = None):
    """Send ``tensor`` as a chunked codec stream after a request; returns (reply frame, SendStats)."""
    loop = asyncio.get_running_loop()
    header, chunk_iter = codec.encode_chunks(tensor, spec)
    stats = SendStats(codec=header.label, raw_bytes=header.raw_bytes, chunks=len(header.chunks))
    queue: asyncio.Queue = asyncio.Queue()
    produced: list = []
    stream = side_stream(tensor.device)

    def produce() -> float:
        t0 = time.perf_counter()
        try:
            with on_stream(stream):
                for chunk in chunk_iter:
                    if measure_error:
                        produced.append(chunk)
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except BaseException as exc:  # noqa: BLE001 - surfaced to the sender below
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        return time.perf_counter() - t0

    async def chunks():
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise MeshError("codec", f"encoding the stream failed: {item}") from item
            stats.wire_bytes += sum(memoryview(b).nbytes for b in item.buffers)
            if item.note is not None:
                stats.encoder_note = item.note
            yield item.index, item.buffers

    producer = loop.run_in_executor(CODEC_THREADS, produce)
    request_fields = {**fields, "stream": header.to_dict(), "chunks": len(header.chunks)}
    try:
        reply = await channel.request(op, request_fields, segments, chunks=chunks(), timeout=timeout)
    finally:
        stats.encode_ms = (await producer) * 1e3
    if measure_error and header.codec != "raw":
        stats.error = await loop.run_in_executor(CODEC_THREADS, _measure, tensor, header, produced, stream)
    return reply, stats


@dataclass(frozen=True)
class LinkPlan:
    """How a stage's output reaches the next stage: the codec over TCP, or CUDA IPC on one host."""

    transport: str  # "tcp" or "cuda-ipc"
    spec: CodecSpec | None  # the codec, for tcp
    info: dict  # what the plan shows: bandwidth, why this codec, ...
    receiver: codec.Capabilities | None = None  # the next stage's, for tcp: which engine decodes there
    #: chooses the link again (the same peer, geometry and policy) with this box's capabilities now
    replan: Callable[[], Awaitable[LinkPlan]] | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return "cuda-ipc" if self.transport == "cuda-ipc" else self.spec.label


async def link_after(link: LinkPlan, sent: SendStats) -> LinkPlan:
    """The link for the next step: chosen again once the encoder failed over (NVENC failed, so
    libx265 encoded the rest of this tensor), since without NVENC another codec may serve it better."""
    if sent.encoder_note is None or link.replan is None:
        return link
    return await link.replan()


async def send_activation(channel: Channel, fields: dict, segments: list, tensor: torch.Tensor, link: LinkPlan,
                          *, measure_error: bool = False):
    """Send a stage's output to the next stage the way ``link`` says; returns (reply, SendStats)."""
    if link.transport != "cuda-ipc":
        return await send_stream(channel, "forward", fields, segments, tensor, link.spec,
                                 measure_error=measure_error, timeout=None)
    from ..wire import ipc  # noqa: PLC0415

    t0 = time.perf_counter()
    tensor = tensor.contiguous()  # the receiver maps dense tensors only (ipc._check_extent)
    desc = ipc.export(tensor)
    stats = SendStats(codec="cuda-ipc", raw_bytes=tensor.numel() * tensor.element_size(),
                      encode_ms=(time.perf_counter() - t0) * 1e3)
    # ``tensor`` stays referenced until the reply: the receiver maps its memory meanwhile.
    reply = await channel.request("forward", {**fields, "ipc": desc}, segments, timeout=None)
    del tensor
    ipc.collect()
    return reply, stats


async def receive_activation(request: Request, device: torch.device, expect_shape: Sequence[int],
                             expect_dtype: torch.dtype) -> tuple[torch.Tensor, ReceiveStats]:
    """The stage input that came with ``request``: mapped over CUDA IPC or decoded from its stream."""
    if "ipc" not in request.header:
        return await receive_stream(request, device, expect_shape, expect_dtype)
    if request.announced_chunks:
        raise MeshError("bad-request", "a forward carries its input either over CUDA IPC or as a chunk stream, not both")
    if device.type != "cuda":
        raise MeshError("bad-request", "CUDA IPC input sent to a CPU stage")
    from ..wire import ipc  # noqa: PLC0415  (whether this connection may send it: Daemon._forward)

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    tensor = await loop.run_in_executor(CODEC_THREADS, ipc.import_copy, request.header["ipc"], device,
                                        expect_shape, expect_dtype)
    return tensor, ReceiveStats(wire_ms=(time.perf_counter() - t0) * 1e3, codec="cuda-ipc")


def _measure(tensor: torch.Tensor, header: codec.Header, chunks: list, stream) -> dict:
    with on_stream(stream):
        decoder = codec.ChunkDecoder(header, tensor.device)
        for chunk in chunks:
            decoder.feed(chunk.index, chunk.buffers)
        return codec.reconstruction_error(tensor, decoder.result()).to_dict()


async def receive_stream(request: Request, device: torch.device, expect_shape: Sequence[int],
                         expect_dtype: torch.dtype) -> tuple[torch.Tensor, ReceiveStats]:
    """Decode the chunked stream that follows ``request`` into a tensor on ``device``.

    ``wire_ms`` is the time the chunk frames spent arriving (first byte to last byte of each, summed):
    the link's share, without the sender's encoding gaps.
    """
    loop = asyncio.get_running_loop()
    count = request.announced_chunks  # validated: an int within MAX_STREAM_CHUNKS, else 0
    try:
        decoder = codec.ChunkDecoder(request.header.get("stream"), device, expect_shape=expect_shape)
    except CodecError as exc:
        raise MeshError("codec", f"stream header: {exc}") from None
    if decoder.header.torch_dtype != expect_dtype:
        raise MeshError("mismatch", f"stream is {decoder.header.dtype}; this stage computes in {expect_dtype}")
    if count != len(decoder.header.chunks):
        raise MeshError("bad-request", f"request announces {count!r} chunks; the stream header has "
                                       f"{len(decoder.header.chunks)}")
    stats = ReceiveStats(codec=decoder.header.label)
    decode_s = 0.0
    wire_s = 0.0
    stream = side_stream(device)

    def feed(index: int, buffers: list) -> float:
        t0 = time.perf_counter()
        with on_stream(stream):
            decoder.feed(index, buffers)
        return time.perf_counter() - t0

    def finish() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with on_stream(stream):
            out = decoder.result()  # synchronises its stream: the tensor is complete for the compute queue
        return out, time.perf_counter() - t0

    try:
        async for frame in request.chunks(count):
            stats.bytes += frame.payload_bytes
            wire_s += frame.finished_at - frame.started_at
            decode_s += await loop.run_in_executor(CODEC_THREADS, feed, frame.header.get("index"), frame.segments)
        tensor, finish_s = await loop.run_in_executor(CODEC_THREADS, finish)
    except CodecError as exc:
        raise MeshError("codec", f"stream: {exc}") from None
    stats.wire_ms = wire_s * 1e3
    stats.decode_ms = (decode_s + finish_s) * 1e3
    return tensor, stats
