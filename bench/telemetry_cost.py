#!/usr/bin/env python3
"""What meshd's telemetry sampler costs: the share of one CPU core it takes at a given rate.

    python bench/telemetry_cost.py                      # 30 s at 1 Hz, JSON on stdout
    python bench/telemetry_cost.py --seconds 60 --interval 0.5

Two figures, both from this box's real NVML (if any) and psutil, with --links fake peers in the
link registry (a busy head talks to a few):

- ``cpu_pct_of_one_core``: the sampler thread running exactly as in the daemon for --seconds,
  measured as this process's CPU time over wall time (the main thread only sleeps).
- ``per_sample_cpu_ms``: the CPU time of one sample, over --repeat back-to-back samples; at
  --interval it projects to ``projected_pct_of_one_core``.

On a GPU box the PCIe throughput readings spend about 20 ms each *waiting* inside the driver (it
counts bytes over a 20 ms window): that is wall time of the sampler thread, not CPU time.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.wire.link import LinkRegistry  # noqa: E402
from meshd.telemetry.sampler import TelemetrySampler  # noqa: E402


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "max": round(max(values), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the sampler thread runs (default 30)")
    parser.add_argument("--interval", type=float, default=1.0, help="sampling period in seconds (default 1)")
    parser.add_argument("--repeat", type=int, default=200, help="back-to-back samples timed one by one")
    parser.add_argument("--links", type=int, default=8, help="peers in the link registry (default 8)")
    args = parser.parse_args()

    links = LinkRegistry()
    for i in range(args.links):
        links.get(f"10.0.0.{i + 1}:7777").sent(1 << 20)

    # 1. The sampler thread as the daemon runs it.
    sampler = TelemetrySampler("bench", interval=args.interval, links=links).start()
    cpu0, wall0 = _cpu_s(), time.monotonic()
    time.sleep(args.seconds)
    cpu, wall = _cpu_s() - cpu0, time.monotonic() - wall0
    samples = sampler.samples
    sampler.stop()
    latest = sampler.latest

    # 2. One sample at a time.
    single = TelemetrySampler("bench", links=links).open()
    cpu_ms, wall_ms = [], []
    for _ in range(args.repeat):
        c, w = time.thread_time(), time.perf_counter()
        single.sample()
        cpu_ms.append((time.thread_time() - c) * 1e3)
        wall_ms.append((time.perf_counter() - w) * 1e3)
    single.stop()

    per_sample = statistics.fmean(cpu_ms)
    print(json.dumps({
        "interval_s": args.interval,
        "seconds": round(wall, 3),
        "samples": samples,
        "process_cpu_s": round(cpu, 4),
        "cpu_pct_of_one_core": round(cpu / wall * 100, 4),
        "per_sample_cpu_ms": _summary(cpu_ms),
        "per_sample_wall_ms": _summary(wall_ms),
        "projected_pct_of_one_core": round(per_sample / 1e3 / args.interval * 100, 4),
        "gpus": len(latest.gpus) if latest else None,
        "nvml": latest.nvml if latest else None,
        "interfaces": len(latest.host.interfaces) if latest else None,
        "links": args.links,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu": platform.processor() or platform.machine()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
