"""The asyncio side of the protocol: moves the bytes that :mod:`meshd.wire` makes and reads.

:class:`Connection` only moves frames: plain ones during the handshake, sealed records after it
(:mod:`meshd.wire.seal`); big segments go through :mod:`.bulk`'s threads. Reads are sliced so that
progress is observable and a stalled peer times out; every send has a progress deadline, so that a
peer that stops reading is lost within seconds. :func:`client_handshake` / :func:`server_handshake`
drive :mod:`meshd.wire.handshake`. Requests over a connection are :mod:`.channel`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .. import limits
from ..errors import AuthRefused, MeshError, PeerLost
from . import seal as sealing
from . import bulk, staging
from .bulk import ReceiveTiming, SendTiming
from .frames import (DEFAULT_LIMITS, LENGTH, PREAUTH_LIMITS, PREFIX, Frame, FrameLimits, FrameReader, ProtocolError,
                     encode_frame)
from .handshake import ClientHandshake, ServerHandshake
from .link import LinkEmulation, LinkStats, TokenBucket

log = logging.getLogger(__name__)

#: Largest piece handed to one send call under link emulation (pacing granularity).
PACE_SLICE = 256 * 1024
#: Segments at least this big are received into buffers from the connection's allocator (the
#: daemon's hook for where big segments land), smaller ones into plain bytearrays.
BIG_SEGMENT = 1 << 20

Allocator = Callable[[int], Any]

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

    def _ring(self, which: str, count: int = bulk.RECORDS_IN_FLIGHT) -> list[bytearray]:
        """At least ``count`` record-sized buffers for one direction, made when a segment first needs
        them: one for segments sealed on the event loop, bulk.RECORDS_IN_FLIGHT once a big one went through
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
        # Not derivable from ``inbound.current``: a stream too big for any arena turns staging off
        # for this stream while the existing (smaller) arena stays for the next ones.
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
                    await self._loop.run_in_executor(bulk.BULK_IO, bulk.send_all, self.sock, view,
                                                     limits.SEND_PROGRESS_TIMEOUT_S)
                    timing.send_s += time.perf_counter() - t0
                    total += len(view)
                else:
                    total += await self._loop.run_in_executor(bulk.BULK_IO, bulk.send_sealed, self.sock, view,
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
            if await self._in_thread(bulk.recv_into, view) < len(view):
                raise PeerLost(self.name, "connection closed by peer")
            if timing is not None:
                timing.recv_s += time.perf_counter() - t0
            if self.stats:
                self.stats.received(len(view))
            return
        with self._using_socket():
            await self._read_socket(view, idle_timeout)

    async def _in_thread(self, fn, *args) -> int:
        """Run a bulk receive on an I/O thread; its failures become PeerLost (SealError passes through)."""
        with self._using_socket():
            try:
                return await self._loop.run_in_executor(bulk.BULK_IO, fn, self.sock, *args, self._progress,
                                                        limits.FRAME_PROGRESS_TIMEOUT_S)
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
                received = await self._in_thread(bulk.recv_sealed, view, opener, self._ring("recv"),
                                                 self._helper("recv"), timing)
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


class HandshakeExpired(AuthRefused, code=None):
    """The daemon's side of a handshake ran past ``PREAUTH_TIMEOUT_S`` (a slow or stalled client, or
    a flood holding slots): routine, where a refused proof is not."""


async def server_handshake(conn: Connection, key: bytes | None, welcome: Callable[[], dict]) -> dict:
    """Authenticate a client; on failure send it an error naming the cause and raise.

    The whole exchange (hello in, challenge out, proof in, welcome out) has one deadline,
    ``PREAUTH_TIMEOUT_S`` from the call: how long a connection without the key may hold a slot.
    ``key`` None means the daemon runs ``--insecure`` (loudly): any client is let in, unsealed.
    """
    handshake = ServerHandshake(key, conn.name)
    heard = False

    async def answer(reply: Callable[[], dict | None]) -> dict | None:
        try:
            return reply()
        except MeshError as exc:
            with contextlib.suppress(Exception):
                await conn.send({"op": "error", "code": exc.code, "message": exc.message})
            raise

    async def step() -> dict:
        nonlocal heard
        hello = await conn.recv(PREAUTH_LIMITS)
        heard = True
        await conn.send(await answer(lambda: handshake.on_hello(hello.header)))
        proof = await conn.recv(PREAUTH_LIMITS)
        await answer(lambda: handshake.on_proof(proof.header))
        if handshake.keys is not None:
            conn.seal(handshake.keys)
        await conn.send({"op": "welcome", "node": welcome()})
        return handshake.hello

    try:
        return await asyncio.wait_for(step(), limits.PREAUTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        what = "handshake not over" if heard else "no hello"
        expired = HandshakeExpired(f"{what} within {limits.PREAUTH_TIMEOUT_S:g} s of connecting", peer=conn.name)
        if not conn.closed and not conn.sealed:  # tell a client that is merely slow why it is closed
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.send({"op": "error", **expired.to_wire()}), 0.5)
        raise expired from None
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
