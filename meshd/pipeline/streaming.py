"""Moving tensors over a channel: the big stream chunk by chunk through the codec, small tensors raw.

The sender encodes chunk ``i + 1`` on a codec thread while chunk ``i`` is on the wire; the receiver
decodes each chunk as it lands. Both ends time their part; the per-hop figures come from here.

A raw CUDA stream over TCP goes through the link's pinned staging (:mod:`meshd.wire.staging`): every
chunk's device-to-host copy is issued at once on a side stream, an event after each, and chunk ``i``
is sealed and written as soon as its event fires while the copies after it still run; the receiver
reads each chunk into pinned memory and issues its host-to-device copy while the next arrives. The
bytes are the same as through pageable memory, so raw stays bit-exact; only the copies got cheaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

import codec
from codec import CodecError, CodecSpec
from codec.core import host_bytes
from codec.header import dtype_name

from .. import limits
from ..errors import MeshError
from ..fields import wire_int
from ..wire.bulk import SendTiming
from ..wire.channel import Channel, Request
from ..wire.staging import PinnedArena

log = logging.getLogger(__name__)

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


def raw_header(tensor: torch.Tensor) -> dict:
    """The header :func:`pack_raw` gives ``tensor``, without copying its bytes anywhere (a prediction
    that goes back through a shared region)."""
    header, _ = codec.encode_chunks(tensor, CodecSpec("raw", chunk_tokens=0))
    return header.to_dict()


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
    #: Where a TCP hop's sending time went (None on CUDA IPC): the device-to-host copies as the GPU
    #: timed them (raw CUDA streams only), sealing, and socket writes, on the threads that did them.
    d2h_ms: float | None = None
    seal_ms: float | None = None
    send_ms: float | None = None
    staged: bool = False  # the stream left through the link's pinned staging

    def to_dict(self) -> dict:
        out = {"codec": self.codec, "raw_bytes": self.raw_bytes, "bytes": self.wire_bytes,
               "encode_ms": round(self.encode_ms, 3), "chunks": self.chunks}
        if self.error is not None:
            out["error"] = self.error
        if self.encoder_note is not None:
            out["encoder_note"] = self.encoder_note
        if self.seal_ms is not None:
            out.update(d2h_ms=_ms(self.d2h_ms), seal_ms=_ms(self.seal_ms), send_ms=_ms(self.send_ms),
                       staged_send=self.staged)
        elif self.d2h_ms is not None:  # host-shm: the copy into the shared region is the whole send
            out.update(d2h_ms=_ms(self.d2h_ms), staged_send=self.staged)
        return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class ReceiveStats:
    wire_ms: float = 0.0
    decode_ms: float = 0.0
    bytes: int = 0
    codec: str = ""
    #: Where a TCP hop's receiving time went (None on CUDA IPC): socket reads, opening records, and the
    #: host-to-device copies as the GPU timed them (raw streams to a CUDA device only).
    recv_ms: float | None = None
    open_ms: float | None = None
    h2d_ms: float | None = None
    staged: bool = False  # the chunks landed in the link's pinned staging (host-shm: the region is pinned)
    transport: str = "tcp"  # or "cuda-ipc", "host-shm"
    ahead: bool = False  # host-shm: the forward came before its stream, which its sender rang for

    def breakdown(self) -> dict:
        """The receiving half of a hop's time breakdown, for its hop record (empty on CUDA IPC)."""
        if self.transport == "host-shm":
            return {"transport": "host-shm", "h2d_ms": _ms(self.h2d_ms), "staged_recv": self.staged,
                    "ahead": self.ahead}
        if self.recv_ms is None:
            return {}
        return {"recv_ms": _ms(self.recv_ms), "open_ms": _ms(self.open_ms), "h2d_ms": _ms(self.h2d_ms),
                "staged_recv": self.staged}


