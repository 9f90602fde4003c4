#!/usr/bin/env python3
"""Weights at each precision, on random weights at real size: VRAM, speed and error against bf16.

    python bench/precision_bench.py --model dev --weights bf16,fp8,gguf-q8_0,gguf-q4_k --size 1024 --steps 2 --json
    python bench/precision_bench.py --model klein-9b --mode forward --weights bf16,fp8 --json
    python bench/precision_bench.py --mode layer --json          # one GgufLinear per type, klein-9b and dev

Every format is built the way a daemon builds it with ``--random-weights --weights W``: the seeded bf16
weights of each block are made on the GPU and quantised there, one tensor at a time (fp8 with one scale
per row; GGUF Q8_0 and Q4_K by meshd's torch quantisers, whose packing is checked against gguf's own
reference on small tensors in tests/test_precision.py). ``bf16`` is the reference and always runs.

``--mode generate`` (default), per format: the all-local generation in this process (peak VRAM of one
GPU holding everything, step ms), then a two-stage split over two daemons on the same machine (the
planner's split at that precision, raw codec: per-stage peak VRAM, step ms, and whether it equals the
all-local run bit for bit), and the final-latent relative L2 and image PSNR against the bf16 run of the
same seed. ``--mode forward``: one whole transformer forward at the size, median ms and output rel L2
against bf16. ``--mode layer``: one GgufLinear of each type (Q8_0, Q6_K, Q5_K, Q4_K) at the shapes of a
single block's two linears (klein-9B and dev unless --model names one), on the tokens of --size: median ms
eager and compiled (torch.compile over the layer, inductor in deterministic mode as BlockCompiler uses
it), the dequantisation alone, diffusers' dequantiser (what meshd ran before) and the bf16 nn.Linear of
the same shape, all in one process. Error figures are labelled: random weights are near-uniform, trained
weights have outliers, so quantisation error on them says little about real images.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.split_bench import free_memory, log, psnr, run_local, run_split  # noqa: E402
from bench.timing import median_ms, sync, time_calls  # noqa: E402
from meshd.pipeline.generation import GenerationParams, Sampler  # noqa: E402
from meshd.model.checkpoints import expected_shapes  # noqa: E402
from meshd.model.precision import GGUF_QUANTISED, GgufLinear, LinearFormat, gguf_sizes  # noqa: E402
from meshd.model.compiled import INDUCTOR_OPTIONS  # noqa: E402
from meshd.model.presets import get_preset  # noqa: E402
from meshd.model.runtime import HostedModel, RandomSource  # noqa: E402
from meshtui.local import LocalCluster  # noqa: E402

ERROR_LABEL = ("random weights: near-uniform values quantise differently from trained weights (which have "
               "outlier channels); these errors are not image-quality figures for real checkpoints")
GIB = 2**30


def forward_ms(model: HostedModel, params: GenerationParams, repeat: int) -> tuple[float, torch.Tensor]:
    """Median ms of one transformer forward (all blocks, final layer) at ``params``' size, and its output."""
    sampler = Sampler(model, params)
    with torch.inference_mode():
        sampler.prepare()
        cond = sampler.conditioning(0)

        def once() -> torch.Tensor:
            stream = model.span.run(0, model.preset.num_blocks, sampler.embed(0), cond, sampler.rotary)
            return model.span.final(stream, cond.temb)

        once()  # warm-up
        times, out = time_calls(once, model.device, repeat)
    return statistics.median(times), out.float()


