"""The asyncio side of the protocol: moves the bytes that :mod:`meshd.wire` makes and reads.

:class:`Connection` only moves frames: plain ones during the handshake, sealed records after it
(:mod:`meshd.wire.seal`). Reads are sliced so that progress is observable and a stalled peer times
out; every send has a progress deadline, so that a peer that stops reading is lost within seconds.
:func:`client_handshake` / :func:`server_handshake` drive :mod:`meshd.wire.handshake`.
:class:`Channel` (client side) and :class:`ServerSession` (server side) carry requests, chunk
streams, events and replies, matched by request id, with keep-alive pings so that a dead peer
becomes an error within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import random
import select
import socket
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import limits
from ..errors import MeshError, PeerLost
from . import seal as sealing
from . import staging
from .frames import (DEFAULT_LIMITS, LENGTH, PREAUTH_LIMITS, PREFIX, Frame, FrameLimits, FrameReader, ProtocolError,
                     encode_frame)
from .handshake import ClientHandshake, ServerHandshake
from .link import LinkEmulation, LinkStats, TokenBucket
from .session import ClientRules, ServerRules, announced_chunks

log = logging.getLogger(__name__)

#: Largest piece handed to one send call under link emulation (pacing granularity).
PACE_SLICE = 256 * 1024
#: Segments at least this big are received into buffers from the connection's allocator (the
#: daemon's hook for where big segments land), smaller ones into plain bytearrays.
BIG_SEGMENT = 1 << 20

Allocator = Callable[[int], Any]

#: Big segments move (and are sealed and opened) on these threads with plain blocking-style system
#: calls: several times the throughput of the event loop's per-call overhead (loopback: ~3 GB/s vs
#: ~1.2 GB/s measured on a 2-core machine), and the loop stays free meanwhile. Only the connection's
#: single reader (or the holder of its write lock) touches the socket at a time, so this never races
#: the loop.
BULK_IO = ThreadPoolExecutor(8, thread_name_prefix="bulk-io")


def _bulk_recv_into(sock: socket.socket, view: memoryview, progress: Callable[[], None], timeout: float) -> int:
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    got, n = 0, len(view)
    while got < n:
        try:
            count = sock.recv_into(view[got:])
        except BlockingIOError:
            if not poller.poll(timeout * 1000):
                raise TimeoutError from None
            continue
        if count == 0:
            return got
        got += count
        progress()
    return got


def _bulk_send(sock: socket.socket, view: memoryview, timeout: float) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLOUT | select.POLLERR | select.POLLHUP)
    sent, n = 0, len(view)
    while sent < n:
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            if not poller.poll(timeout * 1000):
                raise TimeoutError from None


@dataclass
class SendTiming:
    """Where a frame's sending time went, summed over its big segments: sealing, and socket writes
    (which include waiting for the peer to read). Measured on the threads that do the work."""

    seal_s: float = 0.0
    send_s: float = 0.0


#: Sealed records in flight per big segment between the sealing (or receiving) thread and the thread
#: that writes (or opens) them: the two overlap, and memory stays a few records' worth.
RECORDS_IN_FLIGHT = 3


def _take(free: queue.Queue, partner) -> bytearray:
    """A free record buffer, or the partner thread's failure if it ended early (never a hang)."""
    while True:
        try:
            return free.get(timeout=0.05)
        except queue.Empty:
            if partner.done():
                partner.result()  # raises its error
                raise ConnectionError("record pipeline ended early")


def _bulk_send_sealed(sock: socket.socket, view: memoryview, sealer: sealing.Sealer, ring: list[bytearray],
                      writer_thread: ThreadPoolExecutor, timeout: float, timing: SendTiming | None) -> int:
    """Seal a big segment record by record on this thread while ``writer_thread`` writes the records
    sealed before, in order (the sealer's counter is touched by this thread only). Returns the bytes
    sent."""
    free: queue.Queue = queue.Queue()
    for buf in ring:
        free.put(buf)
    ready: queue.Queue = queue.Queue()
    spent = SendTiming()

    def write() -> int:
        sent = 0
        while (item := ready.get()) is not None:
            record, buf = item
            t0 = time.perf_counter()
            _bulk_send(sock, record, timeout)
            spent.send_s += time.perf_counter() - t0
            sent += len(record)
            free.put(buf)
        return sent

    writer = writer_thread.submit(write)
    try:
        for piece in sealer.pieces(view):
            buf = _take(free, writer)
            t0 = time.perf_counter()
            record = sealer.seal(piece, buf)
            spent.seal_s += time.perf_counter() - t0
            ready.put((record, buf))
    finally:
        ready.put(None)
        sent = writer.result()  # waits: nothing may write from our buffers once we return
    if timing is not None:
        timing.seal_s += spent.seal_s
        timing.send_s += spent.send_s
    return sent