async def send_stream(channel: Channel, op: str, fields: dict, segments: list, tensor: torch.Tensor,
                      spec: CodecSpec, *, measure_error: bool = False, timeout: float | None = None):
    """Send ``tensor`` as a chunked codec stream after a request; returns (reply frame, SendStats)."""
    loop = asyncio.get_running_loop()
    header, chunk_iter = codec.encode_chunks(tensor, spec)
    stats = SendStats(codec=header.label, raw_bytes=header.raw_bytes, chunks=len(header.chunks))
    timing = SendTiming()
    queue: asyncio.Queue = asyncio.Queue()
    produced: list = []
    stream = side_stream(tensor.device)
    worker = CODEC_THREADS
    arena = None
    if header.codec == "raw" and tensor.device.type == "cuda":
        # Made (pinned) on the first stream of this link direction, then reused for its life.
        arena = await loop.run_in_executor(CODEC_THREADS, channel.conn.outbound.arena, header.raw_bytes,
                                           tensor.device)
    if arena is not None:
        chunk_iter = staged_raw_chunks(tensor, header, arena, stream, stats)
        worker = arena.owner  # every CUDA call on the arena's memory happens on its owner thread
        stats.staged = True

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

    producer = loop.run_in_executor(worker, produce)
    request_fields = {**fields, "stream": header.to_dict(), "chunks": len(header.chunks)}
    try:
        reply = await channel.request(op, request_fields, segments, chunks=chunks(), timeout=timeout,
                                      chunk_timing=timing)
    finally:
        stats.encode_ms = (await producer) * 1e3
    stats.seal_ms, stats.send_ms = timing.seal_s * 1e3, timing.send_s * 1e3
    if stats.d2h_ms is None and header.codec == "raw" and tensor.device.type == "cuda":
        stats.d2h_ms = stats.encode_ms  # pageable: encoding a raw stream is its synchronous copies
    if measure_error and header.codec != "raw":
        stats.error = await loop.run_in_executor(CODEC_THREADS, _measure, tensor, header, produced, stream)
    return reply, stats


def staged_raw_chunks(tensor: torch.Tensor, header: codec.Header, arena: PinnedArena, stream,
                      stats: SendStats) -> Iterator[codec.EncodedChunk]:
    """A raw stream's chunks through pinned staging; iterate on ``arena``'s owner thread.

    Every chunk's device-to-host copy is queued at once on ``stream`` with an event after each, and
    chunk ``i`` is yielded as soon as its event has fired, while the later copies still run. A chunk
    for which the arena has no room (several streams at once) is copied through pageable memory when
    its turn comes. ``stats.d2h_ms`` is the copies' time on the GPU, first to last."""
    rows = _byte_view(tensor).reshape(header.tokens, -1)
    gpu = stream is not None  # on the CPU (tests) the same pipeline copies synchronously

    def marker():
        return _recorded(stream) if gpu else None

    pending: list = []
    try:
        t0 = time.perf_counter()
        with on_stream(stream):
            start = marker()
            for info in header.chunks:
                source = rows[info.start : info.start + info.count].reshape(-1)
                run = arena.allocate(source.numel())
                if run is None:
                    stats.staged = False  # this chunk goes through pageable memory: the hop is not all staged
                    pending.append((None, source))
                    continue
                torch.from_numpy(run).copy_(source, non_blocking=gpu)
                pending.append((run, marker()))
        copied_s = time.perf_counter() - t0
        last = None
        for index in range(len(pending)):
            run, done = pending[index]
            pending[index] = None  # the consumer holds the run from here; it returns once sent
            if run is None:
                yield codec.EncodedChunk(index, [host_bytes(done)])
                continue
            if done is not None:
                done.synchronize()
                last = done
            yield codec.EncodedChunk(index, [memoryview(run)])
        stats.d2h_ms = start.elapsed_time(last) if last is not None else copied_s * 1e3
    finally:
        if gpu:
            # Abandoned half-way (an error downstream): copies still queued must land before the runs
            # they write into can be handed out again.
            stream.synchronize()