def run_forward(args, device, params) -> list[dict]:
    preset = get_preset(args.model)
    rows, reference = [], None
    for weights in args.weights:
        model = HostedModel(RandomSource(preset), device, torch.bfloat16, weights=weights)
        model.load(range(preset.num_blocks), True, True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms, out = forward_ms(model, params, args.repeat)
        row = {"weights": weights, "identity_weights": model.identity.weights, "compute": model.compute_path(),
               "forward_ms": ms, "weight_gib": _gib(model),
               "peak_vram_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None}
        if weights == "bf16":
            reference = out.cpu()
        elif reference is not None:
            row["output_rel_l2_vs_bf16"] = float((out.cpu() - reference).norm() / reference.norm())
            row["error_label"] = ERROR_LABEL
        rows.append(row)
        log(f"{weights}: forward {ms:.1f} ms, weights {row['weight_gib']:.2f} GiB ({row['compute']})")
        del model, out
        free_memory(device)
    return rows


def run_generate(args, device, params) -> list[dict]:
    """Per compile mode (``--compile on,off``), per format: the all-local generation and the split. Every
    row's ratios are against the bf16 eager row of this run (``over_bf16_eager``: the whole generation's
    median seconds and the median step), its error against the bf16 row of its own compile mode."""
    rows, references, baseline = [], {}, None
    for compile_mode in args.compile:
        for weights in args.weights:
            row, local = generate_row(args, device, params, weights, compile_mode)
            if weights == "bf16":
                references[compile_mode] = (local["latents"], local["pixels"])
                if compile_mode == "off":
                    baseline = row
            elif compile_mode in references:
                latents, pixels = references[compile_mode]
                row["vs_bf16"] = {"final_latent_rel_l2": float((local["latents"] - latents).norm() / latents.norm()),
                                  "image_psnr_db": psnr(np.asarray(local["pixels"]), pixels), "label": ERROR_LABEL}
            if baseline is not None:
                row["over_bf16_eager"] = {
                    part: {"generation": row[part]["median_s"] / baseline[part]["median_s"],
                           "step": statistics.median(row[part]["step_ms"]) / statistics.median(baseline[part]["step_ms"])}
                    for part in ("local", "split")}
            rows.append(row)
            log(f"{weights}, compile {compile_mode}: local {row['local']['median_s']:.3f} s, peak "
                f"{row['local']['peak_vram_gib']} GiB; split {row['split']['plan']} {row['split']['median_s']:.3f} s, "
                f"peaks {row['split']['peak_vram_gib']} GiB, bit-identical={row['split']['bit_identical_to_local']}"
                + (f", rel L2 vs bf16 {row['vs_bf16']['final_latent_rel_l2']:.4f}, PSNR "
                   f"{row['vs_bf16']['image_psnr_db']:.1f} dB" if "vs_bf16" in row else "")
                + (f"; over bf16 eager: local {row['over_bf16_eager']['local']}, split "
                   f"{row['over_bf16_eager']['split']}" if "over_bf16_eager" in row else ""))
            del local
            free_memory(device)
    return rows


def generate_row(args, device, params, weights: str, compile_mode: str) -> tuple[dict, dict]:
    """One format at one compile mode: the all-local run (kept for the error figures) and the split's row."""
    local_args = argparse.Namespace(**{**vars(args), "weights": weights, "random_weights": True,
                                       "compare_diffusers": False})
    # The daemons compile their blocks by default on CUDA: the all-local run must do what they do, or the
    # split is compared with a run of other kernels (that cost the first H200 run its exactness).
    workdir = args.workdir / f"{weights}-compile-{compile_mode}" if args.workdir else None
    local, _ = asyncio.run(run_local(local_args, device, params, compiled=compile_mode == "on",
                                     state_dir=(workdir or Path("/tmp/flux-mesh-precision-bench")) / "local"))
    free_memory(device)
    common = ["--model", args.model, "--random-weights", "--weights", weights, "--compile", compile_mode]
    with LocalCluster(workdir=workdir, models_dir=args.models_dir, common_args=common) as cluster:
        cluster.add("A", "--device", str(device))
        cluster.add("B", "--device", str(device))
        cluster.start(timeout=600)
        split_args = argparse.Namespace(**{**vars(args), "codecs": "raw", "queue": 0})
        split = asyncio.run(run_split(split_args, cluster, params, local, None))
    run = split["runs"][0]
    row = {
        "weights": weights,
        "compile": compile_mode,
        "local": {"median_s": local["median_s"], "peak_vram_gib": _gib_or_none(local["peak_vram_bytes"]),
                  "step_ms": [round(ms, 2) for ms in local["step_ms"]], "compile_s": local["compile_s"],
                  **{part: local[part] for part in TAIL}},
        "split": {"plan": split["plan"], "load_s": split["load_s"], "median_s": run["split_median_s"],
                  "step_ms": run["step_ms"],
                  "peak_vram_gib": {k: _gib_or_none(v) for k, v in run["peak_vram_bytes"].items()},
                  "bit_identical_to_local": run["bit_identical_latents"]},
    }
    return row, local


#: Where an all-local generation's time goes outside its steps (run_local's figures, ms).
TAIL = ("prepare_ms", "decode_ms", "vae_ms", "png_ms", "png_and_copies_ms")


#: The layers ``--mode layer`` times: a single block's fused input projection and its output projection
#: (single blocks hold 80% of klein-9B's block weights and 75% of dev's).
LAYERS = ("single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out")
#: Byte offsets of each type's float16 block scale(s): random blocks get finite scales there.
F16_AT = {"Q8_0": (0,), "Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2)}


def random_gguf(qtype: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Random valid GGUF blocks (random codes and sub-block scales, finite f16 scales) as a layer holds them:
    the time of a dequantisation does not depend on the values."""
    block, size = gguf_sizes(qtype)
    g = torch.Generator(device=device).manual_seed(0)
    blocks = torch.randint(0, 256, (rows * cols // block, size), dtype=torch.uint8, device=device, generator=g)
    for at in F16_AT[qtype]:
        blocks[:, at:at + 2] = torch.tensor([1e-3], dtype=torch.float16, device=device).view(torch.uint8)
    return blocks.reshape(rows, -1)


def run_layers(args, device) -> list[dict]:
    """One GgufLinear per type at each model's single-block shapes: eager, compiled, against bf16 and diffusers."""
    import gguf  # noqa: PLC0415
    from diffusers.quantizers.gguf.utils import dequantize_functions  # noqa: PLC0415

    rows = []
    for name in args.layer_models:
        preset = get_preset(name)
        shapes = expected_shapes(preset)
        side = args.size // preset.size_multiple
        tokens = preset.max_sequence_length + side * side
        g = torch.Generator(device=device).manual_seed(1)
        for layer_name in LAYERS:
            out_f, in_f = shapes[f"{layer_name}.weight"]
            x = torch.randn(1, tokens, in_f, device=device, dtype=torch.bfloat16, generator=g)
            dense = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
            with torch.inference_mode():
                bf16_ms = median_ms(lambda: dense(x), device, args.repeat, warmup=2)[0]
            del dense
            for qtype in GGUF_QUANTISED:
                block, size = gguf_sizes(qtype)
                row = {"model": name, "layer": layer_name, "shape": [out_f, in_f], "tokens": tokens, "qtype": qtype}
                if in_f % block:
                    rows.append({**row, "skipped": f"rows of {in_f} are not whole {qtype} blocks"})
                    continue
                layer = GgufLinear(in_f, out_f, LinearFormat("gguf", qtype=qtype)).to(device)
                layer.weight = random_gguf(qtype, out_f, in_f, device)
                port = dequantize_functions[gguf.GGMLQuantizationType[qtype]]
                with torch.inference_mode():
                    eager_out = layer(x)
                    eager_ms = median_ms(lambda: layer(x), device, args.repeat, warmup=2)[0]
                    dequant_ms = median_ms(lambda: layer.dequantized(torch.bfloat16), device, args.repeat, warmup=2)[0]
                    diffusers_ms = median_ms(lambda: port(layer.weight.reshape(-1, size), block, size)
                                             .reshape(out_f, in_f).to(torch.bfloat16), device, args.repeat, warmup=2)[0]
                    # Every GgufLinear shares one forward code object: each layer here is a new graph of
                    # it, and Dynamo's recompile limit (8) would end the sweep at its 9th layer (as it did
                    # on the H200). The layers are measured one at a time, so start each from a clean slate.
                    torch._dynamo.reset()
                    compiled = torch.compile(layer, fullgraph=True, dynamic=False,
                                             options=INDUCTOR_OPTIONS if device.type == "cuda" else None)
                    t0 = time.perf_counter()
                    compiled_out = compiled(x)
                    sync(device)
                    compile_s = time.perf_counter() - t0
                    compiled_ms = median_ms(lambda: compiled(x), device, args.repeat, warmup=2)[0]
                row.update({
                    "bf16_linear_ms": round(bf16_ms, 3), "eager_ms": round(eager_ms, 3),
                    "compiled_ms": round(compiled_ms, 3), "compile_s": round(compile_s, 1),
                    "dequantise_only_eager_ms": round(dequant_ms, 3),
                    "diffusers_dequantise_only_eager_ms": round(diffusers_ms, 3),
                    "eager_over_bf16": round(eager_ms / bf16_ms, 3),
                    "compiled_over_bf16": round(compiled_ms / bf16_ms, 3),
                    "compiled_equals_eager": bool(torch.equal(compiled_out, eager_out)),
                    "packed_mib": round(layer.weight.numel() / 2**20, 1),
                })
                log(f"{name} {layer_name.rsplit('.', 1)[-1]} {out_f}x{in_f} {qtype}: bf16 {bf16_ms:.2f} ms, eager "
                    f"{eager_ms:.2f} ms (dequantise {dequant_ms:.2f}, diffusers' {diffusers_ms:.2f}), compiled "
                    f"{compiled_ms:.2f} ms, compiled == eager: {row['compiled_equals_eager']}")
                rows.append(row)
                del layer, compiled, eager_out, compiled_out
                free_memory(device)
    return rows


def _gib(model: HostedModel) -> float:
    sizes = model.weight_bytes()
    return (sum(sizes.blocks) + sizes.head + sizes.tail) / GIB


def _gib_or_none(value) -> float | None:
    return round(value / GIB, 3) if isinstance(value, (int, float)) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["klein-9b", "klein-4b", "dev", "tiny"],
                        help="preset (default klein-9b; --mode layer: klein-9b and dev)")
    parser.add_argument("--weights", default="bf16,fp8,gguf-q8_0,gguf-q4_k",
                        help="comma-separated: bf16, fp8, gguf-q8_0, gguf-q4_k (bf16 is always run first)")
    parser.add_argument("--mode", choices=["generate", "forward", "layer"], default="generate")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeat", type=int, help="timed generations (or forwards) per format (default 1; "
                        "--mode layer: timed calls per layer, default 20)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/flux-mesh-models"))
    parser.add_argument("--workdir", type=Path, help="keep the daemons' key, state and logs here")
    parser.add_argument("--split", help="force this plan for every format, e.g. A:0-19,B:20-55 (default: the "
                        "planner's, which balances time, not memory, on two daemons of one big GPU)")
    parser.add_argument("--compile", default="off",
                        help="on, off or both (on,off: eager first, the baseline of every row's ratios): blocks "
                        "compiled or eager, in the all-local run and the daemons alike (default off)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the bf16 reference run (no error figures; for VRAM and speed alone)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.weights = ([] if args.no_reference else ["bf16"]) + [w for w in args.weights.split(",") if w and w != "bf16"]
    args.compile = sorted({mode.strip() for mode in args.compile.split(",") if mode.strip()})  # off first
    if not args.compile or set(args.compile) - {"on", "off"}:
        parser.error(f"--compile: on, off or on,off, not {','.join(args.compile) or 'nothing'}")
    args.layer_models = [args.model] if args.model else ["klein-9b", "dev"]
    args.repeat = args.repeat or (20 if args.mode == "layer" else 1)
    args.model = args.model or "klein-9b"
    args.random_weights, args.transport = True, "auto"
    plan_source = f"the plan {args.split}" if args.split else "the planner's split"
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    params = GenerationParams(prompt="a lighthouse on a cliff at dawn", seed=1, width=args.size, height=args.size,
                              steps=args.steps, guidance=1.0)
    runs = {"generate": run_generate, "forward": run_forward, "layer": lambda a, d, _: run_layers(a, d)}
    rows = runs[args.mode](args, device, params)
    result = {
        "bench": "precision",
        "mode": args.mode,
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "config": {"model": args.model, "weights_source": "random weights (seeded bf16, quantised on the device)",
                   "size": args.size, "steps": args.steps, "repeat": args.repeat, "compile": args.compile,
                   "split": f"two daemons on this machine, {plan_source}, raw codec"} if args.mode != "layer" else
                  {"models": args.layer_models, "size": args.size, "repeat": args.repeat,
                   "weights_source": "random valid GGUF blocks (a dequantisation's time does not depend on values)",
                   "compile": "torch.compile(GgufLinear, fullgraph=True, dynamic=False), inductor deterministic"},
        "rows": rows,
    }
    print(json.dumps(result, indent=1 if args.json else None, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
