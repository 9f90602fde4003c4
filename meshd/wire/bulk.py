"""Big segments through the socket on threads: plain blocking-style system calls, sealed records cut
and opened beside the writes and reads, and the timings each part took.

A connection (:mod:`.connection`) hands a segment of at least ``BIG_SEGMENT`` bytes here and awaits the
thread; only the connection's single reader (or the holder of its write lock) touches the socket
meanwhile, so this never races the event loop.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass

from . import seal as sealing
from .frames import Frame

log = logging.getLogger(__name__)

#: Big segments move (and are sealed and opened) on these threads with plain blocking-style system
#: calls: several times the throughput of the event loop's per-call overhead (loopback: ~3 GB/s vs
#: ~1.2 GB/s measured on a 2-core machine), and the loop stays free meanwhile. Only the connection's
#: single reader (or the holder of its write lock) touches the socket at a time, so this never races
#: the loop.
BULK_IO = ThreadPoolExecutor(8, thread_name_prefix="bulk-io")


def recv_into(sock: socket.socket, view: memoryview, progress: Callable[[], None], timeout: float) -> int:
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


def send_all(sock: socket.socket, view: memoryview, timeout: float) -> None:
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


def send_sealed(sock: socket.socket, view: memoryview, sealer: sealing.Sealer, ring: list[bytearray],
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
            send_all(sock, record, timeout)
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


def recv_sealed(sock: socket.socket, view: memoryview, opener: sealing.Opener, ring: list[bytearray],
                opener_thread: ThreadPoolExecutor, timing: ReceiveTiming, progress: Callable[[], None],
                timeout: float) -> int:
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
            count = recv_into(sock, record, progress, timeout)
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
