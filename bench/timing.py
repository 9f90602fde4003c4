"""Timing the benches share: each call between two drains of the device's queue, in milliseconds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeat: int) -> tuple[list[float], object]:
    """Call ``fn`` ``repeat`` times; (ms of each call, the last call's result). Warm-up is the caller's."""
    times, result = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, result


def median_ms(fn: Callable[[], object], device: torch.device, repeat: int,
              warmup: int = 1) -> tuple[float, list[float], object]:
    """(median ms, every call's ms, the last result) of ``repeat`` timed calls after ``warmup`` untimed ones
    (the first call of a compiled function compiles; the first of a kernel loads it)."""
    for _ in range(warmup):
        fn()
    times, result = time_calls(fn, device, repeat)
    return statistics.median(times), times, result