@dataclass(frozen=True)
class LinkPlan:
    """How a stage's output reaches the next stage: the codec over TCP, or CUDA IPC on one host."""

    transport: str  # "tcp", "cuda-ipc" or "host-shm"
    spec: CodecSpec | None  # the codec, for tcp (raw for host-shm: a step without room goes over TCP)
    info: dict  # what the plan shows: bandwidth, why this codec, ...
    receiver: codec.Capabilities | None = None  # the next stage's, for tcp: which engine decodes there
    #: chooses the link again (the same peer, geometry and policy) with this box's capabilities now
    replan: Callable[[], Awaitable[LinkPlan]] | None = field(default=None, compare=False, repr=False)
    #: the region given by the next stage, for host-shm (a :class:`meshd.wire.shm.ShmSender`)
    shm: object | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.transport if self.transport in ("cuda-ipc", "host-shm") else self.spec.label


async def link_after(link: LinkPlan, sent: SendStats) -> LinkPlan:
    """The link for the next step: chosen again once the encoder failed over (NVENC failed, so
    libx265 encoded the rest of this tensor), since without NVENC another codec may serve it better."""
    if sent.encoder_note is None or link.replan is None:
        return link
    return await link.replan()


async def send_activation(channel: Channel, fields: dict, segments: list, tensor: torch.Tensor, link: LinkPlan,
                          *, measure_error: bool = False, placed: SharedRun | None = None):
    """Send a stage's output to the next stage the way ``link`` says; returns (reply, SendStats).
    ``placed``: host-shm only, the run the compute already wrote ``tensor`` into."""
    if link.transport == "host-shm":
        return await send_shared(channel, fields, segments, tensor, link, measure_error=measure_error, placed=placed)
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


class _TimedCopy:
    """One copy into or out of a shared region, on a GPU queued on the calling thread's current stream
    and timed by CUDA events around it (read :attr:`ms` once that stream is synchronised), on the CPU
    done now and timed by the clock."""

    def __init__(self) -> None:
        self._events: tuple | None = None
        self._seconds = 0.0
        self.made = False  # copy() was called (on a GPU: queued)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        t0 = time.perf_counter()
        gpu = target.is_cuda or source.is_cuda
        if gpu:
            stream = torch.cuda.current_stream(target.device if target.is_cuda else source.device)
            before = _recorded(stream)
            target.copy_(source, non_blocking=True)
            self._events = (before, _recorded(stream))
        else:
            target.copy_(source)
        self._seconds = time.perf_counter() - t0
        self.made = True

    @property
    def ms(self) -> float:
        if self._events is not None:
            return self._events[0].elapsed_time(self._events[1])
        return self._seconds * 1e3

    def wait(self) -> None:
        """Until the copy has finished (on a GPU: its end event, and what was queued before it)."""
        if self._events is not None:
            self._events[1].synchronize()

    @property
    def done(self) -> bool:
        """Whether the copy was made and has finished (on a GPU: its end event has fired)."""
        return self.made and (self._events is None or self._events[1].query())