@dataclass
class ReceiveTiming:
    """Where a frame's receiving time went: socket reads (including waiting for the sender) and opening
    records. Measured on the threads that do the work; set on each received :class:`Frame`."""

    recv_s: float = 0.0
    open_s: float = 0.0


def _bulk_recv_sealed(sock: socket.socket, view: memoryview, opener: sealing.Opener, ring: list[bytearray],
                      opener_thread: ThreadPoolExecutor, progress: Callable[[], None], timeout: float,
                      timing: ReceiveTiming) -> int:
    """Receive a big segment's records on this thread while ``opener_thread`` checks and opens the ones
    before, in order, each straight into its place in ``view``. A record's size is the piece due, never
    what its header claims: the header is checked (on the opener, where its number is due) before its
    body is decrypted. Returns the bytes received."""
    free: queue.Queue = queue.Queue()
    for buf in ring:
        free.put(buf)
    ready: queue.Queue = queue.Queue()
    spent = ReceiveTiming()
    head_bytes = sealing.RECORD.size

    def open_records() -> None:
        while (item := ready.get()) is not None:
            start, n, buf = item
            t0 = time.perf_counter()
            record = memoryview(buf)
            body = record[head_bytes : head_bytes + opener.check(record[:head_bytes], n)]
            opener.open_into(record[:head_bytes], body, view[start : start + n])
            spent.open_s += time.perf_counter() - t0
            free.put(buf)

    worker = opener_thread.submit(open_records)
    got = 0
    try:
        for start in range(0, len(view), opener.record_bytes):
            n = min(opener.record_bytes, len(view) - start)
            buf = _take(free, worker)
            record = memoryview(buf)[: head_bytes + n + sealing.TAG_BYTES]
            t0 = time.perf_counter()
            count = _bulk_recv_into(sock, record, progress, timeout)
            spent.recv_s += time.perf_counter() - t0
            if count < len(record):
                raise ConnectionError("connection closed by peer")
            got += count
            ready.put((start, n, buf))
    finally:
        ready.put(None)
        futures.wait([worker])  # even when reading failed: it must not write into ``view`` once we return
    worker.result()  # its SealError, when the reading itself went fine
    timing.recv_s += spent.recv_s
    timing.open_s += spent.open_s
    return got


