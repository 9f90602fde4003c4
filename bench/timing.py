"""Timing the benches share: each call between two drains of the device's queue, in milliseconds."""

from __future__ import annotations

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
