#!/usr/bin/env python3
"""Split vs all-local on one machine: seconds, bytes per step, per-hop times, error, peak VRAM,
pipelined queues.

    python bench/split_bench.py --model klein-9b --random-weights --size 1024 --steps 4 --json
    python bench/split_bench.py ... --emulate-link 1gbit,0.3ms --queue 4   # figures labelled "emulated"
    python bench/split_bench.py ... --unsealed   # the same, frames not sealed: the cost of sealing
    python bench/split_bench.py ... --codecs raw --compile on,off          # compiled blocks vs eager
    python bench/split_bench.py ... --codecs raw --transport shm --interleave  # local and split runs alternate

The all-local reference runs in this process (every block on --device); the split runs over two
``meshd`` daemons on the same machine (both on --device) joined by loopback TCP, or by a link
emulated inside the transport (token bucket on bytes sent + a fixed delay, both directions). The
first generation of each kind is a warm-up and is not timed.

HEVC on a GPU without NVENC: with --hevc-ahead the daemons keep the libx265 frames of the warm-up
run and replay them in the timed runs (codec.core.ReplayCache, installed by bench/hevc_ahead's
sitecustomize: the daemon has no switch for it), i.e. HEVC "encoded ahead of time by x265": the timed
figures then exclude encoding. Without it, HEVC is encoded live on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import time_calls  # noqa: E402
from meshd.auth import read_key  # noqa: E402
from meshd.pipeline.generation import GenerationParams, LocalRunner, Sampler, run_generation  # noqa: E402
from meshd.node.gpu import GpuWorker  # noqa: E402
from meshd.wire.link import LinkEmulation  # noqa: E402
from meshd.model.compiled import INDUCTOR_ENV, BlockCompiler, CompileCache  # noqa: E402
from meshd.model.files import ModelStore  # noqa: E402
from meshd.model.runtime import HostedModel, open_source  # noqa: E402
from meshd.pipeline.plan import parse_split  # noqa: E402
from meshd.pipeline.progress import BREAKDOWN, passes_from_wire  # noqa: E402
from meshd.wire import seal  # noqa: E402
from meshtui.local import LocalCluster  # noqa: E402
from meshtui.mesh import Mesh, labels  # noqa: E402
from meshtui.report import hop_totals  # noqa: E402


def log(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def time_forward_vs_diffusers(model: HostedModel, params: GenerationParams, repeat: int = 5) -> dict:
    """Our span forward (all blocks) vs diffusers' own Flux2Transformer2DModel.forward, same weights."""
    from diffusers import Flux2Transformer2DModel

    device, preset = model.device, model.preset
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(**preset.transformer)
    state = model.span.state_dict()
    ref.load_state_dict(state, strict=False, assign=True)  # same tensors, shared storage
    missing = [n for n, p in ref.named_parameters() if p.device.type == "meta"]
    if missing:
        return {"skipped": f"weights missing for {missing[:3]}"}
    ref.eval()
    sampler = Sampler(model, params)
    with torch.inference_mode():
        sampler.prepare()
        cond = sampler.conditioning(0)
        timestep = (sampler.timesteps[0].expand(1).to(sampler.latents.dtype)) / 1000
        latents = sampler.latents.to(model.dtype)
        embeds = model.encode_prompt(params.prompt)

        def ours():
            s = model.span.run(0, preset.num_blocks, sampler.embed(0), cond, sampler.rotary)
            return model.span.final(s, cond.temb)

        def theirs():
            return ref(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep, img_ids=sampler.latent_ids,
                       txt_ids=sampler.text_ids, guidance=None, return_dict=False)[0]

        out = {}
        for name, fn in (("ours", ours), ("diffusers", theirs), ("ours_again", ours)):
            fn()
            times, result = time_calls(fn, device, repeat)
            out[f"{name}_forward_ms"] = statistics.median(times)
            out[f"{name}_result"] = result
        same = torch.equal(out.pop("ours_result"), out.pop("diffusers_result"))
        out.pop("ours_again_result")
    out["identical_output"] = same
    out["ours_over_diffusers"] = out["ours_forward_ms"] / out["diffusers_forward_ms"]
    del ref
    return out