class SharedRun:
    """A run of the next stage's shared region, taken for one step's stream (:func:`reserve_shared`).

    Taken before the stream is computed, so that the compute writes its output straight in
    (:meth:`place`, on the GPU worker in the same call as the kernels that make it: the copy queues
    behind them on the worker's stream, whose synchronisation at the end of the call completes it). The
    stream then reaches host memory with no hand-off to another thread and no wait of its own. The run
    stays ours until the reply, which may bring the prediction back in it (:func:`send_shared`).

    :meth:`announce` lets the ``forward`` go before the stream exists: it names the doorbell token the
    compute rings (:meth:`ring`) once the stream is in the run, and the receiver starts then. The
    receiver rings the same token back on the region's answer bell once the prediction is in the run
    (:meth:`answered`): the sender takes it from there before the reply, which follows with the hop
    records."""

    def __init__(self, region: int, arena: PinnedArena, run, bell, answers) -> None:
        self.region = region
        self.arena = arena
        self.run = run  # the run's numpy array: the pages are ours while it lives
        self.bell = bell  # the region's doorbell (a meshd.wire.shm.Bell)
        self.answers = answers  # the region's answer bell (a meshd.wire.shm.Doorbell)
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.token: int | None = None  # announced: the doorbell token the compute rings
        self.answered_bytes: int | None = None  # the prediction taken from the run when it rang back
        self.rang_at: float | None = None  # (time.monotonic) when ring() rang: a ring back before is a lie
        self._copy = _TimedCopy()

    @property
    def nbytes(self) -> int:
        return self.run.nbytes

    def place(self, tensor: torch.Tensor) -> None:
        """Copy ``tensor``'s bytes into the run: on a GPU queued on the calling thread's current stream
        (the caller waits for that stream before the run is read or sent), on the CPU now."""
        source = _byte_view(tensor)
        if source.numel() != self.nbytes:
            raise MeshError("mismatch", f"a stream of {source.numel()} bytes does not fill the {self.nbytes}-byte run "
                                        "reserved for this job's geometry")
        if self.token is not None and (tuple(tensor.shape), tensor.dtype) != (self.shape, self.dtype):
            raise MeshError("mismatch", f"a {tuple(tensor.shape)} {tensor.dtype} stream is not the "
                                        f"{self.shape} {self.dtype} one its forward announced")
        self._copy.copy(torch.from_numpy(self.run), source)
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def announce(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        """Let the forward go before the stream is computed: it says the ``shape`` and ``dtype`` to
        come, and the doorbell token :meth:`ring` will give."""
        self.shape, self.dtype, self.token = tuple(shape), dtype, self.bell.token()

    def ring(self) -> None:
        """Once the stream is in the run (:meth:`place`; on a GPU, once its copy has finished), ring the
        doorbell: the receiver's compute starts. Call it at the end of the compute that placed it."""
        if not self._copy.made:
            raise MeshError("internal", "a shared run was rung for before its stream was placed in it")
        self._copy.wait()  # (the GPU worker's own wait after the call is then free)
        self.rang_at = time.monotonic()
        self.bell.notify(self.token)  # a receiver gone is only logged: the forward's own wait names it

    async def answered(self, reply: asyncio.Future, shape: Sequence[int], dtype: torch.dtype,
                       peer: str) -> torch.Tensor | None:
        """For a forward sent ahead (:meth:`announce`): wait until the receiver rings its token back
        (the prediction of ``shape`` and ``dtype`` is at the start of the run) or ``reply`` (the
        forward's request) is done, whichever comes first. Returns the prediction, a view of the run
        (which stays ours while the view lives), or None: the reply came first, or the answer bell
        ended (the reply then says why). Called after :meth:`ring`: a ring
        back this side read before it is a ``protocol`` error."""
        back = self.answers.wait(self.token)
        try:
            await asyncio.wait({back, reply}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            back.cancel()  # (the reply came first: the token, if it rings later, is one the bell keeps)
        ended = back.cancelled() or back.exception() is not None  # (its failure retrieved, whichever came first)
        if ended or reply.done():
            return None
        if self.rang_at is None or back.result() < self.rang_at:
            # Only a peer that lies rings back before it was rung for: the run holds our own stream.
            raise MeshError("protocol", "rang back a prediction before its stream was in the shared run",
                            peer=peer)
        nbytes = math.prod(shape) * dtype.itemsize
        self.answered_bytes = nbytes
        return torch.from_numpy(self.run[:nbytes]).view(dtype).reshape(tuple(shape))

    @property
    def copy_ms(self) -> float:
        """The copy's time: on the GPU as its events timed it (ask once its stream is synchronised)."""
        return self._copy.ms

    @property
    def placed(self) -> bool:
        """Whether the stream is in the run: :meth:`place` ran and (on a GPU) its copy has finished."""
        return self._copy.done

    def descriptor(self) -> dict:
        """The forward's ``shm`` field: where the stream lies, and that the prediction may come back
        in the same run (``return``)."""
        desc = {"region": self.region, "offset": self.arena.offset_of(self.run), "nbytes": self.nbytes,
                "shape": list(self.shape), "dtype": dtype_name(self.dtype), "return": True}
        if self.token is not None:
            desc["ring"] = self.token  # the stream is there once this token rings
            desc["answer"] = True  # and the prediction, given back in the run, is rung back with it
        return desc

    def returned(self, reply, peer: str) -> None:
        """A reply whose prediction came back in this run (``prediction_shm``): its bytes are copied
        out into the reply's segments, as if they had come over TCP, before the run is let go. (A
        prediction already taken on the answer bell is not copied again: the reply must say the same
        place, and its segments view the run.)"""
        if "prediction_shm" not in reply.header:
            if self.answered_bytes is not None:
                raise MeshError("protocol", "rang back a prediction in the shared run, then sent one over TCP",
                                peer=peer)
            return
        back = reply.header["prediction_shm"]
        nbytes = wire_int(back.get("nbytes")) if isinstance(back, dict) else None
        if nbytes is None or not 0 < nbytes <= self.nbytes or reply.segments:
            raise MeshError("protocol", f"prediction_shm={back!r:.40} is not a place in the {self.nbytes}-byte run "
                                        "this forward sent (or the prediction came twice)", peer=peer)
        if self.answered_bytes is None:
            reply.segments = [self.run[:nbytes].copy()]
        elif nbytes == self.answered_bytes:
            reply.segments = [self.run[:nbytes]]
        else:
            raise MeshError("protocol", f"prediction_shm={back!r:.40} is not the {self.answered_bytes}-byte "
                                        "prediction it rang back", peer=peer)


async def reserve_shared(channel: Channel, link: LinkPlan, nbytes: int) -> SharedRun | None:
    """A run of ``nbytes`` in the region the next stage gave this link, or None: not a host-shm link,
    or no room now (the region cannot be had, or every run is taken): that step goes over TCP."""
    if link.transport != "host-shm":
        return None
    given = await link.shm.arena(channel, nbytes)
    run = given.arena.allocate(nbytes) if given is not None else None
    return SharedRun(given.id, given.arena, run, bell=given.bell, answers=given.answers) if run is not None else None


async def send_shared(channel: Channel, fields: dict, segments: list, tensor: torch.Tensor, link: LinkPlan,
                      *, measure_error: bool = False, placed: SharedRun | None = None):
    """Send a stream through the shared region the next stage gave this connection: in a run of it,
    then only its place and shape over TCP. ``placed``: the run the compute already wrote ``tensor``
    into (:meth:`SharedRun.place`); without it the tensor is copied in here. Where no run can be had now
    (a reconnect that was refused, a bigger stream while the old region is in use, every run taken) this
    step goes as a raw TCP stream: the same bytes, slower. ``tensor`` is None for a ``placed`` run that
    was announced (:meth:`SharedRun.announce`): the forward goes now, and the stream follows in the run."""
    nbytes = placed.nbytes if tensor is None else tensor.numel() * tensor.element_size()
    if placed is None:
        placed = await reserve_shared(channel, link, nbytes)
        if placed is None:
            return await send_stream(channel, "forward", fields, segments, tensor, link.spec,
                                     measure_error=measure_error, timeout=None)
        # A tensor computed elsewhere (complete: the GPU worker synchronises every call), copied on the
        # arena's owner thread on a side stream of its own.
        await asyncio.get_running_loop().run_in_executor(placed.arena.owner, _place_now, placed, tensor)
    try:
        # The run stays ours until the reply: the receiver copies out of it (and may write the
        # prediction into it) before it answers, so the next step or another generation on this link
        # can never write over bytes still being read.
        reply = await channel.request("forward", {**fields, "shm": placed.descriptor()}, segments, timeout=None)
    except MeshError:
        raise  # answered (an error reply: the receiver is done with the run), or the link is gone with its region
    except BaseException:
        # Given up (cancelled): the receiver may still read this run, or write a prediction into it,
        # after we stop waiting. No run of this region is handed out again; the link's next stream sets
        # up a new region once the forwards still in flight through this one are answered.
        placed.arena.close()
        raise
    if not placed.placed:
        # Only a peer that lies answers a forward before it was rung: what it says of the run is not read.
        raise MeshError("protocol", "answered a forward before its stream was in the shared run", peer=channel.name)
    placed.returned(reply, channel.name)
    # wire_bytes: what crossed from this stage to the next, here through the region instead of TCP. (The
    # copy is complete: the receiver answers only after it was rung, or after the copy was sent.)
    copy_ms = placed.copy_ms
    stats = SendStats(codec="raw", raw_bytes=nbytes, wire_bytes=nbytes, encode_ms=copy_ms, d2h_ms=copy_ms,
                      staged=placed.arena.pinned)
    return reply, stats


def _place_now(placed: SharedRun, tensor: torch.Tensor) -> None:
    stream = side_stream(tensor.device)
    with on_stream(stream):
        placed.place(tensor)
    if stream is not None:
        stream.synchronize()  # the bytes are in the region before the peer is told where


class StageInput:
    """A forward's input as :func:`receive_input` gives it: a tensor already on the device (a chunk
    stream, CUDA IPC), or (host-shm) its place in this connection's shared region.

    The latter is copied to the device by :meth:`take`, called inside the compute that uses it: the copy
    queues ahead of the compute's kernels on the GPU worker's stream, with no hand-off to another thread
    and no wait of its own. Its bytes stay mapped and registered while this object lives (keep it until
    the compute's stream is synchronised), and the prediction may go back in the same run
    (:meth:`give_back`), read by the sender once the reply arrives."""

    def __init__(self, tensor: torch.Tensor | None = None, *, source=None, shape: Sequence[int] = (),
                 dtype: torch.dtype | None = None, may_return: bool = False,
                 rung: Callable[[], Awaitable[None]] | None = None,
                 answer: Callable[[], None] | None = None) -> None:
        self._tensor = tensor
        self.source = source  # the region's bytes (a span of its arena), for host-shm
        self.shape, self.dtype = tuple(shape), dtype
        self.may_return = may_return  # the sender takes the prediction back in its run
        self._rung = rung  # (host-shm, a forward sent ahead of its stream) the wait for its doorbell
        self._answer = answer  # (the same) rings its token back once the prediction is in the run
        self._copy = _TimedCopy()
        self.returned: int | None = None  # bytes of prediction given back in the run

    async def ready(self) -> None:
        """Wait until the input is there to be taken: at once, except for a forward the sender sent
        ahead of its stream (``shm`` ``ring``), whose sender rings when the stream is in the run.
        Everything else about the step can be checked and prepared before; this is the last wait
        before the compute."""
        if self._rung is None:
            return
        rung, self._rung = self._rung, None
        try:
            await asyncio.wait_for(rung(), limits.SHM_READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise MeshError("peer-lost", f"the stream of this forward was not rung within "
                                         f"{limits.SHM_READY_TIMEOUT_S:.0f} s") from None

    @property
    def shared(self) -> bool:
        return self.source is not None

    def take(self, device: torch.device) -> torch.Tensor:
        """The input on ``device`` (for host-shm, copied there on the calling thread's current stream;
        a CPU stage gets its own copy: the region is the sender's to reuse after the reply)."""
        if self._tensor is not None:
            tensor, self._tensor = self._tensor, None  # the caller's from here: freed when it lets go
            return tensor
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        self._copy.copy(out, torch.from_numpy(self.source).view(self.dtype).reshape(self.shape))
        return out

    def count_copy(self, rx: ReceiveStats) -> float:
        """Once the compute that took the input has synchronised: a host-shm hop's receiving figures are
        its copy to the device (the hop's, not the blocks'); returns that copy's ms (0 otherwise)."""
        if not self.shared:
            return 0.0
        rx.decode_ms = rx.h2d_ms = self._copy.ms
        return rx.h2d_ms

    def give_back(self, prediction: torch.Tensor) -> bool:
        """Put the prediction at the start of the input's run, for the sender to read when the reply
        arrives (a GPU tensor: queued on the calling thread's current stream, which must be synchronised
        before the reply). For a forward sent ahead of its stream, wait here for that copy and ring the
        forward's token back on the region's answer bell: the sender takes the prediction then, without
        waiting for the reply. False, and nothing written, where the sender did not ask for it or the
        prediction does not fit; it then goes back over TCP."""
        source = _byte_view(prediction)
        if not self.shared or not self.may_return or source.numel() > self.source.nbytes:
            return False
        back = _TimedCopy()
        back.copy(torch.from_numpy(self.source[: source.numel()]), source)
        self.returned = source.numel()
        if self._answer is not None:
            back.wait()  # (the GPU worker's own wait after the call is then free)
            self._ring_back()
        return True

    def _ring_back(self) -> None:
        """A forward sent ahead: its sender takes the prediction from the run at once (the reply follows)."""
        answer, self._answer = self._answer, None
        if answer is not None:
            answer()

    def pass_back(self, segments: list) -> None:
        """A prediction from further down, as one host buffer (``segments``): into the input's run now,
        where the sender asked for it there and it fits, and rung back as :meth:`give_back` does (a
        middle stage: as soon as it has it, before its own reply). Once only."""
        if self.returned is None and self.shared and self.may_return and len(segments) == 1:
            data = np.frombuffer(memoryview(segments[0]).cast("B"), dtype=np.uint8)
            if 0 < data.nbytes <= self.source.nbytes:
                self.source[: data.nbytes] = data
                self.returned = data.nbytes
                self._ring_back()

    def reply(self, fields: dict, segments: list) -> tuple[dict, list]:
        """A forward's reply ``fields`` with its prediction: in the run where :meth:`give_back` or
        :meth:`pass_back` put it, or where it came from further down as one host buffer (``segments``)
        that fits there (passed back now); else ``segments`` over TCP."""
        self.pass_back(segments)
        if self.returned is None:
            return fields, segments
        return {**fields, "prediction_shm": {"nbytes": self.returned}}, []


async def receive_input(request: Request, device: torch.device, expect_shape: Sequence[int],
                        expect_dtype: torch.dtype, *, shm=None) -> tuple[StageInput, ReceiveStats]:
    """The stage input that came with ``request``: mapped over CUDA IPC or decoded from its stream onto
    ``device``, or checked against this connection's shared region ``shm`` (a
    :class:`meshd.wire.shm.Inbound`, or None) and left there for the compute to take
    (:meth:`StageInput.take`; its figures: :meth:`StageInput.count_copy`)."""
    if "shm" in request.header:
        from ..wire import shm as shared  # noqa: PLC0415

        if request.announced_chunks or "ipc" in request.header:
            raise MeshError("bad-request", "a forward carries its input one way: shared memory, CUDA IPC or a chunk stream")
        desc = request.header["shm"]
        offset, nbytes = shared.check_descriptor(desc, shm, expect_shape, expect_dtype)
        may_return = desc.get("return", False)
        if not isinstance(may_return, bool):
            raise MeshError("bad-request", f"shm return={may_return!r:.20} must be true or false")
        rung = answer = None
        if "ring" in desc:  # sent ahead of its stream: it is there once this token rings
            token = wire_int(desc["ring"])
            if token is None or not 0 < token < 1 << 64:
                raise MeshError("bad-request", f"shm ring={desc['ring']!r:.20} must be a doorbell token in 1..2**64-1")
            rung = functools.partial(shm.doorbell.wait, token)  # waited for by StageInput.ready
            wants = desc.get("answer", False)
            if not isinstance(wants, bool):
                raise MeshError("bad-request", f"shm answer={wants!r:.20} must be true or false")
            if wants and may_return:  # rung back once the prediction is in the run
                answer = functools.partial(shm.answer.notify, token)
        # The span keeps the region mapped and registered while the input lives, even if the connection
        # (and its region) is dropped meanwhile.
        inp = StageInput(source=shm.arena.span(offset, nbytes), shape=expect_shape, dtype=expect_dtype,
                         may_return=may_return, rung=rung, answer=answer)
        return inp, ReceiveStats(bytes=nbytes, codec="raw", transport="host-shm", staged=shm.arena.pinned,
                                 ahead=rung is not None)
    if "ipc" not in request.header:
        tensor, rx = await receive_stream(request, device, expect_shape, expect_dtype)
        return StageInput(tensor), rx
    if request.announced_chunks:
        raise MeshError("bad-request", "a forward carries its input either over CUDA IPC or as a chunk stream, not both")
    if device.type != "cuda":
        raise MeshError("bad-request", "CUDA IPC input sent to a CPU stage")
    from ..wire import ipc  # noqa: PLC0415  (whether this connection may send it: StageService.forward)

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    tensor = await loop.run_in_executor(CODEC_THREADS, ipc.import_copy, request.header["ipc"], device,
                                        expect_shape, expect_dtype)
    return StageInput(tensor), ReceiveStats(wire_ms=(time.perf_counter() - t0) * 1e3, codec="cuda-ipc")


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
    stats = ReceiveStats(codec=decoder.header.label, recv_ms=0.0, open_ms=0.0)
    decode_s = 0.0
    wire_s = 0.0
    stream = side_stream(device)
    worker, arena = CODEC_THREADS, None
    if device.type == "cuda":
        # This connection's streams go to the GPU: its later chunks land in pinned memory, and the
        # copies from there are issued on the arena's owner thread.
        arena = await loop.run_in_executor(CODEC_THREADS, request.session.conn.stage_inbound,
                                           decoder.header.raw_bytes, device)
        if arena is not None:
            worker = arena.owner
    stats.staged = arena is not None
    copies: list = []  # (before, after) events around each raw chunk's host-to-device copy
    timed = stream is not None and decoder.header.codec == "raw"

    def feed(index: int, buffers: list) -> float:
        t0 = time.perf_counter()
        with on_stream(stream):
            before = _recorded(stream) if timed else None
            decoder.feed(index, buffers)
            if timed:
                copies.append((before, _recorded(stream)))
        if arena is not None:
            stats.staged &= all(arena.holds(b) for b in buffers)  # every chunk, not some
        return time.perf_counter() - t0

    def finish() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with on_stream(stream):
            out = decoder.result()  # synchronises its stream: the tensor is complete for the compute queue
        return out, time.perf_counter() - t0

    finished = False
    try:
        async for frame in request.chunks(count):
            stats.bytes += frame.payload_bytes
            wire_s += frame.finished_at - frame.started_at
            stats.recv_ms += frame.recv_s * 1e3
            stats.open_ms += frame.open_s * 1e3
            decode_s += await loop.run_in_executor(worker, feed, frame.header.get("index"), frame.segments)
        tensor, finish_s = await loop.run_in_executor(worker, finish)
        finished = True
    except CodecError as exc:
        raise MeshError("codec", f"stream: {exc}") from None
    finally:
        if not finished and stream is not None:
            # Given up half-way: copies already queued read received buffers and write the decoder's
            # tensor; both stay referenced until those copies are done, then go.
            CODEC_THREADS.submit(_drain, stream, decoder)
    stats.wire_ms = wire_s * 1e3
    stats.decode_ms = (decode_s + finish_s) * 1e3
    if timed:
        stats.h2d_ms = sum(before.elapsed_time(after) for before, after in copies)
    elif decoder.header.codec == "raw":
        stats.h2d_ms = stats.decode_ms  # a CPU stage: the copy is the decode
    return tensor, stats


async def give_up(task: asyncio.Future) -> None:
    """Cancel ``task`` unless it is done, and wait until it is (its failure, if any, is not this caller's:
    a forward given up this way retires its shared region, :func:`send_shared`)."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, flat (a view where it is contiguous already)."""
    return tensor.detach().contiguous().view(torch.uint8).reshape(-1)


def _recorded(stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _drain(stream, decoder: codec.ChunkDecoder) -> None:
    """Wait for ``stream``'s copies; ``decoder`` (its buffers and tensor) is let go only after."""
    stream.synchronize()
    del decoder
