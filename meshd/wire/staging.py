"""Pinned host staging for the TCP path: page-locked memory a link direction holds for its whole life.

When two stages cannot share GPU memory (other users, containers, other hosts) the activation crosses
host memory. Through pageable memory every device copy is synchronous and stages through the driver's
own bounce buffer (~3 ms per 36 MiB on an H200); through page-locked memory it is one DMA at PCIe
speed (~0.7 ms) that runs on a side stream while the bytes before it are sealed and sent.

The memory is *ours*, never torch's: an anonymous mapping (or a shared region another process maps too,
:mod:`meshd.wire.shm`) registered with the CUDA driver once (``cuMemHostRegister``),
when a connection first needs it, and unregistered only when the connection is gone and nothing
points into it. Pinned blocks from torch's caching host allocator were tried before and crashed the
daemons on the GPU machine (cudaErrorInvalidResourceHandle once blocks freed on I/O threads were
recycled): here nothing is ever returned to an allocator that records CUDA events. A :class:`PinnedArena`
has one owner thread, which registers and unregisters its memory and issues the TCP path's copies
into and out of it; the I/O threads only read and write bytes that the owner has declared complete.
A shared region's runs (:mod:`meshd.wire.shm`) are also copied into and out of by the GPU worker,
inside the compute that makes or uses the stream (``SharedRun.place``, ``StageInput.take`` in
:mod:`meshd.pipeline.streaming`): registration is the context's, not a thread's, and the compute's
closure keeps the run referenced (so registered) until the worker has synchronised its stream.

An arena hands out page runs as numpy arrays; a run returns to the arena when the last reference to
its array (a memoryview, a tensor over it, a received frame) is gone, so a buffer cannot be reused
while anything can still read it. Whoever issues an asynchronous copy keeps the array referenced
until the copy has finished (the sender waits for each chunk's event before handing it out; the
receiver's ChunkDecoder keeps its buffers until ``result`` synchronises).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

#: Allocation granularity of an arena (a sealed record's worth: chunks are whole records but the last).
PAGE_BYTES = 1 << 20
#: Size of one link direction's arena unless a single tensor needs more: a klein-9B 1024x1024 stream
#: (36 MiB) with room for the next one's first chunks, or a dev stream (54 MiB).
ARENA_BYTES = 64 << 20
#: Largest arena a link direction may pin (page-locked memory is taken from everything else on the host).
MAX_ARENA_BYTES = 1 << 30
#: CU_MEMHOSTREGISTER_PORTABLE: the memory counts as pinned in every CUDA context of the process.
_REGISTER_PORTABLE = 1


class PinningUnavailable(RuntimeError):
    """Page-locked host memory cannot be had here (no CUDA, a locked-memory limit, a VM that refuses)."""


_said: set[str] = set()
_said_lock = threading.Lock()


def say_once(reason: str) -> None:
    """Log why the pageable path is used, once per distinct reason per process."""
    with _said_lock:
        if reason in _said:
            return
        _said.add(reason)
    log.warning("pinned host staging unavailable (%s); activations cross host memory through pageable "
                "buffers (slower, same bytes)", reason)


@functools.cache
def _driver():
    """The CUDA driver's registration calls. The driver API, not the runtime's cudaHostRegister: a
    runtime failure would linger as the runtime's "last error" and fail torch's next kernel launch."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    for fn in (lib.cuMemHostRegister_v2, lib.cuMemHostUnregister, lib.cuGetErrorString):
        fn.restype = ctypes.c_int
    return lib


def _error(lib, rc: int) -> str:
    text = ctypes.c_char_p()
    if lib.cuGetErrorString(rc, ctypes.byref(text)) == 0 and text.value:
        return f"{text.value.decode(errors='replace')} (CUDA driver error {rc})"
    return f"CUDA driver error {rc}"


def _indexed(device):
    """``device`` with its index: "cuda" alone means the creating thread's current GPU. The owner thread
    must be told which (a fresh thread's current device is 0, and set_device refuses an unindexed
    "cuda": on the H200 that failed every arena of daemons built with device "cuda", as the in-process
    tests build them; ``meshd serve`` always names an index)."""
    import torch  # noqa: PLC0415 - torch is loaded wherever an arena is made

    if device is None or torch.device(device).type != "cuda" or torch.device(device).index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device


def _current_context(device):
    """Make ``device``'s CUDA context current on this thread (the owner thread's first CUDA call): the
    driver registers memory for the current context, a fresh thread has none, and a fresh thread's
    default device 0 would cost a daemon of another GPU a context there."""
    import torch  # noqa: PLC0415 - only a GPU process gets here

    if not torch.cuda.is_available():
        raise PinningUnavailable("CUDA is not available in this process")
    torch.cuda.set_device(device)  # binds the device's primary context to this thread
    try:
        return _driver()
    except (OSError, AttributeError) as exc:
        raise PinningUnavailable(f"the CUDA driver library cannot register memory: {exc}") from None


