"""The one queue of GPU work per daemon.

Compute for different jobs never interleaves inside a step: every unit of work (one span forward,
a load, a VAE decode) runs to completion on a single worker thread, in arrival order. The asyncio
loop stays free for network I/O, pings and telemetry meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ..errors import MeshError

T = TypeVar("T")


class GpuWorker:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"gpu-{device}")
        self._queued = 0
        self._lock = threading.Lock()
        self.busy_seconds = 0.0

    @property
    def queued(self) -> int:
        return self._queued

    def _run(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        start = time.perf_counter()
        try:
            with torch.inference_mode(), (torch.cuda.device(self.device) if self.device.type == "cuda"
                                          else contextlib.nullcontext()):
                try:
                    result = fn(*args)
                except BaseException:
                    # Copies the call queued into shared host memory finish before the caller lets their
                    # runs go (a second failure here changes nothing: the first is the one raised).
                    with contextlib.suppress(Exception):
                        self._wait_for_stream()
                    raise
                self._wait_for_stream()
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise MeshError("oom", f"GPU {self.device} ran out of memory: {str(exc).splitlines()[0]}") from None
        elapsed = time.perf_counter() - start
        with self._lock:
            self.busy_seconds += elapsed
        return result, elapsed

    def _wait_for_stream(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    async def run(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """Run ``fn(*args)`` on the GPU thread; returns (result, seconds it ran)."""
        with self._lock:
            self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, functools.partial(self._run, fn, *args))
        finally:
            with self._lock:
                self._queued -= 1

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            self._pool.submit(torch.cuda.empty_cache)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