def _bytearray(n: int) -> bytearray:
    return bytearray(n)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class Connection:
    """One TCP connection carrying frames, on a non-blocking socket driven by the event loop.

    Segments are sent straight from the caller's buffers and received straight into buffers from
    ``allocator``, or, once :meth:`stage_inbound` says this connection's streams go to a GPU, into
    its pinned receive arena (:mod:`meshd.wire.staging`; never torch's caching host allocator, whose
    recycled blocks crashed daemons on the GPU machine). The only copy in between is the cipher's,
    through a few record-sized buffers per direction: one thread seals (or receives) while another
    writes (or opens) the records before, in order. Writes are serialised; reads happen in one task.
    """

    def __init__(self, sock: socket.socket, name: str, *, stats: LinkStats | None = None,
                 emulation: LinkEmulation | None = None, allocator: Allocator | None = None) -> None:
        self.sock, self.name = sock, name
        #: The peer's address as the socket gives it ((host, port[, flow, scope])), never re-parsed from
        #: ``name``.
        self.address: tuple | None = None
        with contextlib.suppress(OSError):
            self.address = sock.getpeername()
        self.stats = stats
        self.emulation = emulation
        self.allocator = allocator or _bytearray
        self._bucket = TokenBucket(emulation.rate_bytes_per_s) if emulation else None
        self._write_lock = asyncio.Lock()
        self._last_send = 0.0
        self._loop = asyncio.get_running_loop()
        self.last_rx = time.monotonic()
        self.reading = False  # True while a frame is partly read
        self.frames_received = 0
        self.closed = False
        self._users = 0  # socket operations in flight; the descriptor is closed once there are none
        self._control: asyncio.Task | None = None  # a ping or pong being sent
        self.sealer: sealing.Sealer | None = None
        self.opener: sealing.Opener | None = None
        self._peer_may_refuse = False
        self._rings: dict[str, list[bytearray]] = {}  # record buffers per direction, made when first needed
        self._helpers: dict[str, ThreadPoolExecutor] = {}  # the writing / opening thread per direction
        #: Pinned host memory per direction: ``outbound`` for CUDA tensors this side sends
        #: (meshd.pipeline.streaming), ``inbound`` for big segments received once :meth:`stage_inbound` was called.
        self.outbound = staging.LinkStaging(f"stage-out {name}")
        self.inbound = staging.LinkStaging(f"stage-in {name}")
        self._inbound_staged = False
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def seal(self, keys: sealing.SessionKeys, *, peer_may_refuse: bool = False) -> None:
        """Seal every frame from now on, both ways, with this session's keys. ``peer_may_refuse``: the
        peer may still answer with one unsealed error instead of its first record (a client whose
        proof the server has not checked yet)."""
        if sealing.BENCH_UNSEALED:
            return
        self.sealer, self.opener = sealing.Sealer(keys.send), sealing.Opener(keys.receive)
        self._peer_may_refuse = peer_may_refuse

    def _ring(self, which: str, count: int = RECORDS_IN_FLIGHT) -> list[bytearray]:
        """At least ``count`` record-sized buffers for one direction, made when a segment first needs
        them: one for segments sealed on the event loop, RECORDS_IN_FLIGHT once a big one went through
        the record pipeline (most connections carry small frames only, and each buffer is 1 MiB)."""
        ring = self._rings.setdefault(which, [])
        size = sealing.RECORD.size + self.sealer.record_bytes + sealing.TAG_BYTES
        ring.extend(bytearray(size) for _ in range(count - len(ring)))
        return ring

    def _helper(self, which: str) -> ThreadPoolExecutor:
        """The thread that writes (``send``) or opens (``recv``) records beside the bulk-I/O thread."""
        helper = self._helpers.get(which)
        if helper is None:
            helper = self._helpers[which] = ThreadPoolExecutor(1, thread_name_prefix=f"bulk-{which}")
        return helper

    def stage_inbound(self, nbytes: int = staging.ARENA_BYTES, device=None) -> staging.PinnedArena | None:
        """From now on receive big segments into pinned host memory (this connection's streams go to
        ``device``: copies from there are asynchronous DMA), room for ``nbytes`` at once. Makes the
        arena on first call: call it off the event loop. None where pinning is unavailable (said once
        in the log)."""
        arena = self.inbound.arena(nbytes, device)
        self._inbound_staged = arena is not None
        return arena

    def _segment_buffer(self, n: int):
        """Where a big received segment lands: a pinned run when staged and one is free, else the
        allocator's buffer (a full arena only costs speed)."""
        if self._inbound_staged:
            arena = self.inbound.current
            run = arena.allocate(n) if arena is not None else None
            if run is not None:
                return run
        return self.allocator(n)

    @property
    def sealed(self) -> bool:
        """Whether frames on this connection are sealed (after a keyed handshake)."""
        return self.sealer is not None

    def set_emulation(self, emulation: LinkEmulation | None) -> None:
        """Shape (or stop shaping) what this connection sends from now on."""
        self.emulation = emulation
        self._bucket = TokenBucket(emulation.rate_bytes_per_s) if emulation else None

    async def send(self, header: dict[str, Any], segments: Iterable = (), *, timing: SendTiming | None = None) -> int:
        """Send one frame; returns its size in bytes on the wire. ``timing`` adds up where the time went.

        A frame is written whole even if the caller is cancelled meanwhile: a frame cut short (or a
        bulk-I/O thread still writing after its caller left) would corrupt the stream for every other
        request on this connection."""
        buffers = encode_frame(header, list(segments))
        write = asyncio.ensure_future(self._write(buffers, timing))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(_retrieve)  # a failure there closes the connection; nobody waits for it
            raise

    def send_control(self, op: str) -> None:
        """Send a ping or pong without waiting for it, and not at all while another frame is being
        written: those bytes already tell the peer we live, and a writer stuck behind a peer that does
        not read must not hold up our reading or our heartbeat (its own deadline ends it)."""
        if self.closed or self._write_lock.locked() or (self._control is not None and not self._control.done()):
            return
        self._control = asyncio.ensure_future(self.send({"op": op, "id": 0}))
        self._control.add_done_callback(_retrieve)

    @contextlib.contextmanager
    def _using_socket(self):
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self.closed and not self._users:
                self._close_socket()

    async def _write(self, buffers: list, timing: SendTiming | None = None) -> int:
        async with self._write_lock:
            if self.closed:
                raise PeerLost(self.name, "connection is closed")
            try:
                with self._using_socket():
                    size = await self._write_buffers(buffers, timing)
            except TimeoutError:
                self.abort()  # the stream is broken mid-frame: end it, so that every reader hears of it
                raise PeerLost(self.name, f"peer took nothing we sent for {limits.SEND_PROGRESS_TIMEOUT_S:g} s "
                                          "(it stopped reading)") from None
            except (ConnectionError, OSError, ValueError) as exc:
                self.abort()
                raise PeerLost(self.name, f"connection lost while sending: {exc}") from None
        if self.stats:
            self.stats.sent(size)
        return size

    def _pieces(self, view: memoryview, head: bool, timing: SendTiming):
        """What goes on the wire for one buffer: its sealed records, or (unsealed) slices of it small
        enough for the send deadline to mean progress."""
        if self.sealer is None:
            yield from (view[i : i + sealing_piece()] for i in range(0, len(view), sealing_piece()))
        elif head:
            yield self.sealer.seal(view)
        else:
            for piece in self.sealer.pieces(view):
                t0 = time.perf_counter()
                record = self.sealer.seal(piece, self._ring("send", 1)[0])  # sent before the next is sealed
                timing.seal_s += time.perf_counter() - t0
                yield record

    async def _write_buffers(self, buffers: list, timing: SendTiming | None) -> int:
        timing = timing if timing is not None else SendTiming()
        if self._bucket is not None and self.emulation.delay_s and \
                time.monotonic() - self._last_send > self.emulation.delay_s:
            await asyncio.sleep(self.emulation.delay_s)  # latency delays a burst; frames back to back share it
        total = 0
        for index, buf in enumerate(buffers):
            view = memoryview(buf).cast("B")
            if self._bucket is None and index and len(view) >= BIG_SEGMENT:
                if self.sealer is None:
                    t0 = time.perf_counter()
                    await self._loop.run_in_executor(BULK_IO, _bulk_send, self.sock, view,
                                                     limits.SEND_PROGRESS_TIMEOUT_S)
                    timing.send_s += time.perf_counter() - t0
                    total += len(view)
                else:
                    total += await self._loop.run_in_executor(BULK_IO, _bulk_send_sealed, self.sock, view,
                                                              self.sealer, self._ring("send"), self._helper("send"),
                                                              limits.SEND_PROGRESS_TIMEOUT_S, timing)
                continue
            for piece in self._pieces(view, index == 0, timing):
                total += len(piece)
                t0 = time.perf_counter()
                await self._send_piece(piece)
                timing.send_s += time.perf_counter() - t0
        self._last_send = time.monotonic()
        return total

    async def _send_piece(self, piece: memoryview) -> None:
        # Timed in small slices: a 1 MiB record on a slow but live link must not look like a stalled peer.
        size = PACE_SLICE if self._bucket is not None else limits.SEND_PROGRESS_SLICE
        for part in (piece[i : i + size] for i in range(0, len(piece), size)):
            if self._bucket is not None:
                await self._bucket.consume(len(part))
            async with asyncio.timeout(limits.SEND_PROGRESS_TIMEOUT_S):
                await self._loop.sock_sendall(self.sock, part)

    def _progress(self) -> None:
        self.last_rx = time.monotonic()

    async def _read_into(self, buf, idle_timeout: float | None, timing: ReceiveTiming | None = None) -> None:
        view = memoryview(buf).cast("B")
        if len(view) >= BIG_SEGMENT and idle_timeout is None:  # inside a frame: a big segment
            t0 = time.perf_counter()
            if await self._in_thread(_bulk_recv_into, view) < len(view):
                raise PeerLost(self.name, "connection closed by peer")
            if timing is not None:
                timing.recv_s += time.perf_counter() - t0
            if self.stats:
                self.stats.received(len(view))
            return
        with self._using_socket():
            await self._read_socket(view, idle_timeout)

    async def _in_thread(self, fn, *args, **kw) -> int:
        """Run a bulk receive on an I/O thread; its failures become PeerLost (SealError passes through)."""
        with self._using_socket():
            try:
                return await self._loop.run_in_executor(
                    BULK_IO, functools.partial(fn, self.sock, *args, self._progress, limits.FRAME_PROGRESS_TIMEOUT_S, **kw))
            except TimeoutError:
                raise PeerLost(self.name, f"no data for {limits.FRAME_PROGRESS_TIMEOUT_S:.0f} s") from None
            except (ConnectionError, OSError, ValueError) as exc:
                raise PeerLost(self.name, f"connection lost: {exc}") from None

    async def _read_socket(self, view: memoryview, idle_timeout: float | None) -> None:
        n, got = len(view), 0
        loop = self._loop
        timeout = idle_timeout
        try:
            # One timeout per read, moved forward on every bit of progress (no task per recv call).
            async with asyncio.timeout(None if idle_timeout is None else loop.time() + idle_timeout) as deadline:
                while got < n:
                    count = await loop.sock_recv_into(self.sock, view[got:])
                    if count == 0:
                        raise PeerLost(self.name, "connection closed by peer")
                    got += count
                    self.last_rx = time.monotonic()
                    timeout = limits.FRAME_PROGRESS_TIMEOUT_S
                    deadline.reschedule(loop.time() + timeout)
        except TimeoutError:
            raise PeerLost(self.name, f"no data for {timeout:.0f} s") from None
        except (ConnectionError, OSError) as exc:
            raise PeerLost(self.name, f"connection lost: {exc}") from None
        if self.stats:
            self.stats.received(n)

    async def recv(self, frame_limits: FrameLimits = DEFAULT_LIMITS, idle_timeout: float | None = None) -> Frame:
        """Read one frame (ProtocolError on a bad one, SealError on a record that is not the one due,
        PeerLost on a closed or stalled link)."""
        try:
            first = bytearray(PREFIX.size)  # a frame prefix, or a sealed record's header: both 16 bytes
            await self._read_into(first, idle_timeout)
            started = time.perf_counter()
            self.reading = True
            timing = ReceiveTiming()
            if self.opener is None:
                frame = await self._recv_plain(first, FrameReader(frame_limits), timing)
            elif self._peer_may_refuse and self.opener.sequence == 0 and first[:4] == limits.MAGIC:
                # The peer refused us after the handshake's keys were known (e.g. our proof): its
                # error is the one unsealed frame it may still send.
                frame = await self._recv_plain(first, FrameReader(PREAUTH_LIMITS))
                if frame.op != "error":
                    raise sealing.SealError(f"an unsealed {frame.op[:32]!r} frame arrived where the first sealed "
                                            "record was due")
            else:
                frame = await self._recv_sealed(first, FrameReader(frame_limits), frame_limits, timing)
            frame.started_at, frame.finished_at = started, time.perf_counter()
            frame.recv_s, frame.open_s = timing.recv_s, timing.open_s
            self.frames_received += 1
            return frame
        finally:
            self.reading = False

    async def _recv_plain(self, prefix: bytearray, reader: FrameReader, timing: ReceiveTiming | None = None) -> Frame:
        frame = reader.push(prefix)
        while frame is None:
            n = reader.needed()
            buf = self._segment_buffer(n) if reader.expecting_segment and n >= BIG_SEGMENT else bytearray(n)
            await self._read_into(buf, None, timing)
            frame = reader.push(buf)
        return frame

    async def _recv_sealed(self, head: bytearray, reader: FrameReader, frame_limits: FrameLimits,
                           timing: ReceiveTiming) -> Frame:
        opener = self.opener
        maximum = PREFIX.size + LENGTH.size * frame_limits.max_segments + frame_limits.max_header
        body = bytearray(opener.check(head, None, maximum))
        await self._read_into(body, None)
        frame = sealing.split_head(opener.open(head, body), reader)
        while frame is None:
            n = reader.needed()
            buf = self._segment_buffer(n) if n >= BIG_SEGMENT else bytearray(n)
            view = memoryview(buf).cast("B")
            if n >= BIG_SEGMENT:
                received = await self._in_thread(_bulk_recv_sealed, view, opener, self._ring("recv"),
                                                 self._helper("recv"), timing=timing)
                if self.stats:
                    self.stats.received(received)
            else:
                for start in range(0, n, opener.record_bytes):
                    size = min(opener.record_bytes, n - start)
                    await self._read_into(head, None)
                    body = bytearray(opener.check(head, size))
                    await self._read_into(body, None)
                    opener.open_into(head, body, view[start : start + size])
            frame = reader.push(buf)
        return frame

    async def heartbeat(self, active: Callable[[], bool], on_silence: Callable[[float], Awaitable[None]]) -> None:
        """While ``active()``, ping the peer every PING_INTERVAL_S and call ``on_silence`` once no byte
        has arrived for PEER_SILENCE_TIMEOUT_S. The peer does the same, so a live link never goes quiet
        for long even while one side is busy reading a big frame. A ping never waits behind a blocked
        writer, so silence is noticed even then."""
        with contextlib.suppress(asyncio.CancelledError):
            was_active = False
            woke = time.monotonic()
            while not self.closed:
                await asyncio.sleep(limits.PING_INTERVAL_S)
                now = time.monotonic()
                lag, woke = now - woke - limits.PING_INTERVAL_S, now
                now_active = active() or self.reading
                if not now_active:
                    was_active = False
                    continue
                if not was_active or lag > 0.5:
                    # Do not blame the peer for time we were idle, or for time our own event loop
                    # could not run (its bytes may be sitting unread in the socket).
                    self.last_rx = max(self.last_rx, now - limits.PING_INTERVAL_S)
                    was_active = True
                silent = now - self.last_rx
                if silent > limits.PEER_SILENCE_TIMEOUT_S:
                    await on_silence(silent)
                    return
                self.send_control("ping")

    def abort(self) -> None:
        """Close at once: the peer sees the connection end, pending reads and writes here fail."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes every read and write waiting on the socket
        if not self._users:
            self._close_socket()
        # else the last of them closes it: a descriptor closed under a pending read leaves that read
        # waiting forever (epoll forgets closed descriptors), and its number may be reused meanwhile.

    def _close_socket(self) -> None:
        # Nothing uses the socket any more, so no bulk transfer runs on the helpers or reads the arenas
        # for a transfer (a received segment still referenced keeps its run until it is dropped).
        with contextlib.suppress(OSError):
            self.sock.close()
        for helper in self._helpers.values():
            helper.shutdown(wait=False)
        self._helpers.clear()  # a late transfer gets a fresh one, and fails on the closed socket
        self.outbound.close()
        self.inbound.close()

    async def close(self) -> None:
        self.abort()


def sealing_piece() -> int:
    """Largest piece of an unsealed buffer handed to one deadline-bound send (a record's worth)."""
    return limits.SEAL_RECORD_BYTES


def address_name(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


# --- handshake -----------------------------------------------------------------------------------


async def client_handshake(conn: Connection, key: bytes | None, hello: dict | None = None) -> dict:
    """Prove the key to the server and check its proof; return the server's welcome fields."""
    handshake = ClientHandshake(key, hello, conn.name)

    async def step() -> dict:
        await conn.send(handshake.hello())
        challenge = await conn.recv(PREAUTH_LIMITS)
        await conn.send(handshake.on_challenge(challenge.header))
        if handshake.keys is not None:
            conn.seal(handshake.keys, peer_may_refuse=True)
        return handshake.on_welcome((await conn.recv(DEFAULT_LIMITS)).header)

    try:
        return await asyncio.wait_for(step(), limits.HANDSHAKE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise PeerLost(conn.name, f"handshake did not finish within {limits.HANDSHAKE_TIMEOUT_S:.0f} s") from None
    except ProtocolError as exc:
        raise MeshError(exc.wire_code, str(exc), peer=conn.name) from None


async def server_handshake(conn: Connection, key: bytes | None, welcome: Callable[[], dict]) -> dict:
    """Authenticate a client; on failure send it an error naming the cause and raise.

    ``key`` None means the daemon runs ``--insecure`` (loudly): any client is let in, unsealed.
    """
    handshake = ServerHandshake(key, conn.name)

    async def answer(reply: Callable[[], dict | None]) -> dict | None:
        try:
            return reply()
        except MeshError as exc:
            with contextlib.suppress(Exception):
                await conn.send({"op": "error", "code": exc.code, "message": exc.message})
            raise

    async def step() -> dict:
        try:
            hello = await asyncio.wait_for(conn.recv(PREAUTH_LIMITS), limits.HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise MeshError("auth", f"no hello within {limits.HELLO_TIMEOUT_S:g} s of connecting",
                            peer=conn.name) from None
        await conn.send(await answer(lambda: handshake.on_hello(hello.header)))
        proof = await conn.recv(PREAUTH_LIMITS)
        await answer(lambda: handshake.on_proof(proof.header))
        if handshake.keys is not None:
            conn.seal(handshake.keys)
        await conn.send({"op": "welcome", "node": welcome()})
        return handshake.hello

    try:
        return await asyncio.wait_for(step(), limits.HANDSHAKE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise MeshError("auth", f"handshake not finished within {limits.HANDSHAKE_TIMEOUT_S:.0f} s", peer=conn.name) from None
    except ProtocolError as exc:
        with contextlib.suppress(Exception):
            await conn.send({"op": "error", "code": exc.wire_code, "message": str(exc)})
        raise MeshError(exc.wire_code, str(exc), peer=conn.name) from None


async def connect_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port`` (every address of the name is tried)."""
    loop = asyncio.get_running_loop()
    name = address_name((host, port))
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), limits.CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        raise PeerLost(name, f"cannot resolve {host}: {exc}") from None
    error: Exception | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), limits.CONNECT_TIMEOUT_S)
            return sock
        except asyncio.TimeoutError:
            sock.close()
            error = TimeoutError(f"no answer within {limits.CONNECT_TIMEOUT_S:.0f} s")
        except OSError as exc:
            sock.close()
            error = exc
    detail = getattr(error, "strerror", None) or str(error)
    raise PeerLost(name, f"cannot connect: {detail}")


async def open_connection(host: str, port: int, key: bytes | None, *, stats: LinkStats | None = None,
                          emulation: LinkEmulation | None = None, hello: dict | None = None,
                          allocator: Allocator | None = None) -> tuple[Connection, dict]:
    """Connect and authenticate; returns the connection and the server's node info.

    A connection the daemon closes before its handshake ends (its admission under a flood of
    half-open connections) is retried with backoff for up to CONNECT_RETRY_S; a refused connect, a
    wrong key or version fail at once."""
    name = address_name((host, port))
    deadline = time.monotonic() + limits.CONNECT_RETRY_S
    delay = limits.CONNECT_RETRY_FIRST_S
    while True:
        sock = await connect_socket(host, port)
        conn = Connection(sock, name, stats=stats, emulation=emulation, allocator=allocator)
        try:
            return conn, await client_handshake(conn, key, hello)
        except PeerLost:
            await conn.close()
            if time.monotonic() + delay > deadline:
                raise
        except BaseException:
            await conn.close()
            raise
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: retrying clients do not move in step
        delay = min(delay * 2, limits.CONNECT_RETRY_MAX_S)


# --- client channel ------------------------------------------------------------------------------


@dataclass
class _Pending:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Channel:
    """Client side of a connection: concurrent requests, their events and replies.

    While requests are outstanding it pings the server; if nothing at all arrives for
    :data:`limits.PEER_SILENCE_TIMEOUT_S`, every outstanding request fails with :class:`PeerLost`.
    """

    def __init__(self, conn: Connection, node: dict | None = None) -> None:
        self.conn = conn
        self.node = node or {}
        self.name = conn.name
        self.rules = ClientRules()
        self._pending: dict[int, _Pending] = {}
        self._error: MeshError | None = None
        self._reader = asyncio.ensure_future(self._read_loop())
        self._pinger = asyncio.ensure_future(self._keepalive())

    @classmethod
    async def connect(cls, host: str, port: int, key: bytes | None, **kw) -> Channel:
        conn, node = await open_connection(host, port, key, **kw)
        return cls(conn, node)

    @property
    def alive(self) -> bool:
        return self._error is None and not self.conn.closed

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self.conn.recv()
                rid = frame.header.get("id")
                route = self.rules.route(frame.header)
                if route == "ping":
                    self.conn.send_control("pong")  # never stop reading to answer
                    continue
                if route == "closing":
                    # The server's reason for closing this connection: what every request here fails with.
                    self._fail(MeshError.from_wire(frame.header, self.name))
                    continue
                if route == "pong":
                    continue
                pending = self._pending.get(rid) if isinstance(rid, int) else None
                if pending is not None:
                    pending.queue.put_nowait(frame)
        except MeshError as exc:
            self._fail(exc)
        except ProtocolError as exc:  # a bad frame or a record that is not the one due: this link is done
            self._fail(MeshError(exc.wire_code, str(exc), peer=self.name))
            self.conn.abort()
        except asyncio.CancelledError:
            self._fail(PeerLost(self.name, "connection closed"))
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for a segment: fail the link, loudly
            log.exception("reading from %s failed", self.name)
            self._fail(PeerLost(self.name, f"reading failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"))
            self.conn.abort()

    async def _keepalive(self) -> None:
        async def silent(seconds: float) -> None:
            self._fail(PeerLost(self.name, f"peer stopped answering ({seconds:.0f} s without a byte)"))
            await self.conn.close()

        await self.conn.heartbeat(lambda: bool(self._pending), silent)

    def _fail(self, exc: MeshError) -> None:
        if self._error is None:
            self._error = exc
        for pending in self._pending.values():
            pending.queue.put_nowait(exc)

    @property
    def idle(self) -> bool:
        """No request of ours is waiting for its answer."""
        return not self._pending

    async def request(self, op: str, fields: dict | None = None, segments: Iterable = (), *,
                      chunks: AsyncIterator[tuple[int, list]] | None = None,
                      on_event: Callable[[Frame], Awaitable[None] | None] | None = None,
                      timeout: float | None = limits.REQUEST_TIMEOUT_S, chunk_timing: SendTiming | None = None) -> Frame:
        """Send a request (and its chunk stream, its sending times added to ``chunk_timing``); return the
        reply frame or raise MeshError."""
        if self._error is not None:
            raise self._error
        rid = self.rules.next_id()
        pending = self._pending[rid] = _Pending()
        deadline = None if timeout is None else time.monotonic() + timeout
        answered = False
        try:
            # A send cancelled while it waits still goes out whole (see Connection.send), so from here
            # on a failure must be followed by ``cancel``.
            await self.conn.send({**(fields or {}), "op": op, "id": rid}, segments)
            if chunks is not None:
                async for index, buffers in chunks:
                    await self.conn.send({"op": "chunk", "id": rid, "index": index}, buffers, timing=chunk_timing)
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(pending.queue.get(), remaining)
                except asyncio.TimeoutError:
                    raise MeshError("peer-lost", f"{op} got no reply within {timeout:.0f} s", peer=self.name) from None
                if isinstance(item, MeshError):
                    raise item
                if item.op == "event":
                    if on_event is not None:
                        result = on_event(item)
                        if asyncio.iscoroutine(result):
                            await result
                    continue
                answered = True
                if item.op == "error":
                    raise MeshError.from_wire(item.header, self.name)
                return item
        except BaseException:
            # We gave up (cancelled, timed out, our chunk stream failed): the server must not keep
            # working, and holding memory, for a request nobody waits for.
            if not answered and self.alive:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.conn.send({"op": "cancel", "id": rid}))
            raise
        finally:
            self._pending.pop(rid, None)

    async def close(self) -> None:
        self._pinger.cancel()
        self._reader.cancel()
        await self.conn.close()
        with contextlib.suppress(BaseException):
            await asyncio.gather(self._reader, self._pinger, return_exceptions=True)


# --- server session ------------------------------------------------------------------------------


class Request:
    """One request being handled on the server: its frame, its chunk stream, and a way to send events."""

    def __init__(self, session: ServerSession, frame: Frame) -> None:
        self.session = session
        self.frame = frame
        self.header = frame.header
        self.id = frame.header["id"]
        self.op = frame.op
        #: Chunk frames this request said will follow; no more are taken (the queue stays bounded:
        #: ServerRules counts them).
        self.announced_chunks = announced_chunks(frame.header)
        self._chunks: asyncio.Queue = asyncio.Queue()
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None

    @property
    def peer(self) -> str:
        return self.session.conn.name

    def _push_chunk(self, frame: Frame) -> None:
        now = time.perf_counter()
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        self.last_chunk_at = now
        self._chunks.put_nowait(frame)

    async def chunks(self, count: int) -> AsyncIterator[Frame]:
        """The ``count`` chunk frames that follow this request, as they arrive."""
        for _ in range(count):
            item = await self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def event(self, fields: dict, segments: Iterable = ()) -> None:
        await self.session.conn.send({**fields, "op": "event", "id": self.id}, segments)


Handler = Callable[[Request], Awaitable[tuple[dict, list]]]


class ServerSession:
    """Server side of one authenticated connection: runs a handler task per request.

    A client that disconnects, or goes silent while its requests run, has them cancelled.
    """

    def __init__(self, conn: Connection, handler: Handler, client: dict,
                 holds: Callable[[], bool] = lambda: False) -> None:
        self.conn = conn
        self.handler = handler
        self.client = client
        #: True while the client owns state here (prepared jobs): its silence then counts too, even
        #: between requests, so that a frozen client does not pin that state until IDLE_TIMEOUT_S.
        self.holds = holds
        #: Whether requests on this connection may hand over CUDA memory (set by the daemon at the
        #: handshake: a GPU daemon with same_host_ipc on, and a client of this same host).
        self.ipc_ok = False
        self.tasks: dict[int, asyncio.Task] = {}
        self.requests: dict[int, Request] = {}
        self.rules = ServerRules()

    async def run(self) -> None:
        watchdog = asyncio.ensure_future(self._watch_silence())
        try:
            while True:
                frame = await self.conn.recv(idle_timeout=limits.IDLE_TIMEOUT_S)
                action = self.rules.receive(frame.header)
                if action.kind == "pong":
                    self.conn.send_control("pong")  # never stop reading to answer
                elif action.kind == "cancel":
                    self.tasks[action.id].cancel()
                elif action.kind == "chunk":
                    self.requests[action.id]._push_chunk(frame)
                elif action.kind == "busy":
                    await self.conn.send({"op": "error", "id": action.id, "code": "busy", "message": action.message})
                elif action.kind == "start":
                    request = Request(self, frame)
                    self.requests[action.id] = request
                    self.tasks[action.id] = asyncio.ensure_future(self._handle(request))
        except (MeshError, ProtocolError) as exc:
            if not isinstance(exc, PeerLost):
                log.warning("closing connection from %s: %s", self.conn.name, exc)
                code = exc.wire_code if isinstance(exc, ProtocolError) else exc.code
                with contextlib.suppress(Exception):
                    await self.conn.send({"op": "error", "id": 0, "code": code, "message": str(exc)})
        except Exception:  # noqa: BLE001 - a bug or resource failure: this connection ends, the daemon lives
            log.exception("connection from %s failed", self.conn.name)
        finally:
            watchdog.cancel()
            for request in self.requests.values():
                request._chunks.put_nowait(PeerLost(self.conn.name, "client disconnected"))
            for task in list(self.tasks.values()):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self.conn.close()

    async def _watch_silence(self) -> None:
        async def silent(seconds: float) -> None:
            log.warning("client %s went silent (%.1f s without a byte) with %d request(s) running; closing its "
                        "connection", self.conn.name, seconds, len(self.tasks))
            for task in list(self.tasks.values()):
                task.cancel()
            self.conn.abort()

        await self.conn.heartbeat(lambda: bool(self.tasks) or self.holds(), silent)

    async def _handle(self, request: Request) -> None:
        try:
            fields, segments = await self.handler(request)
            await self.conn.send({**fields, "op": "reply", "id": request.id}, segments)
        except asyncio.CancelledError:
            pass
        except MeshError as exc:
            with contextlib.suppress(MeshError):
                await self.conn.send({"op": "error", "id": request.id, **exc.to_wire()})
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the daemon
            log.exception("request %s from %s failed", request.op, self.conn.name)
            with contextlib.suppress(MeshError):
                await self.conn.send({"op": "error", "id": request.id, "code": "internal",
                                      "message": f"{type(exc).__name__}: {exc}"})
        finally:
            self.tasks.pop(request.id, None)
            self.requests.pop(request.id, None)
            self.rules.finished(request.id)