@dataclass
class KeptLocal:
    """The all-local model kept loaded (``--interleave``) for the split's runs to alternate with."""

    model: HostedModel | None
    worker: GpuWorker
    params: GenerationParams
    device: torch.device

    async def again(self):
        return await run_generation(self.model, self.worker, self.params, LocalRunner(self.worker))

    def close(self) -> None:
        self.worker.shutdown()
        self.model = None
        free_memory(self.device)


@dataclass
class Timed:
    """A codec's timed split generations; with a KeptLocal, the all-local ones run between them."""

    split_s: list[float]
    outcome: object  # the last split generation
    split_step_ms: list[float]
    local_s: list[float]
    local_step_ms: list[float]
    local_summary: dict | None = None  # the last interleaved all-local generation's


def free_memory(device: torch.device) -> None:
    """What a dropped model held goes back to the device (the next one loads into it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


async def run_local(args, device, params, compiled: bool = False, state_dir: Path | None = None,
                    keep: bool = False) -> tuple[dict, KeptLocal | None]:
    """The all-local reference: its figures, and with ``keep`` the loaded model for interleaving."""
    store = ModelStore([args.models_dir])
    source = open_source(args.model, store, random_weights=args.random_weights)
    compiler = BlockCompiler(CompileCache(state_dir / "compile"), source.model_id) if compiled else None
    model = HostedModel(source, device, torch.bfloat16, weights=getattr(args, "weights", "auto"), compiler=compiler)
    worker = GpuWorker(device)
    await worker.run(model.load, range(model.preset.num_blocks), True, True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, result, compile_s = [], None, 0.0
    for i in range(args.repeat + 1):
        t0 = time.perf_counter()
        result = await run_generation(model, worker, params, LocalRunner(worker))
        if i:
            times.append(time.perf_counter() - t0)
        else:
            compile_s = result.summary["compile_s"]  # the untimed warm-up compiles
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out = {
        "seconds": times,
        "median_s": statistics.median(times),
        "peak_vram_bytes": peak,
        "latents": result.latents,
        "pixels": np.asarray(Image.open(io.BytesIO(result.png))),
        "step_ms": [s["ms"] for s in result.summary["steps"]],
        "step_accounting_ms": step_accounting(result.summary),
        "decode_ms": result.summary["decode_ms"],
        "vae_ms": result.summary["vae_ms"],
        "png_ms": result.summary["png_ms"],
        # Where a generation's time goes outside the steps (none of it runs compiled blocks): the
        # prompt and latents before step 1, and after the decode the PNG (the last timed run's figures).
        "prepare_ms": result.summary["prepare_ms"],
        "png_and_copies_ms": (times[-1] - result.summary["total_s"]) * 1e3 if times else None,
        "compiled": compiled,
        "compile_s": compile_s,
    }
    if args.compare_diffusers:
        out["forward_vs_diffusers"] = await worker.run(time_forward_vs_diffusers, model, params)
        out["forward_vs_diffusers"] = out["forward_vs_diffusers"][0]
    if keep:
        return out, KeptLocal(model, worker, params, device)
    worker.shutdown()
    del model, result
    free_memory(device)
    return out, None


def hop_breakdown(summary: dict) -> list[dict]:
    """Per TCP or shared-memory link (in plan order): the median of each part of a hop's time
    (progress.BREAKDOWN: the parts overlap, so they do not add up to the hop; the largest one bounds
    it) over the generation's steps, and whether every step went through pinned staging at each end."""
    links: dict[str, dict] = {}
    for step in summary["steps"]:
        for p in passes_from_wire(step):
            for hop in p.hops:
                if hop.seal_ms is None and hop.transport != "host-shm":  # CUDA IPC, or no hop
                    continue
                row = links.setdefault(hop.link, {"link": hop.link, "codec": hop.codec, "staged_send": True,
                                                  "staged_recv": True, **{name: [] for name in BREAKDOWN}})
                for name in BREAKDOWN:
                    if getattr(hop, name) is not None:
                        row[name].append(getattr(hop, name))
                row["staged_send"] &= hop.staged_send is True
                row["staged_recv"] &= hop.staged_recv is True
    return [{**row, **{name: round(statistics.median(row[name]), 3) if row[name] else None for name in BREAKDOWN}}
            for row in links.values()]


