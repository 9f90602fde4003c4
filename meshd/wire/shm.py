"""Same-host shared memory between two daemons: transport ``host-shm``, the fast fallback when CUDA IPC
cannot be used (daemons of other users, containers, ``same_host_ipc = false``).

Loopback TCP moves ~2.9 GB/s (12.9 ms per 36 MiB activation on an H200 host), whether sealed or not;
a device-to-host copy into memory the receiver maps too, and its host-to-device copy out, take about
3 ms together. So the activation crosses host memory once and nothing but a small header crosses TCP.

Setup, once per inbound connection that asks (the receiver owns the region):

1. The sender asks over its authenticated, sealed TCP session: ``shm-offer`` {nbytes}. The receiver
   makes a region with ``memfd_create`` (twice the stream, bounded by ``limits``), seals it against
   shrinking and growing (a peer that could shrink it would SIGBUS whoever reads past the new end),
   maps it (pinned through :mod:`.staging` on a GPU) and answers a random one-use token, the name of
   its abstract Unix socket and the region's id and size.
2. The sender connects to that socket (a thread, never the event loop) and sends the token; the
   receiver checks it (constant time, one use, expiring after ``SHM_TOKEN_TTL_S``) and passes the
   region's descriptor back with SCM_RIGHTS, then closes its own copy. Only a holder of the cluster
   key on this host (in this network namespace: abstract sockets are per namespace) gets the region.
3. The sender checks the descriptor's size and seals, maps and pins it, and takes the two pipe ends
   that come with it (the doorbell's write end, the answer bell's read end).

Per step the sender's compute copies the activation into a run of the region and it sends ``forward``
with ``shm`` {region, offset, nbytes, shape, dtype, return} instead of a chunk stream; the receiver
checks the bounds against its own region and its compute copies the bytes out ahead of its blocks.

The region comes with a doorbell: the write end of a pipe, passed with the memfd (:class:`Bell`; the
receiver keeps the read end, :class:`Doorbell`). A head sends its ``forward`` while its blocks still
run (a middle stage before its blocks), with ``ring`` N in ``shm``; the stage checks and prepares
everything for that step at once, and starts its compute when token N arrives on the pipe, which
the sender's GPU worker writes as soon as the stream is in the run (its copy synchronised). So
neither event loop, nor the sealed frame, nor the stage's request handling stands between the
sender's last kernel and the stage's first.
With ``return`` the prediction comes back in the same run (``prediction_shm``), not over TCP; for a
forward sent ahead the stage also rings the forward's token back on the region's answer bell (a
second pipe, whose read end goes to the sender with the memfd) once the prediction is there, and
the head goes on with it before the reply, which follows with the hop records. A run
is reused only after the reply: the receiver answers a forward only after it is done with the run,
so request/response order on the one connection rules out a write over bytes still in use; a
forward the sender gave up on retires the region (:meth:`ShmSender.arena`). Any failure in the
setup is logged in one line and the link uses TCP until the setup is tried again (after
``SHM_RETRY_S``, doubling up to ``SHM_RETRY_MAX_S``); a failed transport degrades the link, never a
generation. (The copies: :mod:`meshd.pipeline.streaming`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hmac
import itertools
import logging
import math
import mmap
import os
import secrets
import select
import socket
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

from codec.header import dtype_name

from .. import limits
from ..errors import MeshError
from ..fields import wire_int
from . import staging

log = logging.getLogger(__name__)

#: What the receiver requires of a region before it maps one (and the sender before it writes one).
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW if hasattr(fcntl, "F_SEAL_SHRINK") else 0
#: Abstract socket names: "\0" + this prefix + the node id and a random part.
SOCKET_PREFIX = "meshd-shm-"
_OK = b"OK"


class ShmUnavailable(RuntimeError):
    """This setup step cannot work here (no memfd, no abstract socket, a refusal, a bad descriptor).
    ``lasting``: asking again soon cannot help (another network namespace, another meshd version, a
    peer that hands out what no region is), as opposed to a peer busy for now."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


def region_bytes(stream_bytes: int) -> int:
    """The size of a region for streams of ``stream_bytes``: room for two at once (two generations
    interleaving on one link), in whole staging pages, never above ``MAX_SHM_REGION_BYTES``."""
    if not 0 < stream_bytes <= limits.MAX_SHM_REGION_BYTES:
        raise ShmUnavailable(f"a stream of {stream_bytes} bytes is outside 1..{limits.MAX_SHM_REGION_BYTES} "
                             "(MAX_SHM_REGION_BYTES)")
    pages = math.ceil(stream_bytes / staging.PAGE_BYTES)
    return min(2 * pages * staging.PAGE_BYTES, limits.MAX_SHM_REGION_BYTES)  # the limit is whole pages