#: Arenas whose memory is to be unregistered (put from finalisers: SimpleQueue.put is reentrant).
_retiring: queue.SimpleQueue = queue.SimpleQueue()
_retirer: threading.Thread | None = None
_retirer_lock = threading.Lock()


def _start_retirer() -> None:
    """The thread that passes retired arenas to their owner threads (started with the first arena,
    never from a finaliser)."""
    global _retirer
    with _retirer_lock:
        if _retirer is None:
            _retirer = threading.Thread(target=_retire_arenas, name="staging-retirer", daemon=True)
            _retirer.start()


def _retire_arenas() -> None:
    while True:
        arena = _retiring.get()
        # The owner thread stays usable (a stream that raced the close may still submit to it; it then
        # finds no free run and copies through pageable memory). It ends with the arena: an executor's
        # idle thread exits once the executor is garbage.
        future = arena.owner.submit(arena._unregister)
        future.add_done_callback(lambda f: f.exception())  # logged there
        del arena, future


class PinnedArena:
    """``nbytes`` of host memory, page-locked unless ``pin`` is False, handed out in page runs.

    ``pin=False`` gives the same arena over ordinary memory: the pipeline logic runs unchanged on a
    CPU-only machine (tests), and copies into it are simply synchronous.
    """

    def __init__(self, nbytes: int, *, pin: bool = True, name: str = "staging", device=None,
                 memory: mmap.mmap | None = None) -> None:
        if not 0 < nbytes <= MAX_ARENA_BYTES:
            raise PinningUnavailable(f"a staging arena of {nbytes} bytes is outside 1..{MAX_ARENA_BYTES}")
        self.pages = math.ceil(nbytes / PAGE_BYTES)
        self.nbytes = self.pages * PAGE_BYTES
        if memory is not None and len(memory) != self.nbytes:
            # A shared region is sized in whole pages by its maker (meshd.wire.shm) and sealed there.
            raise PinningUnavailable(f"a mapping of {len(memory)} bytes is not {self.nbytes} bytes of whole pages")
        self.name = name
        _start_retirer()
        self.owner = ThreadPoolExecutor(1, thread_name_prefix=name)
        # Page-aligned and never resized: ours (zero-filled), or a sealed shared region given to us.
        self._memory = memory if memory is not None else mmap.mmap(-1, self.nbytes)
        self._base = np.frombuffer(self._memory, dtype=np.uint8)
        self._used = bytearray(self.pages)  # 1 where a page belongs to a live run
        self._lock = threading.Lock()
        self._live = 0
        self._closed = False
        self.pinned = False
        self.device = _indexed(device)  # the GPU whose copies use this memory (its owner thread's current device)
        if pin:
            try:
                self.run(self._register)
            except BaseException:
                self.owner.shutdown(wait=False)  # this arena is never handed out
                raise

    # --- the owner thread -----------------------------------------------------------------------

    def run(self, fn, *args):
        """Run ``fn`` on the owner thread and wait for it (from any thread but the owner)."""
        return self.owner.submit(fn, *args).result()

    def _register(self) -> None:
        lib = _current_context(self.device)
        rc = lib.cuMemHostRegister_v2(self._base.ctypes.data, self.nbytes, _REGISTER_PORTABLE)
        if rc != 0:
            raise PinningUnavailable(f"registering {self.nbytes >> 20} MiB of host memory failed: {_error(lib, rc)}")
        self.pinned = True

    def _unregister(self) -> None:
        if self.pinned:
            lib = _driver()
            rc = lib.cuMemHostUnregister(self._base.ctypes.data)
            self.pinned = False
            if rc != 0:
                log.warning("%s: unregistering its host memory failed: %s", self.name, _error(lib, rc))

    # --- runs -----------------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> np.ndarray | None:
        """A run of at least ``nbytes`` as a uint8 array of exactly ``nbytes``, or None when no run that
        long is free (the caller then uses pageable memory for this buffer). Any thread may call it."""
        count = max(1, math.ceil(nbytes / PAGE_BYTES))
        with self._lock:
            if self._closed:
                return None
            start = self._find(count)
            if start is None:
                return None
            self._used[start : start + count] = b"\x01" * count
            self._live += 1
        offset = start * PAGE_BYTES
        # An array over a memoryview (not a view of ``_base``): numpy would collapse a view's base to
        # ``_base``, and the run must stay taken while any slice of it lives.
        run = np.frombuffer(memoryview(self._memory)[offset : offset + nbytes], dtype=np.uint8)
        weakref.finalize(run, self._release, start, count).atexit = False  # nothing to give back at exit
        return run

    def span(self, offset: int, nbytes: int) -> np.ndarray:
        """The bytes ``[offset, offset + nbytes)`` as a uint8 array that keeps the arena's memory
        registered while it lives, without taking its pages: the receiving end of a shared region reads
        where the *other* process allocated. The caller has checked the bounds against ``nbytes``."""
        if not (0 <= offset and 0 < nbytes and offset + nbytes <= self.nbytes):
            raise ValueError(f"bytes {offset}..{offset + nbytes} are outside this {self.nbytes}-byte arena")
        with self._lock:
            self._live += 1
        view = np.frombuffer(memoryview(self._memory)[offset : offset + nbytes], dtype=np.uint8)
        weakref.finalize(view, self._release, 0, 0).atexit = False
        return view

    def offset_of(self, run: np.ndarray) -> int:
        """Where ``run`` (from :meth:`allocate`) starts in this arena: what a shared region's peer reads."""
        return run.ctypes.data - self._base.ctypes.data

    def _find(self, count: int) -> int | None:
        used, run = self._used, 0
        for page in range(self.pages):
            run = 0 if used[page] else run + 1
            if run == count:
                return page - count + 1
        return None

    def _release(self, start: int, count: int) -> None:
        # Runs on whichever thread dropped the last reference: bookkeeping only, no CUDA call here.
        with self._lock:
            self._used[start : start + count] = bytes(count)
            self._live -= 1
            last = self._closed and not self._live
        if last:
            self._retire()

    def holds(self, buffer) -> bool:
        """Whether ``buffer`` lies in this arena's memory (a received segment that was staged)."""
        view = memoryview(buffer)
        if not view.contiguous or view.nbytes == 0:
            return False
        address = np.frombuffer(view.cast("B"), dtype=np.uint8).ctypes.data
        base = self._base.ctypes.data
        return base <= address and address + view.nbytes <= base + self.nbytes

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return (self.pages - sum(self._used)) * PAGE_BYTES

    @property
    def closed(self) -> bool:
        """No new runs are handed out (:meth:`close`); the memory may still be in use by live ones."""
        with self._lock:
            return self._closed

    @property
    def live_runs(self) -> int:
        with self._lock:
            return self._live

    def close(self) -> None:
        """No new runs; the memory is unregistered once the last live run is gone (now, if none is)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            last = not self._live
        if last:
            self._retire()

    def _retire(self) -> None:
        # Often called from a run's finaliser, which the garbage collector may run anywhere, inside
        # another executor's submit too (holding concurrent.futures' global lock, which our own submit
        # would then wait for: a deadlock of that thread). So only a put on a queue happens here; the
        # retirer thread hands the unregistration to the owner thread.
        _retiring.put(self)


class LinkStaging:
    """One link direction's arena, made when first needed and grown (replaced) only when a single
    tensor needs more than it holds. ``None`` from :meth:`arena` means: use the pageable path (the
    reason was logged once)."""

    def __init__(self, name: str, *, pin: bool = True) -> None:
        self.name = name
        self.pin = pin
        self._arena: PinnedArena | None = None
        self._failed = False
        self._lock = threading.Lock()

    def arena(self, nbytes: int = ARENA_BYTES, device=None) -> PinnedArena | None:
        """An arena that can hold ``nbytes`` at once, for copies to and from ``device`` (made or grown
        here: call off the event loop)."""
        with self._lock:
            if self._failed:
                return None
            current = self._arena
            if current is not None and current.nbytes >= nbytes:
                return current
            size = max(ARENA_BYTES, math.ceil(nbytes / PAGE_BYTES) * PAGE_BYTES)
            if size > MAX_ARENA_BYTES:
                say_once(f"a stream of {nbytes >> 20} MiB exceeds the {MAX_ARENA_BYTES >> 20} MiB staging limit")
                return None
            try:
                arena = PinnedArena(size, pin=self.pin, name=self.name, device=device)
            except PinningUnavailable as exc:
                self._failed = True
                say_once(str(exc))
                return None
            if current is not None:
                log.info("%s: staging grows from %d to %d MiB", self.name, current.nbytes >> 20, size >> 20)
                current.close()  # its live runs finish with it; new ones come from the bigger arena
            self._arena = arena
            return arena

    @property
    def current(self) -> PinnedArena | None:
        """The arena made so far, if any (never makes one)."""
        return self._arena

    def close(self) -> None:
        with self._lock:
            arena, self._arena = self._arena, None
            self._failed = True
        if arena is not None:
            arena.close()