def step_accounting(summary: dict) -> dict:
    """Where a step's time went (medians over the generation's steps, ms): the head's own GPU calls
    (conditioning and scheduler, ``head_ms``), every pass's blocks on each node (``compute_ms``), each
    hop's hand-over as its two ends timed it (sender's encode or device-to-host copy, the wire, the
    receiver's decode or host-to-device copy), and ``other_ms``: the rest, i.e. orchestration (event
    loops, frames, thread hand-offs, the GPU going idle between calls). For an all-local summary the
    same split has no hops, so ``other_ms`` there is the baseline a split's is compared with."""
    rows = []
    for step in summary["steps"]:
        compute = transfer = 0.0
        for p in passes_from_wire(step):
            compute += p.compute_ms or 0.0
            for hop in p.hops:
                compute += hop.compute_ms or 0.0
                transfer += sum(v for v in (hop.encode_ms, hop.wire_ms, hop.decode_ms) if v is not None)
        head = step.get("head_ms") or 0.0
        rows.append({"step_ms": step["ms"], "head_ms": head, "compute_ms": compute, "transfer_ms": transfer,
                     "other_ms": step["ms"] - head - compute - transfer})
    return {name: round(statistics.median(r[name] for r in rows), 3) for name in rows[0]} if rows else {}


def transports(summary: dict) -> list[str]:
    """How the steps' streams crossed each hop (tcp, cuda-ipc, host-shm), in first-seen order."""
    seen = {hop.transport: None for step in summary["steps"] for p in passes_from_wire(step) for hop in p.hops}
    return list(seen)


def wire_bytes(summary: dict) -> int:
    """Bytes that crossed the links in one generation (streams out, predictions back)."""
    total = 0
    for step in summary["steps"]:
        for p in step["passes"]:
            total += sum(h.get("bytes", 0) for h in p["hops"]) + p.get("return_bytes", 0)
    return total


async def timed_generations(mesh, plan, params, codec_name, repeat, kept: KeptLocal | None = None,
                            reference: torch.Tensor | None = None) -> Timed:
    """``repeat`` timed split generations after an untimed one. With ``kept`` (``--interleave``) an
    all-local generation follows each split one, so both sets see the same clocks and temperature;
    each must give ``reference``'s latents again."""
    timed = Timed([], None, [], [], [])
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        timed.outcome = await mesh.generate(plan, params, codec=codec_name, measure_error=False, return_latents=True)
        if i:
            timed.split_s.append(time.perf_counter() - t0)
            timed.split_step_ms += [s["ms"] for s in timed.outcome.summary["steps"]]
        if kept is not None:
            t0 = time.perf_counter()
            result = await kept.again()
            if i:
                timed.local_s.append(time.perf_counter() - t0)
                timed.local_step_ms += [s["ms"] for s in result.summary["steps"]]
                timed.local_summary = result.summary
            if not torch.equal(result.latents, reference):
                raise SystemExit("the all-local generation changed between runs: the comparison would be void")
    return timed