def make_region(nbytes: int) -> tuple[int, mmap.mmap]:
    """A sealed memfd of exactly ``nbytes`` and our mapping of it; returns (fd, mapping)."""
    if not hasattr(os, "memfd_create") or not _SEALS:
        raise ShmUnavailable("this system has no sealable memfd (Linux only)")
    try:
        fd = os.memfd_create("meshd-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise ShmUnavailable(f"memfd_create failed: {exc.strerror}") from None
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        return fd, mmap.mmap(fd, nbytes)
    except OSError as exc:
        os.close(fd)
        raise ShmUnavailable(f"cannot size, seal or map a {nbytes >> 20} MiB region: {exc.strerror}") from None


#: A doorbell token: the number the sender gave the stream it rang for, 8 bytes little-endian (a write
#: of PIPE_BUF bytes or fewer to a pipe is atomic, so tokens never interleave).
_TOKEN = struct.Struct("<Q")
#: Tokens rung before their forward arrived that the receiver keeps (a sender's own frames are late,
#: not lost; a sender ringing for nothing only pushes out its own oldest tokens).
RUNG_KEPT = 64


class Bell:
    """The sending end of a region's doorbell: the pipe's write end, non-blocking.

    The descriptor is closed only when nothing can ring any more (this object is garbage: the sender
    let the region go and no run of it is left), never while a run's compute may still ring: a
    number closed and reused meanwhile would take the 8 bytes into another file."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        weakref.finalize(self, os.close, fd)

    def token(self) -> int:
        with self._lock:
            return next(self._tokens)

    def ring(self, token: int) -> None:
        """Tell the receiver that the stream of ``token`` is in its run (from any thread). A pipe the
        receiver closed (its region dropped) or stopped reading raises OSError: its forward is then
        answered with an error, or not at all, and the sender's own wait decides."""
        with self._lock:
            os.write(self._fd, _TOKEN.pack(token))

    def notify(self, token: int) -> None:
        """:meth:`ring`, where a peer that cannot take it is only logged: gone (its end closed with its
        process or connection) or no longer reading. The wait on the other side (its forward's reply, or
        its stage's timeout) then says so, naming that peer."""
        try:
            self.ring(token)
        except OSError as exc:
            log.info("the shared region's doorbell did not take token %d: %s", token, exc.strerror or exc)


def make_bell_pipe() -> tuple[int, int]:
    """(read end, write end) of a doorbell pipe, close-on-exec."""
    try:
        return os.pipe2(os.O_CLOEXEC)
    except OSError as exc:
        raise ShmUnavailable(f"cannot make a doorbell pipe: {exc.strerror}") from None


def _pipe_end(fd: int, what: str, mode: int, end: str) -> int:
    """A copy of a descriptor a peer handed us as ``what``, after checking it is the ``end`` of a pipe."""
    try:
        kind, flags = os.fstat(fd).st_mode, fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise ShmUnavailable(f"the received {what} is not a descriptor: {exc.strerror}", lasting=True) from None
    if not stat.S_ISFIFO(kind) or flags & os.O_ACCMODE != mode:
        raise ShmUnavailable(f"the received {what} is not the {end} of a pipe", lasting=True)
    return os.dup(fd)


def bell_from(fd: int) -> Bell:
    """A descriptor a peer handed us as its region's doorbell, after checking it is a pipe we can only
    write to."""
    return Bell(_pipe_end(fd, "doorbell", os.O_WRONLY, "write end"))


def answers_from(fd: int, name: str) -> Doorbell:
    """A descriptor a peer handed us as its region's answer bell (it rings when a prediction is back
    in a run), after checking it is a pipe we can only read."""
    return Doorbell(_pipe_end(fd, "answer bell", os.O_RDONLY, "read end"), name, peer="receiver")


class Doorbell:
    """The receiving end of a region's doorbell: a thread reads the pipe and wakes the forward waiting
    for each token (:meth:`wait`); a token that arrives first is kept for its forward (the last
    :data:`RUNG_KEPT`). Reads are bounded; the pipe carries nothing but tokens, and a token only wakes
    the forward of the same connection that names it. Ends with :meth:`close` (the region is dropped
    or replaced) or when the ``peer`` that rings closes its end; either fails the forwards still waiting.

    A region has two: the receiver's (the sender rings when a stream is in its run) and the sender's
    answer bell (the receiver rings the same token when the prediction is back in that run)."""

    def __init__(self, fd: int, name: str, peer: str = "sender") -> None:
        self._fd = fd
        self._peer = peer
        self._lock = threading.Lock()
        self._rung: OrderedDict[int, float] = OrderedDict()  # token -> when it was read (time.monotonic)
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ended: str | None = None
        self._thread = threading.Thread(target=self._serve, name=f"doorbell {name}", daemon=True)
        self._thread.start()

    def wait(self, token: int) -> asyncio.Future:
        """A future (of the running loop) done when ``token`` has rung, with the time.monotonic() at
        which this side read it; failing with a ``peer-lost`` MeshError once the doorbell has ended.
        Cancelling it stops the wait."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if token in self._rung:
                future.set_result(self._rung.pop(token))
            elif self._ended is not None:
                future.set_exception(MeshError("peer-lost", self._ended))
            elif token in self._waiting:
                future.set_exception(MeshError("bad-request", f"shm ring={token} is awaited by another forward"))
            else:
                self._waiting[token] = (loop, future)
                future.add_done_callback(lambda f: self._forget(token, f))
        return future

    def _forget(self, token: int, future: asyncio.Future) -> None:
        with self._lock:
            if self._waiting.get(token, (None, None))[1] is future:
                del self._waiting[token]

    def close(self) -> None:
        """The region is gone: no forward waits on this doorbell any more (the thread ends within its
        poll interval and closes the pipe)."""
        self._end("the shared region this forward's stream was in is gone")

    def _end(self, why: str) -> None:
        with self._lock:
            if self._ended is None:
                self._ended = why
            waiting, self._waiting = list(self._waiting.values()), {}
        for loop, future in waiting:
            loop.call_soon_threadsafe(_fail, future, MeshError("peer-lost", why))

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        pending = b""
        try:
            while self._ended is None:
                if not poller.poll(limits.SHM_DOORBELL_POLL_S * 1000):
                    continue
                data = os.read(self._fd, 512 * _TOKEN.size)
                if not data:
                    self._end(f"the {self._peer} closed the shared region's doorbell")
                    return
                pending += data
                whole = len(pending) - len(pending) % _TOKEN.size
                read_at = time.monotonic()
                for (token,) in _TOKEN.iter_unpack(pending[:whole]):
                    self._rang(token, read_at)
                pending = pending[whole:]
        except OSError as exc:
            self._end(f"the shared region's doorbell failed: {exc.strerror or exc}")
        finally:
            os.close(self._fd)

    def _rang(self, token: int, read_at: float) -> None:
        with self._lock:
            loop, future = self._waiting.pop(token, (None, None))
            if future is None:
                self._rung[token] = read_at
                while len(self._rung) > RUNG_KEPT:
                    self._rung.popitem(last=False)
        if future is not None:
            loop.call_soon_threadsafe(_settle, future, read_at)


def _settle(future: asyncio.Future, value=None) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def map_region(fd: int, nbytes: int) -> mmap.mmap:
    """Map a region a peer handed us, after checking that it is what was announced and that it can no
    longer shrink (or grow) under our mapping. The mapping holds its own reference to the memory."""
    try:
        size = os.fstat(fd).st_size
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ShmUnavailable(f"the received descriptor is not a sealable memfd: {exc.strerror}", lasting=True) from None
    if size != nbytes:
        raise ShmUnavailable(f"the received region has {size} bytes; the offer said {nbytes}", lasting=True)
    if seals & _SEALS != _SEALS:
        raise ShmUnavailable("the received region is not sealed against shrinking and growing", lasting=True)
    try:
        return mmap.mmap(fd, nbytes)
    except OSError as exc:
        raise ShmUnavailable(f"cannot map the received region: {exc.strerror}") from None


def region_arena(memory: mmap.mmap, name: str, device: torch.device) -> staging.PinnedArena:
    """A mapped region as a staging arena: pinned (driver-registered) for a GPU, plain for a CPU daemon."""
    try:
        return staging.PinnedArena(len(memory), pin=device.type == "cuda", name=name, device=device, memory=memory)
    except staging.PinningUnavailable as exc:
        raise ShmUnavailable(str(exc)) from None


@dataclass
class Inbound:
    """A region this daemon made for one inbound connection."""

    id: int
    arena: staging.PinnedArena
    doorbell: Doorbell  # the sender rings a forward's token here once its stream is in the run
    answer: Bell  # rung with a forward's token once its prediction is back in its run

    def close(self) -> None:
        self.doorbell.close()
        self.arena.close()  # unregistered once the last receive that reads it lets go


@dataclass
class _Offer:
    token: bytes
    fd: int
    bell: int  # the doorbell pipe's write end, passed with the region
    answers: int  # the answer bell's read end, passed with it too
    session: object
    expires: float

    def close(self) -> None:
        for fd in (self.fd, self.bell, self.answers):
            os.close(fd)


class ShmServer:
    """The receiving daemon's side: the regions per inbound connection, the offers not yet claimed, and
    the abstract Unix socket (with its thread) over which a claimed offer's descriptor leaves.

    ``offer`` and ``drop`` run on the event loop's executor or the loop; the socket thread only checks
    tokens and passes descriptors. ``_lock`` guards the offers and the regions between them."""

    def __init__(self, node_id: str, device: torch.device) -> None:
        self.node_id = node_id
        self.device = device
        self._regions: dict[object, Inbound] = {}
        self._offers: list[_Offer] = []
        self._reserved: dict[object, int] = {}  # bytes of offers being made, outside the lock
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.name = ""  # the socket's abstract name without the leading NUL, once listening

    # --- the event loop's side ----------------------------------------------------------------

    def offer(self, session, stream_bytes: int) -> dict:
        """Make a region for ``session``'s streams of ``stream_bytes`` and an offer of it (blocking: run
        in an executor). Replaces the session's previous region: the sender asks again only when its
        runs of the old one are all back, i.e. every forward that used it has been answered."""
        nbytes = region_bytes(stream_bytes)
        claim = object()  # this call's reservation: counted against the caps until it is a region
        with self._lock:
            if self._closed:
                raise ShmUnavailable("the daemon is shutting down")
            held = sum(r.arena.nbytes for s, r in self._regions.items() if s is not session)
            held += sum(self._reserved.values())
            if held + nbytes > limits.MAX_SHM_TOTAL_BYTES:
                raise ShmUnavailable(f"{held >> 20} MiB of shared regions are held already; another "
                                     f"{nbytes >> 20} MiB would pass MAX_SHM_TOTAL_BYTES")
            self._expire(time.monotonic())
            waiting = len(self._offers) + len(self._reserved)
            if waiting >= limits.MAX_SHM_OFFERS:
                raise ShmUnavailable(f"{waiting} offers are waiting to be claimed (MAX_SHM_OFFERS)")
            self._reserved[claim] = nbytes
        try:
            self._listen()
            with contextlib.ExitStack() as undo:  # what is made here goes again if a later step fails
                fd, memory = make_region(nbytes)
                undo.callback(os.close, fd)
                arena = region_arena(memory, f"shm-in {self.node_id[:8]}", self.device)
                undo.callback(arena.close)
                bell_in, bell_out, answers_in, answers_out = self._pipes(undo)
                token = secrets.token_bytes(limits.SHM_TOKEN_BYTES)
                offer = _Offer(token, fd, bell_out, answers_in, session, time.monotonic() + limits.SHM_TOKEN_TTL_S)
                with self._lock:
                    if self._closed:
                        raise ShmUnavailable("the daemon is shutting down")
                    undo.pop_all()  # the offer and the region own them from here
                    ident = next(self._ids)
                    region = Inbound(ident, arena, Doorbell(bell_in, f"shm-in {ident}"), Bell(answers_out))
                    old = self._regions.get(session)
                    self._regions[session] = region
                    self._withdraw(session)  # an older unclaimed offer of this session's is void now
                    self._offers.append(offer)
                    del self._reserved[claim]  # counted as the region and the offer from here on
        finally:
            with self._lock:
                self._reserved.pop(claim, None)
        if old is not None:
            old.close()
        return {"token": token, "socket": self.name, "region": region.id, "nbytes": nbytes}

    @staticmethod
    def _pipes(undo: contextlib.ExitStack) -> tuple[int, int, int, int]:
        """The doorbell's and the answer bell's pipes: (bell read, bell write, answers read, answers
        write), each end closed by ``undo`` unless it is popped."""
        ends = []
        for _ in range(2):
            for end in make_bell_pipe():
                undo.callback(os.close, end)
                ends.append(end)
        return tuple(ends)

    def region(self, session) -> Inbound | None:
        with self._lock:
            return self._regions.get(session)

    def drop(self, session) -> None:
        """``session`` ended: its region and any offer it did not claim go."""
        with self._lock:
            region = self._regions.pop(session, None)
            self._withdraw(session)
        if region is not None:
            region.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            regions, self._regions = list(self._regions.values()), {}
            for offer in self._offers:
                offer.close()
            self._offers.clear()
            listener, self._listener = self._listener, None
        for region in regions:
            region.close()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _withdraw(self, session) -> None:  # with _lock held
        for offer in [o for o in self._offers if o.session is session]:
            self._offers.remove(offer)
            offer.close()

    def _expire(self, now: float) -> None:  # with _lock held
        for offer in [o for o in self._offers if o.expires <= now]:
            self._offers.remove(offer)
            offer.close()

    def _listen(self) -> None:
        """Bind the abstract socket and start its thread, on the first offer."""
        with self._lock:
            if self._listener is not None:
                return
            if not hasattr(socket, "AF_UNIX") or not hasattr(socket, "send_fds"):
                raise ShmUnavailable("this system cannot pass descriptors over Unix sockets")
            name = f"{SOCKET_PREFIX}{self.node_id}-{secrets.token_hex(8)}"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind("\0" + name)
                listener.listen(16)
            except OSError as exc:
                listener.close()
                raise ShmUnavailable(f"cannot listen on an abstract Unix socket: {exc.strerror}") from None
            self._listener, self.name = listener, name
            self._thread = threading.Thread(target=self._serve, args=(listener,), name="shm-fds", daemon=True)
            self._thread.start()

    # --- the socket thread --------------------------------------------------------------------

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._listener is not listener:  # closed by close(): the daemon stops
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)  # out of descriptors: back off, keep serving
                continue
            with conn:
                try:
                    self._answer(conn)
                except OSError as exc:  # the peer went away mid-way, or stalled past the timeout
                    log.info("shared memory: a claim on %s failed: %s", self.name, exc.strerror or exc)
                except Exception:  # noqa: BLE001 - a bug here must not end the claims of every later peer
                    log.exception("shared memory: a claim on %s failed", self.name)

    def _answer(self, conn: socket.socket) -> None:
        """One claim: exactly SHM_TOKEN_BYTES of token in, the descriptor (or one line of refusal) out.
        Reads are bounded in bytes and time, so a peer that sends anything, or nothing, costs us one
        short conversation; every refusal is logged in one line and told to the peer in one line."""
        conn.settimeout(limits.SHM_SOCKET_TIMEOUT_S)
        token = b""
        while len(token) < limits.SHM_TOKEN_BYTES:
            piece = conn.recv(limits.SHM_TOKEN_BYTES - len(token))
            if not piece:
                break
            token += piece
        offer = self._claim(token) if len(token) == limits.SHM_TOKEN_BYTES else None
        if offer is None:
            why = ("unknown, used or expired token" if len(token) == limits.SHM_TOKEN_BYTES
                   else f"expected a {limits.SHM_TOKEN_BYTES}-byte token, got {len(token)} bytes")
            log.warning("shared memory: refused a claim on %s: %s", self.name, why)
            conn.sendall(f"refused: {why}\n".encode())
            return
        try:
            socket.send_fds(conn, [_OK], [offer.fd, offer.bell, offer.answers])
        finally:
            offer.close()  # one use: from now on only the two mappings reach the region

    def _claim(self, token: bytes) -> _Offer | None:
        with self._lock:
            self._expire(time.monotonic())
            found = None
            for offer in self._offers:  # every offer is compared (constant time each), not the first match
                if hmac.compare_digest(offer.token, token):
                    found = offer
            if found is not None:
                self._offers.remove(found)
            return found


def claim(name: str, token: bytes, nbytes: int) -> tuple[mmap.mmap, Bell, Doorbell]:
    """The sender's side of step 2: fetch the offered region's descriptor and map it, and take its
    doorbell and its answer bell (blocking)."""
    if not (isinstance(name, str) and name.startswith(SOCKET_PREFIX) and len(name) < 100 and "\0" not in name):
        raise ShmUnavailable(f"the offer names no meshd socket ({name!r:.60})", lasting=True)
    if not isinstance(token, bytes) or len(token) != limits.SHM_TOKEN_BYTES:
        raise ShmUnavailable("the offer's token is not 32 bytes", lasting=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(limits.SHM_SOCKET_TIMEOUT_S)
        try:
            sock.connect("\0" + name)
            sock.sendall(token)
            message, fds, flags, _ = socket.recv_fds(sock, 256, 3)
        except OSError as exc:  # another network namespace has no such socket: ECONNREFUSED
            raise ShmUnavailable(f"cannot reach the peer's socket: {exc.strerror or exc}",
                                 lasting=exc.errno in (errno.ECONNREFUSED, errno.ENOENT)) from None
        try:
            if message == _OK and (len(fds) != 3 or flags & socket.MSG_CTRUNC):
                more = " or more" if flags & socket.MSG_CTRUNC else ""
                raise ShmUnavailable(f"the peer sent {len(fds)}{more} descriptor(s), not a region and its two "
                                     "doorbells (a meshd of another version?)", lasting=True)
            if message != _OK:
                said = message.decode(errors="replace").strip()[:200] or "no descriptor"
                raise ShmUnavailable(f"the peer refused the claim: {said}")
            bell = bell_from(fds[1])
            answers = answers_from(fds[2], f"shm-out {name[len(SOCKET_PREFIX):][:12]}")
            try:
                return map_region(fds[0], nbytes), bell, answers
            except BaseException:
                answers.close()
                raise
        finally:
            for fd in fds:
                os.close(fd)


class SharedRegion(NamedTuple):
    """A region a next stage gave the sender: its id on that connection, its runs, its doorbell, and
    the answer bell the next stage rings when a prediction is back in a run."""

    id: int
    arena: staging.PinnedArena
    bell: Bell
    answers: Doorbell

    def close(self) -> None:
        self.answers.close()
        self.arena.close()  # unregistered once the runs still in flight are back


class ShmSender:
    """The sending daemon's side for one next peer: the region it was given on the current connection.

    The region belongs to one TCP connection (the receiver drops it with the session), so a reconnect
    asks again. ``arena`` returns None when the region cannot be had or grown now; that step then goes
    over TCP. A setup that failed is asked for again only when a link is chosen (a generation's
    prepare, ``retry``), never in a step's way: after ``SHM_RETRY_S``, doubling after each failure in a
    row up to ``SHM_RETRY_MAX_S`` (the peer's caps may be full for a while), or after that longest wait
    at once where asking again soon cannot help (another network namespace, another meshd version, a
    peer with shared memory switched off). A setup that failed because the connection ended is no
    failure of shared memory: the next connection asks at once. The log has one line when it fails
    for a new reason and one when it works again."""

    def __init__(self, peer: str, device: torch.device) -> None:
        self.peer = peer
        self.device = device
        self.failed: str | None = None  # why the last setup failed (None: it did not, or none was tried)
        self._retry_s = 0.0  # the wait before the next setup after a failure
        self._retry_at = 0.0  # (time.monotonic) no setup before this
        self._closed = False
        self._conn = None
        self._region: SharedRegion | None = None
        self._lock = asyncio.Lock()

    async def arena(self, channel, stream_bytes: int, *, retry: bool = False) -> SharedRegion | None:
        async with self._lock:
            if self._closed or (self.failed is not None and not (retry and time.monotonic() >= self._retry_at)):
                return None
            if self._conn is not channel.conn or channel.conn.closed:
                self._retire()  # the receiver dropped the region with the old connection
            current = self._region
            if current is not None and current.arena.closed:
                # A forward through it was given up (send_shared): its runs are never handed out again,
                # and a new region is asked for once the forwards still in flight through it are answered
                # (the receiver refuses the old region's id from then on). TCP meanwhile.
                if current.arena.live_runs:
                    return None
                self._retire()
                current = None
            if current is not None and current.arena.nbytes >= stream_bytes:
                return current
            if current is not None and current.arena.live_runs:
                return None  # a forward through the old region is unanswered: grow after it, TCP now
            self._retire()  # (too small, and idle: its answer bell's thread ends too)
            try:
                region = await self._setup(channel, stream_bytes)
            except (ShmUnavailable, MeshError) as exc:
                if not channel.conn.closed:  # (else the connection's end said it; the next one asks again)
                    self._failed(exc.message if isinstance(exc, MeshError) else str(exc),
                                 lasting=exc.code == "bad-request" if isinstance(exc, MeshError) else exc.lasting)
                return None
            if self._closed:  # (closed while it was set up: the daemon stops)
                region.close()
                return None
            if self.failed is not None:
                log.info("shared memory to %s works again", self.peer)
            self.failed, self._retry_s = None, 0.0
            self._region, self._conn = region, channel.conn
            return region

    def _failed(self, why: str, *, lasting: bool) -> None:
        retry = limits.SHM_RETRY_MAX_S if lasting else 2 * self._retry_s
        self._retry_s = min(max(retry, limits.SHM_RETRY_S), limits.SHM_RETRY_MAX_S)
        self._retry_at = time.monotonic() + self._retry_s
        # One line for a reason not said before; the same one again only at debug level.
        level = logging.DEBUG if why == self.failed else logging.INFO
        log.log(level, "shared memory to %s unavailable (%s); the link uses TCP (asked again in %.0f s)",
                self.peer, why, self._retry_s)
        self.failed = why

    async def _setup(self, channel, stream_bytes: int) -> SharedRegion:
        reply = await channel.request("shm-offer", {"nbytes": stream_bytes}, timeout=limits.SHM_SETUP_TIMEOUT_S)
        h = reply.header
        region, nbytes = h.get("region"), h.get("nbytes")
        if (wire_int(region) is None or wire_int(nbytes) is None
                or not stream_bytes <= nbytes <= limits.MAX_SHM_REGION_BYTES or nbytes % staging.PAGE_BYTES):
            raise ShmUnavailable(f"the peer's offer is malformed (region {region!r:.20}, {nbytes!r:.20} bytes)",
                                 lasting=True)
        loop = asyncio.get_running_loop()
        claiming = loop.run_in_executor(None, claim, h.get("socket"), h.get("token"), nbytes)
        try:
            memory, bell, answers = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # Given up while the claim runs on its thread: what it brings back is let go once it is back
            # (the answer bell's thread would otherwise live on).
            claiming.add_done_callback(_close_claimed)
            raise
        try:
            arena = await loop.run_in_executor(None, region_arena, memory, f"shm-out {self.peer}", self.device)
        except BaseException:
            answers.close()
            raise
        return SharedRegion(region, arena, bell, answers)

    def _retire(self) -> None:
        if self._region is not None:
            self._region.close()
        self._region, self._conn = None, None

    def close(self) -> None:
        self._closed = True
        self._retire()


def _close_claimed(claiming: asyncio.Future) -> None:
    if not claiming.cancelled() and claiming.exception() is None:
        claiming.result()[2].close()


def check_descriptor(desc: object, region: Inbound | None, shape, dtype: torch.dtype) -> tuple[int, int]:
    """A forward's ``shm`` field against this connection's region and the input the stage expects;
    returns (offset, nbytes). Every way it can be wrong is a ``bad-request`` naming the field."""
    if region is None:
        raise MeshError("bad-request", "shm input on a connection that holds no shared region (no shm-offer here)")
    if not isinstance(desc, dict):
        raise MeshError("bad-request", "shm must be a map of region, offset, nbytes, shape and dtype")
    values = {}
    for name in ("region", "offset", "nbytes"):
        v = wire_int(desc.get(name))
        if v is None:
            raise MeshError("bad-request", f"shm {name}={desc.get(name)!r:.20} must be an integer")
        values[name] = v
    if values["region"] != region.id:
        raise MeshError("bad-request", f"shm region {values['region']} is not this connection's (region {region.id})")
    if desc.get("dtype") != dtype_name(dtype):  # the stage's own dtype, by codec's wire name
        raise MeshError("mismatch", f"shm input is {desc.get('dtype')!r:.20}; this stage computes in {dtype}")
    if desc.get("shape") != list(shape):
        raise MeshError("mismatch", f"shm input has shape {desc.get('shape')!r:.60}; this stage expects {list(shape)}")
    offset, nbytes = values["offset"], values["nbytes"]
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise MeshError("bad-request", f"shm nbytes={nbytes} is not the size of a {list(shape)} {dtype} tensor")
    if offset % limits.SHM_ALIGN or not 0 <= offset <= region.arena.nbytes - nbytes:
        raise MeshError("bad-request", f"shm bytes {offset}..{offset + nbytes} are not a {limits.SHM_ALIGN}-aligned "
                                       f"range of the {region.arena.nbytes}-byte region")
    return offset, nbytes
