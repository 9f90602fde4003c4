#!/usr/bin/env python3
"""One full transformer forward, eager vs compiled blocks, in one process on the same weights.

    python bench/forward_bench.py --model klein-9b --size 1024 --repeat 10 --json
    python bench/forward_bench.py --model klein-9b --weights bf16,fp8 --json   # fp8 vs bf16, both compiled

Builds the preset's real-size config with seeded random bf16 weights on --device (no files needed),
prepares one generation's inputs the way a generation does (the stand-in text encoder, since random
weights have no real one), then times ``span.run`` over every block plus the final layer: eager
(today's path), compiled (meshd.model.compiled, the daemon's path), and eager again, so a drift of the
GPU's clocks during the run shows. Prints the medians, the compile seconds (first compile: this
process traces, inductor's cache in --state-dir may already hold the kernels; run twice to see both),
the compiled output's relative L2 against eager, and peak memory, as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.split_bench import log  # noqa: E402
from bench.timing import median_ms, sync  # noqa: E402
from meshd.pipeline.generation import GenerationParams, Sampler  # noqa: E402
from meshd.model.compiled import BlockCompiler, CompileCache  # noqa: E402
from meshd.model.runtime import HostedModel, RandomSource  # noqa: E402
from meshd.model.presets import get_preset  # noqa: E402


def measure(args, device: torch.device, weights: str) -> dict:
    """Eager, compiled and eager-again forwards of the preset with its blocks held at ``weights``."""
    preset = get_preset(args.model)
    source = RandomSource(preset, seed=0)
    compiler = BlockCompiler(CompileCache(args.state_dir / "compile"), source.model_id, backend=args.backend)
    model = HostedModel(source, device, torch.bfloat16, weights=weights, compiler=compiler)
    params = GenerationParams(prompt="a lighthouse on a cliff at dawn", seed=1, width=args.size, height=args.size,
                              steps=4, guidance=1.0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.load(range(preset.num_blocks), True, True)
        sync(device)
        log(f"{weights}: built {preset.name} on {device} in {time.perf_counter() - t0:.1f} s ({model.compute_path()})")
        sampler = Sampler(model, params)
        sampler.prepare()
        cond = sampler.conditioning(0)
        span = model.span

        def forward() -> torch.Tensor:
            stream = span.run(0, preset.num_blocks, sampler.embed(0), cond, sampler.rotary)
            return span.final(stream, cond.temb)

        span.block_call = None
        eager_ms, eager_times, eager_out = median_ms(forward, device, args.repeat)
        log(f"{weights}: eager {eager_ms:.1f} ms")
        compile_s = model.warm_compiled(sampler.txt_len, sampler.image_tokens)
        log(f"{weights}: compiled the blocks for {sampler.txt_len}+{sampler.image_tokens} tokens in {compile_s:.1f} s")
        span.block_call = compiler.call
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        compiled_ms, compiled_times, compiled_out = median_ms(forward, device, args.repeat)
        compiled_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        log(f"{weights}: compiled {compiled_ms:.1f} ms")
        span.block_call = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        again_ms, again_times, _ = median_ms(forward, device, args.repeat)
        eager_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rel_l2 = float((compiled_out.float() - eager_out.float()).norm() / eager_out.float().norm())
    row = {
        "weights": weights,
        "compute": model.compute_path(),
        "tokens": sampler.txt_len + sampler.image_tokens,
        "eager_forward_ms": eager_ms,
        "compiled_forward_ms": compiled_ms,
        "eager_again_forward_ms": again_ms,
        "compiled_over_eager": compiled_ms / ((eager_ms + again_ms) / 2),
        "compile_s": compile_s,
        "compiled_rel_l2_vs_eager": rel_l2,
        "peak_bytes": {"eager": eager_peak, "compiled": compiled_peak},
        "times_ms": {"eager": eager_times, "compiled": compiled_times, "eager_again": again_times},
        "output": compiled_out.float().cpu(),
    }
    log(f"{weights}: compiled/eager x{row['compiled_over_eager']:.3f}, rel L2 {rel_l2:.2e}")
    del model, span, sampler, cond
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="klein-9b", help="preset (klein-9b, klein-4b, dev, tiny)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--repeat", type=int, default=10, help="timed forwards per mode (median reported)")
    parser.add_argument("--weights", default="bf16",
                        help="comma list of block precisions (bf16, fp8, gguf-q8_0, gguf-q4_k); the first is the "
                             "reference the others' times and errors are given against")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor in meshd)")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/flux-mesh-forward-bench"),
                        help="where the compile cache goes (like a daemon's state dir)")
    parser.add_argument("--json", action="store_true", help="indent the JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rows = [measure(args, device, w.strip()) for w in args.weights.split(",") if w.strip()]
    reference, ref_out = rows[0], rows[0]["output"]
    name = reference["weights"]
    base_ms = (reference["eager_forward_ms"] + reference["eager_again_forward_ms"]) / 2
    for row in rows:
        out = row.pop("output")
        row[f"compiled_over_{name}_eager"] = row["compiled_forward_ms"] / base_ms
        row[f"eager_over_{name}_eager"] = row["eager_forward_ms"] / base_ms
        if row is not reference:
            row[f"rel_l2_vs_{name}_compiled"] = float((out - ref_out).norm() / ref_out.norm())
            row["error_label"] = "random weights: not an image-quality figure for real checkpoints"
    result = {"bench": "forward",
              "config": {"model": args.model, "size": args.size, "repeat": args.repeat, "backend": args.backend,
                         "weights_source": "seeded random bf16, quantised on the device for other precisions"},
              "machine": {"host": platform.node(),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                          "torch": torch.__version__},
              "rows": rows}
    for row in rows:
        log(f"{row['weights']}: eager {row['eager_forward_ms']:.1f} ms, compiled {row['compiled_forward_ms']:.1f} ms "
            f"= x{row[f'compiled_over_{name}_eager']:.3f} of {name} eager")
    print(json.dumps(result, indent=1 if args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