async def run_split(args, cluster, params, local, emulation, kept: KeptLocal | None = None) -> dict:
    mesh = Mesh(read_key(cluster.key_file))
    result = {"runs": []}
    try:
        for d in cluster.daemons:
            mesh.add(d.address)
        await mesh.connect_all()
        preset = mesh.model()
        tokens = preset.max_sequence_length + (params.width // preset.size_multiple) * (params.height // preset.size_multiple)
        plan = (parse_split(args.split, {p.label: p.address for p in mesh.peers.values()}, preset.num_blocks)
                if args.split else mesh.plan("auto", tokens))
        t0 = time.perf_counter()
        await mesh.apply(plan)
        result["plan"] = plan.describe()
        result["load_s"] = time.perf_counter() - t0
        for codec_name in args.codecs.split(","):
            for p in mesh.peers.values():  # every stage's peak is its generation's, not its load's
                await p.channel.request("info", {"reset_peak": True})
            timed = await timed_generations(mesh, plan, params, codec_name, args.repeat, kept, local["latents"])
            times, outcome = timed.split_s, timed.outcome
            peaks = {}
            for p in mesh.peers.values():
                reply = await p.channel.request("info")
                peaks[p.label] = reply.header["node"]["memory"].get("peak_allocated")
            measured = outcome if codec_name == "raw" else await mesh.generate(
                plan, params, codec=codec_name, measure_error=True, return_latents=True)
            pixels = np.asarray(Image.open(io.BytesIO(outcome.png)))
            ref = local["latents"]
            split_s = statistics.median(times)
            hops = hop_totals(measured.summary)
            row = {
                "codec": codec_name,
                "chosen": [h["codec"] for h in hops],
                "transports": transports(outcome.summary),
                # how the predictions came back (host-shm: in the run the stream went out in)
                "returns": sorted({str(p.get("return_via")) for step in outcome.summary["steps"] for p in step["passes"]}),
                # host-shm: whether every forward went ahead of its stream (the stage started on the doorbell)
                "ahead": sorted({hop.ahead is True for step in outcome.summary["steps"] for p in passes_from_wire(step)
                                 for hop in p.hops if hop.transport == "host-shm"}),
                # host-shm: how many forwards' predictions the head took on the stage's answer bell, before the reply
                "answered": sum(p.get("answered") is True for step in outcome.summary["steps"] for p in step["passes"]),
                "forwards": sum(len(step["passes"]) for step in outcome.summary["steps"]),
                "split_seconds": times,
                "split_median_s": split_s,
                "local_median_s": local["median_s"],
                "split_over_local": split_s / local["median_s"],
                "bit_identical_latents": bool(torch.equal(outcome.latents, ref)),
                "identical_pixels": bool(np.array_equal(pixels, local["pixels"])),
                "final_latent_rel_l2": float((outcome.latents - ref).norm() / ref.norm()),
                "image_psnr_db": psnr(pixels, local["pixels"]),
                "hops": hops,
                "stream_bytes_per_step": [h["bytes_per_step"] for h in hops],
                "hop_breakdown_ms": hop_breakdown(outcome.summary),
                "step_accounting_ms": step_accounting(outcome.summary),
                "return_bytes_per_step": measured.summary["steps"][0]["passes"][0].get("return_bytes"),
                "wire_bytes_total": wire_bytes(outcome.summary),
                "step_ms": [round(s["ms"], 2) for s in outcome.summary["steps"]],
                "peak_vram_bytes": peaks,
            }
            if kept is not None:  # both sides' steps from the same timed runs
                row["local_interleaved_s"] = timed.local_s
                row["split_over_local_interleaved"] = split_s / statistics.median(timed.local_s)
                row["step_split_over_local_interleaved"] = (statistics.median(timed.split_step_ms)
                                                            / statistics.median(timed.local_step_ms))
                row["local_interleaved_step_accounting_ms"] = step_accounting(timed.local_summary)
            if emulation:
                wire_s = row["wire_bytes_total"] / emulation.rate_bytes_per_s
                row["emulated_wire_s"] = wire_s
                row["overhead_over_wire"] = (split_s - local["median_s"]) / wire_s
            if local.get("peak_vram_bytes"):
                row["head_peak_over_local_peak"] = (peaks.get("A") or 0) / local["peak_vram_bytes"]
            result["runs"].append(row)
            log(f"{codec_name} ({'/'.join(row['chosen'])}): split {split_s:.3f} s vs local {local['median_s']:.3f} s "
                f"(x{row['split_over_local']:.3f}) over {'/'.join(row['transports'])}, "
                f"bit-identical={row['bit_identical_latents']}, "
                f"rel_l2={row['final_latent_rel_l2']:.2e}, bytes/step={row['stream_bytes_per_step']}"
                + (f", overhead/wire={row['overhead_over_wire']:.3f}" if emulation else ""))
            if kept is not None:
                log(f"  interleaved with all-local runs: whole x{row['split_over_local_interleaved']:.3f}, "
                    f"median step x{row['step_split_over_local_interleaved']:.3f}")
            acc = row["step_accounting_ms"]
            base = row.get("local_interleaved_step_accounting_ms") or local.get("step_accounting_ms") or {}
            log("  per step (median ms): " + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in acc.items())
                + (f"; all-local other {base['other_ms']:.2f}" if base else ""))
            for part in row["hop_breakdown_ms"]:
                log(f"  {part['link']} ({part['codec']}, staged send/recv {part['staged_send']}/{part['staged_recv']}): "
                    + ", ".join(f"{name[:-3]} {part[name]}" for name in BREAKDOWN) + " ms (median per step)")
        if args.queue:
            codec_name = args.queue_codec
            await timed_generations(mesh, plan, params, codec_name, 0)  # warm-up
            t0 = time.perf_counter()
            for i in range(args.queue):
                await mesh.generate(plan, replace(params, seed=params.seed + i), codec=codec_name, measure_error=False)
            sequential = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.gather(*(mesh.generate(plan, replace(params, seed=params.seed + i), codec=codec_name,
                                                 measure_error=False) for i in range(args.queue)))
            pipelined = time.perf_counter() - t0
            result["queue"] = {"images": args.queue, "codec": codec_name, "sequential_s": sequential,
                               "pipelined_s": pipelined, "speedup": sequential / pipelined}
            log(f"queue of {args.queue}: sequential {sequential:.2f} s, pipelined {pipelined:.2f} s "
                f"(x{sequential / pipelined:.2f})")
    finally:
        await mesh.close()
    return result


