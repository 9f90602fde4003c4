#!/usr/bin/env python3
"""Split vs all-local on one machine: seconds, bytes per step, per-hop times, error, peak VRAM.

    python bench/split_bench.py --model klein-9b --random-weights --size 1024 --steps 4 --json
    python bench/split_bench.py ... --emulate-link 1gbit,0.3ms      # figures labelled "emulated"

The all-local reference runs in this process (every block on the device); the split runs over two
``meshd`` daemons on the same machine (both on --device), joined by loopback TCP or by a link emulated
inside the transport (token bucket + fixed delay). The first generation of each kind is a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.auth import read_key  # noqa: E402
from meshd.generation import GenerationParams, LocalRunner, run_generation  # noqa: E402
from meshd.gpu import GpuWorker  # noqa: E402
from meshd.model.files import ModelStore  # noqa: E402
from meshd.model.runtime import HostedModel, open_source  # noqa: E402
from meshd.plan import parse_split  # noqa: E402
from meshtui.local import LocalCluster  # noqa: E402
from meshtui.mesh import Mesh  # noqa: E402
from meshtui.report import hop_totals  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


async def run_local(args, device, params) -> dict:
    store = ModelStore([args.models_dir])
    model = HostedModel(open_source(args.model, store, random_weights=args.random_weights), device, torch.bfloat16)
    worker = GpuWorker(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    await worker.run(model.load, range(model.preset.num_blocks), True, True)
    times, result = [], None
    for i in range(args.repeat + 1):
        t0 = time.perf_counter()
        result = await run_generation(model, worker, params, LocalRunner(worker))
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out = {
        "seconds": times,
        "median_s": statistics.median(times),
        "peak_vram_bytes": peak,
        "latents": result.latents,
        "pixels": np.asarray(Image.open(io.BytesIO(result.png))),
        "step_ms": [s["ms"] for s in result.summary["steps"]],
    }
    worker.shutdown()
    del model, result
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


async def run_split(args, cluster, params, local) -> list[dict]:
    mesh = Mesh(read_key(cluster.key_file))
    rows = []
    try:
        for d in cluster.daemons:
            mesh.add(d.address)
        await mesh.connect_all()
        preset, _ = mesh.model()
        plan = parse_split(args.split or f"A:0-{preset.num_blocks // 2 - 1},B:{preset.num_blocks // 2}-{preset.num_blocks - 1}",
                           {p.label: p.address for p in mesh.peers.values()}, preset.num_blocks)
        t0 = time.perf_counter()
        await mesh.apply(plan)
        load_s = time.perf_counter() - t0
        for codec_name in args.codecs.split(","):
            times, outcome = [], None
            for i in range(args.repeat + 1):
                t0 = time.perf_counter()
                outcome = await mesh.generate(plan, params.to_wire(), codec=codec_name, measure_error=False,
                                              return_latents=True)
                if i:
                    times.append(time.perf_counter() - t0)
            # One more run measuring per-hop reconstruction error (it costs a decode per hop).
            measured = outcome if codec_name == "raw" else await mesh.generate(
                plan, params.to_wire(), codec=codec_name, measure_error=True, return_latents=True)
            pixels = np.asarray(Image.open(io.BytesIO(outcome.png)))
            ref = local["latents"]
            rel = float((outcome.latents - ref).norm() / ref.norm())
            hops = hop_totals(measured.summary)
            split_s = statistics.median(times)
            await mesh.connect_all()
            rows.append({
                "codec": codec_name,
                "chosen": [h["codec"] for h in hops],
                "plan": plan.describe(),
                "split_seconds": times,
                "split_median_s": split_s,
                "local_median_s": local["median_s"],
                "split_over_local": split_s / local["median_s"],
                "bit_identical_latents": bool(torch.equal(outcome.latents, ref)),
                "identical_pixels": bool(np.array_equal(pixels, local["pixels"])),
                "final_latent_rel_l2": rel,
                "image_psnr_db": psnr(pixels, local["pixels"]),
                "hops": hops,
                "return_bytes_per_step": measured.summary["steps"][0]["passes"][0].get("return_bytes"),
                "step_ms": [s["ms"] for s in outcome.summary["steps"]],
                "peak_vram_bytes": {p.label: (p.info.get("memory") or {}).get("peak_allocated") for p in mesh.peers.values()},
                "load_s": load_s,
            })
            print(f"# {codec_name}: split {split_s:.3f} s vs local {local['median_s']:.3f} s, "
                  f"bit-identical={rows[-1]['bit_identical_latents']}, rel_l2={rel:.2e}", file=sys.stderr, flush=True)
    finally:
        await mesh.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="klein-9b")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/flux-mesh-models"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--split", help="plan SPEC (default: half the blocks on each daemon)")
    parser.add_argument("--codecs", default="raw,fp8,u8,hevc-lossless,hevc-qp18,auto")
    parser.add_argument("--emulate-link", default="", help="e.g. 1gbit,0.3ms (figures are labelled emulated)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the daemons' key, state and logs here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    params = GenerationParams(prompt="a lighthouse on a cliff at dawn", seed=1, width=args.size, height=args.size,
                              steps=args.steps, guidance=1.0)
    local = asyncio.run(run_local(args, device, params))
    print(f"# local {local['median_s']:.3f} s", file=sys.stderr, flush=True)
    common = ["--model", args.model, "--device", str(device)]
    if args.random_weights:
        common.append("--random-weights")
    if args.emulate_link:
        common += ["--emulate-link", args.emulate_link]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with LocalCluster(workdir=args.workdir, models_dir=args.models_dir, common_args=common) as cluster:
        cluster.add("A")
        cluster.add("B")
        cluster.start(timeout=300)
        rows = asyncio.run(run_split(args, cluster, params, local))
    result = {
        "bench": "split",
        "machine": {"host": platform.node(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__},
        "config": {"model": args.model, "random_weights": args.random_weights, "size": args.size, "steps": args.steps,
                   "link": (args.emulate_link + " (emulated)") if args.emulate_link else "loopback TCP"},
        "local": {k: v for k, v in local.items() if k not in ("latents", "pixels")},
        "runs": rows,
    }
    print(json.dumps(result, indent=1, default=str) if args.json else json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
