#!/usr/bin/env python3
"""Soak: many split generations through real daemons, several clients at once, each round on fresh
connections; the daemons' memory and open file descriptors before and after.

    python bench/soak.py --generations 2000 --clients 4 --json

Two ``meshd`` processes on loopback (the ``tiny`` model on the CPU) split the model between them.
Each round, every client opens its own authenticated connections, runs its share of generations
(cycling the codecs raw, u8, fp8 and hevc-qp20 and the seeds) and closes them again. Each image
must carry, in its metadata, the seed its client asked for (``mixed_up`` counts those that do not). A warm-up of
``--warmup`` generations first runs every code path once (codec sessions, caches, thread pools); the
baseline is taken after it. The daemons' resident memory (RSS) and descriptor counts are sampled
after every round, once their connections have settled; ``growth`` compares the end with the
baseline. Every generation must succeed and leave no job behind.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.auth import read_key  # noqa: E402
from meshd.pipeline.request import GenerationParams  # noqa: E402
from meshd.pipeline.plan import PeerAddress, parse_split  # noqa: E402
from meshtui.local import LocalCluster  # noqa: E402
from meshtui.mesh import Mesh  # noqa: E402
from tests.daemons import jobs_on  # noqa: E402 - the tests' own check

CODECS = ("raw", "u8", "fp8", "hevc-qp20")
PARAMS = GenerationParams("a lighthouse at dawn", width=64, height=64, steps=2, guidance=1.0)
SPLIT = "A:0-2,B:3-5"


def log(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def process_figures(pid: int) -> dict:
    proc = psutil.Process(pid)
    return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds(),
            "threads": proc.num_threads()}


async def settled(pids: dict[str, int], baseline: dict[str, dict] | None, wait: float = 3.0) -> dict[str, dict]:
    """Figures once the daemons have closed the sockets of the clients that just left (up to ``wait`` s)."""
    deadline = time.monotonic() + wait
    while True:
        figures = {name: process_figures(pid) for name, pid in pids.items()}
        if baseline is None or all(figures[n]["fds"] <= baseline[n]["fds"] for n in pids) \
                or time.monotonic() > deadline:
            return figures
        await asyncio.sleep(0.05)


def png_seed(png: bytes) -> int | None:
    """The seed a PNG says it was made with (its flux-mesh metadata), or None."""
    try:
        return json.loads(Image.open(io.BytesIO(png)).text["flux-mesh"])["params"]["seed"]
    except (OSError, KeyError, ValueError):
        return None


async def client_round(key: bytes, addresses: list[PeerAddress], jobs: list[int]) -> tuple[int, int]:
    """One client's share of a round, on its own connections; returns (failed, mixed up): generations
    that ended in an error, and images that are not the one this client asked for."""
    mesh = Mesh(key)
    try:
        for address in addresses:
            mesh.add(address)
        await mesh.connect_all()
        plan = parse_split(SPLIT, {p.label: p.address for p in mesh.peers.values()}, 6)
        failed = mixed = 0
        for n in jobs:
            try:
                outcome = await mesh.generate(plan, replace(PARAMS, seed=n), codec=CODECS[n % len(CODECS)],
                                              measure_error=n % 2 == 0)
                mixed += png_seed(outcome.png) != n
            except Exception as exc:  # noqa: BLE001 - a soak counts failures, it does not stop at one
                log(f"generation {n} failed: {exc}")
                failed += 1
        return failed, mixed
    finally:
        await mesh.close()


async def soak(key: bytes, addresses: list[PeerAddress], pids: dict[str, int], *, generations: int,
               clients: int, warmup: int, per_round: int = 8) -> dict:
    """Run ``warmup`` then ``generations`` generations from ``clients`` concurrent clients, ``per_round``
    each per connection; returns the figures (see the module docstring)."""
    mesh = Mesh(key)
    try:
        for address in addresses:
            mesh.add(address)
        await mesh.connect_all()
        await mesh.apply(parse_split(SPLIT, {p.label: p.address for p in mesh.peers.values()}, 6))
    finally:
        await mesh.close()

    async def rounds(first: int, count: int, on_round=None) -> tuple[int, int]:
        failed = mixed = 0
        n = first
        while n < first + count:
            size = min(clients * per_round, first + count - n)
            shares = [list(range(n + i, n + size, clients)) for i in range(clients)]
            for f, m in await asyncio.gather(*(client_round(key, addresses, s) for s in shares if s)):
                failed, mixed = failed + f, mixed + m
            n += size
            if on_round is not None:
                await on_round(n - first)
        return failed, mixed

    log(f"warm-up: {warmup} generations")
    warm_failed, warm_mixed = await rounds(0, warmup)
    before = await settled(pids, None)
    samples = []

    async def sample(done: int) -> None:
        figures = await settled(pids, before)
        samples.append({"generations": done, **{name: f["rss_mib"] for name, f in figures.items()},
                        **{f"{name}_fds": f["fds"] for name, f in figures.items()}})
        if len(samples) % 10 == 0:
            log(f"{done}/{generations}: " + ", ".join(f"{n} {f['rss_mib']} MiB {f['fds']} fds"
                                                         for n, f in figures.items()))

    log(f"soak: {generations} generations, {clients} clients")
    started = time.perf_counter()
    failed, mixed = await rounds(warmup, generations, sample)
    seconds = time.perf_counter() - started
    after = await settled(pids, before)
    jobs = dict(zip(pids, await asyncio.gather(*(jobs_on(key, a) for a in addresses))))
    return {
        "generations": generations,
        "clients": clients,
        "per_connection": per_round,
        "codecs": list(CODECS),
        "warmup": warmup,
        "failed": failed + warm_failed,
        "mixed_up": mixed + warm_mixed,
        "seconds": round(seconds, 1),
        "generations_per_s": round(generations / seconds, 2),
        "jobs_left": jobs,
        "before": before,
        "after": after,
        "growth": {name: {"rss_mib": round(after[name]["rss_mib"] - before[name]["rss_mib"], 1),
                          "fds": after[name]["fds"] - before[name]["fds"],
                          "threads": after[name]["threads"] - before[name]["threads"]} for name in pids},
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--per-connection", type=int, default=8, help="generations per client connection")
    parser.add_argument("--json", action="store_true", help="indented JSON")
    args = parser.parse_args()
    with LocalCluster(common_args=["--model", "tiny", "--device", "cpu"]) as cluster:
        cluster.add("a")
        cluster.add("b")
        addresses = cluster.start()
        pids = {d.name: d.process.pid for d in cluster.daemons}
        result = asyncio.run(soak(read_key(cluster.key_file), addresses, pids, generations=args.generations,
                                  clients=args.clients, warmup=args.warmup, per_round=args.per_connection))
    result["machine"] = {"cpus": psutil.cpu_count(), "python": platform.python_version(), "system": platform.platform()}
    print(json.dumps(result, indent=1 if args.json else None))
    ok = result["failed"] == 0 and result["mixed_up"] == 0 and not any(result["jobs_left"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