def bench_one(args, device, params, setting: str) -> dict:
    """The all-local reference and the split runs with compiled blocks ("on") or eager ones ("off")."""
    state = (args.workdir or Path("/tmp/flux-mesh-split-bench")) / f"local-state-compile-{setting}"
    inherited = os.environ.get(INDUCTOR_ENV)
    local, kept = asyncio.run(run_local(args, device, params, compiled=setting == "on", state_dir=state,
                                        keep=args.interleave))
    # The local run pointed inductor at its own state dir: the daemons (children) must use theirs.
    if inherited is None:
        os.environ.pop(INDUCTOR_ENV, None)
    else:
        os.environ[INDUCTOR_ENV] = inherited
    log(f"compile {setting}: local {local['median_s']:.3f} s (compile {local['compile_s']:.1f} s), "
        f"peak VRAM {local['peak_vram_bytes']}")
    common = ["--model", args.model, "--compile", setting]
    if args.random_weights:
        common.append("--random-weights")
    if args.emulate_link:
        common += ["--emulate-link", args.emulate_link]
    env = daemon_env(args)
    emulation = LinkEmulation.parse(args.emulate_link) if args.emulate_link else None
    devices = args.devices.split(",") if args.devices else [str(device), str(device)]
    workdir = args.workdir / f"compile-{setting}" if args.workdir else None
    with LocalCluster(workdir=workdir, models_dir=args.models_dir, common_args=common) as cluster:
        if args.transport != "auto":
            # tcp: both same-host paths off (loopback TCP); shm: CUDA IPC off, shared host memory on.
            config = cluster.workdir / f"{args.transport}-only.toml"
            config.write_text("[meshd]\nsame_host_ipc = false\n"
                              + ("same_host_shm = false\n" if args.transport == "tcp" else ""))
            common += ["--config", str(config)]
        for label, each in zip(labels(len(devices)), devices):  # A, B (, C, ...): one daemon per device named
            cluster.add(label, "--device", each, env=env)
        cluster.start(timeout=300)
        try:
            split = asyncio.run(run_split(args, cluster, params, local, emulation, kept))
        finally:
            if kept is not None:
                kept.close()
    shown = {k: v for k, v in local.items() if k not in ("latents", "pixels")}
    return {"devices": devices, "local": shown, **split}


def daemon_env(args) -> dict:
    """The daemons' environment: the benchmark-only hooks asked for, each a folder whose sitecustomize
    patches the daemon's process before meshd starts (bench/unsealed: no sealing; bench/hevc_ahead:
    libx265 frames replayed). The daemon itself has no benchmark switch."""
    here = Path(__file__).resolve().parent
    hooks = [str(here / name) for name, wanted in (("unsealed", args.unsealed), ("hevc_ahead", args.hevc_ahead),
                                                   ("trace", args.trace)) if wanted]
    if not hooks:
        return {}
    env = {"PYTHONPATH": os.pathsep.join([*hooks, *filter(None, [os.environ.get("PYTHONPATH", "")])])}
    if args.trace:
        env["FLUX_MESH_TRACE_DIR"] = str(args.trace.resolve())
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="klein-9b")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/flux-mesh-models"))
    parser.add_argument("--device", default="cuda", help="device of the all-local reference")
    parser.add_argument("--devices", default="",
                        help="devices of daemons A,B[,C...], one daemon each (default: --device for A and B)")
    parser.add_argument("--transport", choices=["auto", "tcp", "shm"], default="auto",
                        help="auto: CUDA IPC between stages of one host when it works, else shared host memory; "
                             "tcp: always loopback TCP; shm: shared host memory (CUDA IPC off)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--split", help="plan SPEC (default: the planner's balanced split over the two daemons)")
    parser.add_argument("--codecs", default="raw,fp8,u8,hevc-lossless,hevc-qp18,auto")
    parser.add_argument("--emulate-link", default="", help="e.g. 1gbit,0.3ms (figures are labelled emulated)")
    parser.add_argument("--hevc-ahead", action="store_true", help="replay libx265 frames from the warm-up run")
    parser.add_argument("--queue", type=int, default=0, help="also time N images sequential vs pipelined")
    parser.add_argument("--queue-codec", default="auto")
    parser.add_argument("--compare-diffusers", action="store_true", help="time our forward vs diffusers' own")
    parser.add_argument("--compile", default="off",
                        help="comma list of on/off: run everything with the blocks compiled, eagerly, or both "
                             "(default off, the figures before compiled blocks existed)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--interleave", action="store_true",
                        help="keep the all-local model loaded and run one all-local generation after each split "
                             "one (ratios from both sets, side by side in time; needs VRAM for both)")
    parser.add_argument("--workdir", type=Path, help="keep the daemons' key, state and logs here")
    parser.add_argument("--unsealed", action="store_true",
                        help="benchmark only: daemons and client seal no frame (to measure what sealing costs)")
    parser.add_argument("--trace", type=Path, metavar="DIR",
                        help="benchmark only: record a timeline of every process's steps in DIR "
                             "(report: python bench/steptrace.py DIR)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.trace:
        from bench import steptrace  # noqa: PLC0415

        steptrace.install(str(args.trace), "bench")
    if args.unsealed:
        seal.BENCH_UNSEALED = True  # this process's connections (the client); the daemons get it below
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    params = GenerationParams(prompt="a lighthouse on a cliff at dawn", seed=1, width=args.size, height=args.size,
                              steps=args.steps, guidance=1.0)
    settings = [c.strip() for c in args.compile.split(",") if c.strip()]
    if not settings or any(c not in ("on", "off") for c in settings):
        parser.error(f"--compile {args.compile!r}: a comma list of on and off")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    runs = {setting: bench_one(args, device, params, setting) for setting in settings}
    result = {
        "bench": "split",
        "machine": {"host": platform.node(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cpus": os.cpu_count(), "torch": torch.__version__},
        "config": {"model": args.model, "random_weights": args.random_weights, "size": args.size, "steps": args.steps,
                   "link": (LinkEmulation.parse(args.emulate_link).describe() if args.emulate_link else
                            {"tcp": "loopback TCP", "shm": "same host, shared host memory (CUDA IPC off)"}.get(
                                args.transport, "same host (CUDA IPC where it works, else shared host memory)")),
                   "devices": runs[settings[0]]["devices"],
                   "hevc_encoding": ("libx265 ahead of time (replayed)" if args.hevc_ahead else "libx265 live (CPU)")
                   + " where the GPU has no NVENC",
                   "text_encoder": "stand-in on the head's CPU (random weights have no real text encoder)",
                   "frames": "unsealed (benchmark-only build)" if args.unsealed else "sealed (AES-256-GCM)"},
    }
    if len(settings) == 1:
        result.update({k: v for k, v in runs[settings[0]].items() if k != "devices"})
        result["config"]["compile"] = settings[0]
    else:
        result["compile"] = {s: {k: v for k, v in r.items() if k != "devices"} for s, r in runs.items()}
        if {"on", "off"} <= set(runs):
            on, off = runs["on"], runs["off"]
            result["compiled_over_eager"] = {
                "local": on["local"]["median_s"] / off["local"]["median_s"],
                "split": {row["codec"]: row["split_median_s"] / base["split_median_s"]
                          for row, base in zip(on["runs"], off["runs"])},
            }
            log(f"compiled/eager: {result['compiled_over_eager']}")
    print(json.dumps(result, indent=1 if args.json else None, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
