"""The ``meshtui`` command: the dashboard, ``generate`` (headless), ``demo``, ``peers``.

Imports that load torch (``meshd.pipeline.plan``, ``meshtui.mesh``, the model code: a second or more) or
Textual (the dashboard) stay inside the commands that need them, so ``meshtui --help`` and
``meshtui peers`` start at once; everything cheap is imported here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from meshd.auth import read_key
from meshd.config import default_key_file, default_models_dir
from meshd.errors import MeshError
from meshd.pipeline.blocks import blocks_shown
from meshd.pipeline.request import GenerationParams, LoraByName

from . import __version__, events
from .events import (Compiled, Compiling, Decoding, Dropped, Encoding, Event, LoadDone, LoadStarted, Prepared,
                     Queued, Replanned, Retry, Step)
from .peers_cmd import add_peers_parser, peers_command
from .report import hop_totals, shown_blocks, step_line


def _size(text: str) -> tuple[int, int]:
    a, _, b = text.lower().partition("x")
    try:
        w = int(a)
        h = int(b) if b else w
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must be N or WxH") from None
    return w, h


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn, oil painting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--size", type=_size, help="N or WxH pixels (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:STRENGTH]",
                   help="apply a LoRA (repeatable; every peer needs its own copy, found by hash)")
    p.add_argument("--codec", default="auto", help="auto (policy per link), raw, fp8, u8, hevc-lossless, hevc-qpN")
    p.add_argument("--quality-floor", type=float, help="smallest acceptable cosine per hop for the policy (0.999)")
    p.add_argument("--no-error", dest="measure_error", action="store_false",
                   help="do not measure per-hop reconstruction error (saves a decode per hop)")
    p.add_argument("--out", type=Path, help="write the PNG here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def explicit_generation_args(args: argparse.Namespace) -> dict:
    """The generation flags the user actually gave (not their defaults), e.g. to override remembered ones."""
    parser = argparse.ArgumentParser()
    _add_generation_args(parser)
    defaults = vars(parser.parse_args([]))
    return {k: getattr(args, k) for k in defaults if hasattr(args, k) and getattr(args, k) != defaults[k]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshtui", description="flux-mesh dashboard and client")
    parser.add_argument("--version", action="version", version=f"meshtui {__version__}")
    # With no subcommand, meshtui opens the dashboard; these options are the dashboard's.
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="dashboard: also show this daemon (repeatable; remembered ones are added anyway)")
    parser.add_argument("--key-file", type=Path, help="dashboard: cluster key (default: the config's, else meshd's)")
    parser.add_argument("--peers-file", type=Path,
                        help="dashboard: manual peers, one host:port per line (default ~/.config/flux-mesh/peers)")
    parser.add_argument("--config", type=Path,
                        help="dashboard: settings file (default $MESHTUI_CONFIG or ~/.config/flux-mesh/meshtui.toml)")
    sub = parser.add_subparsers(dest="command")

    g = sub.add_parser("generate", help="run one generation without the UI")
    g.add_argument("--peer", action="append", default=[], help="HOST:PORT of a daemon (repeatable; first = head)")
    g.add_argument("--key-file", type=Path, help="cluster key (default: the user's flux-mesh key)")
    g.add_argument("--split", default="auto", help="auto, or SPEC like A:0-15,B:16-31 (A, B = --peer order)")
    g.add_argument("--local", action="store_true", help="everything in this process, no daemons (the reference)")
    g.add_argument("--model", default="tiny", help="--local only: preset or model folder name")
    g.add_argument("--models-dir", type=Path, action="append", help="--local only: model folder (repeatable)")
    g.add_argument("--comfyui-dir", type=Path, help="--local only: a ComfyUI install to take models and tokenizer from")
    g.add_argument("--lora-dir", type=Path, action="append", help="--local only: LoRA folder (repeatable)")
    g.add_argument("--device", default="auto", help="--local only: cuda, cuda:N or cpu")
    g.add_argument("--random-weights", action="store_true", help="--local only: seeded weights (benchmarks)")
    g.add_argument("--count", type=int, default=1, help="generate N images (seeds seed..seed+N-1), pipelined")
    g.add_argument("--text-encoder", metavar="PEER",
                   help="encode the prompt on this peer (a --peer label A, B, ... or HOST:PORT) instead of the "
                        "head, e.g. when the head has no text_encoder/ or no room for it")
    g.add_argument("--retry", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="if a peer is lost mid-run, drop it, re-plan over the peers left and run again (N times; "
                        "--retry alone: once)")
    _add_generation_args(g)

    d = sub.add_parser("demo", help="two local tiny daemons on loopback and one split generation")
    d.add_argument("--headless", action="store_true", help="no UI: run one generation, print its summary, exit")
    _add_generation_args(d)

    add_peers_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "generate":
        return asyncio.run(generate_command(args))
    if args.command == "demo":
        return demo_command(args)
    if args.command == "peers":
        return peers_command(args)
    if sys.stdout.isatty():
        from .launch import run_app  # noqa: PLC0415 - Textual loads only to open the dashboard

        return run_app(args)
    parser.print_help()
    return 2


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _loras(texts: list[str]) -> tuple[LoraByName, ...]:
    """``NAME[:STRENGTH]``, named without a hash (the head fills it in from its own copy)."""
    out = []
    for text in texts:
        name, _, strength = text.rpartition(":") if ":" in text else (text, "", "")
        try:
            out.append(LoraByName(name, float(strength) if strength else 1.0))
        except ValueError:
            raise SystemExit(f"meshtui: --lora {text!r}: strength must be a number") from None
    return tuple(out)


def _params(args, preset) -> GenerationParams:
    """The request the flags ask for, the model's defaults where they are silent."""
    width, height = args.size or (preset.default_size, preset.default_size)
    return GenerationParams(args.prompt, args.seed, width, height, args.steps or preset.default_steps,
                            preset.default_guidance if args.guidance is None else args.guidance,
                            _loras(getattr(args, "lora", [])))


def _finish(args, png: bytes, summary: dict) -> int:
    summary = {**summary, "hops": hop_totals(summary)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(png)
        summary["out"] = str(args.out)
    _log(f"done in {summary.get('total_s', 0):.2f} s" + (f"; wrote {args.out}" if args.out else ""))
    for hop in summary["hops"]:
        err = hop.get("error_worst")
        _log(f"  {hop['link']}: {hop['codec']} {hop['bytes_per_step']} B/step, encode {hop['encode_ms']} ms, "
             f"wire {hop['wire_ms']} ms, decode {hop['decode_ms']} ms"
             + (f", worst cosine {err['cosine']:.5f}" if err else ""))
    if args.json:
        print(json.dumps(shown_blocks(summary), indent=2, default=str))
    return 0


def _prepared_lines(event: Prepared) -> list[str]:
    sampling = {True: " (step-distilled)", False: " (base model" + (", CFG)" if event.cfg else ")")}
    lines = [f"plan {event.plan}{sampling.get(event.distilled, '')}"]
    for stage in event.stages:
        link = stage.link
        if link is None:
            continue
        rate = link.bandwidth_bytes_per_s
        how = f"{rate * 8 / 1e9:.2f} Gbit/s measured" if rate is not None else link.transport
        lines.append(f"  {stage.node} -> {link.to}: {link.codec} ({how}" + (", emulated" if link.emulated else "") + ")")
    return lines


def progress_lines(event: Event) -> list[str]:
    """What ``meshtui generate`` tells the user on stderr about one event (nothing for most unknown ones)."""
    match event:
        case Step():
            return [step_line(event)]
        case Prepared():
            return _prepared_lines(event)
        case LoadStarted(peer=peer, blocks=blocks):
            return [f"{peer}: loading blocks {blocks_shown(blocks)}"]
        case LoadDone(peer=peer):
            return [f"{peer}: loaded"]
        case Compiling() | Compiled():
            return [event.describe()]
        case Decoding():
            return ["decoding image"]
        case Queued(position=position) if position > 1:
            return [f"queued at position {position}"]
        case Encoding(text_encoder=where):
            return [f"encoding the prompt on {where}"]
        case Retry(lost=lost, reason=reason):
            return [f"lost peer {lost}: {reason}; re-planning over the peers left"]
        case Dropped(peer=peer, reason=reason):
            return [f"dropped peer {peer}: {reason}"]
        case Replanned(plan=plan):
            return [f"new split: {plan}"]
    return []


def _on_event(event: Event) -> None:
    for line in progress_lines(event):
        _log(line)


async def generate_command(args) -> int:
    try:
        if args.local:
            png, summary = await run_local(args)
            return _finish(args, png, summary)
        return await run_split(args)
    except MeshError as exc:
        _log(f"meshtui: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - PlanError, ModelError, AuthError...: one line, not a traceback
        _log(f"meshtui: {type(exc).__name__}: {exc}")
        return 1


async def run_local(args) -> tuple[bytes, dict]:
    # torch and the model code load only for a local run.
    import torch  # noqa: PLC0415

    from meshd.pipeline.generation import LocalRunner, run_generation  # noqa: PLC0415
    from meshd.node.gpu import GpuWorker  # noqa: PLC0415
    from meshd.model.files import ModelStore  # noqa: PLC0415
    from meshd.model.comfyui import lora_dirs  # noqa: PLC0415
    from meshd.model.lora import LoraStore  # noqa: PLC0415
    from meshd.model.runtime import HostedModel, open_source  # noqa: PLC0415

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    comfyui_dir = getattr(args, "comfyui_dir", None)
    lora_dir = getattr(args, "lora_dir", None) or []
    store = ModelStore(args.models_dir or ([] if comfyui_dir else [default_models_dir()]), comfyui_dir=comfyui_dir,
                       lora_dir=lora_dir)
    source = open_source(args.model, store, random_weights=args.random_weights)
    model = HostedModel(source, device, torch.bfloat16)
    model.lora_store = LoraStore(lora_dirs(lora_dir, comfyui_dir))  # as the daemon's
    worker = GpuWorker(device)
    n = model.preset.num_blocks
    await worker.run(model.load, range(n), True, True)
    asked = _params(args, model.preset)
    resolved = replace(asked, loras=tuple(model.lora_store.spec(lora.name, lora.strength) for lora in asked.loras))
    # Checked as the head checks a request (sizes, steps, LoRAs), so --local refuses what a split refuses.
    params = GenerationParams.from_wire(resolved.to_wire(), multiple=model.preset.size_multiple)
    result = await run_generation(model, worker, params, LocalRunner(worker), metadata={"plan": "local"},
                                  progress=lambda header: _on_event(events.from_wire(header)))
    worker.shutdown()
    return result.png, {**result.summary, "mode": "local"}


async def run_split(args) -> int:
    # These load torch (through meshd.pipeline.plan and codec): only a split run pays for it.
    from meshd.pipeline.plan import PeerAddress  # noqa: PLC0415

    from .mesh import Mesh  # noqa: PLC0415
    from .splitting import tokens_for  # noqa: PLC0415

    if not args.peer:
        _log("meshtui generate: give at least one --peer HOST:PORT (or --local)")
        return 2
    key = read_key(args.key_file or default_key_file())
    mesh = Mesh(key)
    try:
        for text in args.peer:
            mesh.add(PeerAddress.parse(text))
        for peer in await mesh.connect_all():
            if peer.online:
                _log(f"{peer.label} {peer.address}: {peer.name}, {peer.info.model.model_id}, "
                     f"{peer.info.device}, rtt {peer.rtt_ms:.1f} ms")
        preset = mesh.model()
        params = _params(args, preset)
        tokens = tokens_for(preset, params.width, params.height)
        plan = mesh.plan(args.split, tokens)
        _log(f"split: {mesh.describe_plan(plan)}")
        for note in mesh.plan_notes(plan):
            _log(f"note: {note}")
        text_encoder = None
        if args.text_encoder:
            known = mesh.peers.get(args.text_encoder)
            text_encoder = known.address if known is not None else PeerAddress.parse(args.text_encoder)
            _log(f"text encoder on {text_encoder}")
        await mesh.apply(plan, on_event=_on_event)
        runs = await asyncio.gather(*(
            mesh.generate_with_retry(plan, replace(params, seed=params.seed + i), retries=args.retry,
                                     codec=args.codec, quality_floor=args.quality_floor,
                                     measure_error=args.measure_error, text_encoder=text_encoder,
                                     on_event=_on_event)
            for i in range(max(1, args.count))
        ))
        outcomes = [outcome for outcome, _ in runs]
        summary = {**outcomes[0].summary, "mode": "split"}
        if len(outcomes) > 1:
            summary["images"] = [o.summary for o in outcomes]
            if args.out:
                for i, o in enumerate(outcomes[1:], start=1):
                    args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}").write_bytes(o.png)
        return _finish(args, outcomes[0].png, summary)
    finally:
        await mesh.close()


def demo_command(args) -> int:
    if not args.headless:
        try:
            from .launch import run_demo_app  # noqa: PLC0415 - Textual loads only to open the dashboard
        except ImportError:
            run_demo_app = None
        if run_demo_app is not None and sys.stdout.isatty():
            return run_demo_app(explicit_generation_args(args))
    try:
        return asyncio.run(demo_headless(args))
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        _log(f"meshtui demo: {type(exc).__name__}: {exc}")
        return 1


async def demo_headless(args) -> int:
    # These load torch (through meshd.pipeline.plan and codec): only the demo pays for it.
    from .local import LocalCluster  # noqa: PLC0415
    from .mesh import Mesh  # noqa: PLC0415
    from .splitting import tokens_for  # noqa: PLC0415

    start = time.perf_counter()
    _log("starting two meshd daemons on loopback (tiny model, fresh cluster key)...")
    with LocalCluster(models_dir=default_models_dir(), common_args=["--model", "tiny", "--device", "cpu"]) as cluster:
        cluster.add("demo-a")
        cluster.add("demo-b")
        addresses = cluster.start()
        _log("daemons up: " + ", ".join(str(a) for a in addresses) + f" ({time.perf_counter() - start:.1f} s)")
        mesh = Mesh(read_key(cluster.key_file))
        try:
            for address in addresses:
                mesh.add(address)
            await mesh.connect_all()
            preset = mesh.model()
            params = _params(args, preset)
            tokens = tokens_for(preset, params.width, params.height)
            plan = mesh.plan("auto", tokens)
            _log(f"split: {mesh.describe_plan(plan)}")
            for note in mesh.plan_notes(plan):
                _log(f"note: {note}")
            await mesh.apply(plan, on_event=_on_event)
            outcome = await mesh.generate(plan, params, codec=args.codec, quality_floor=args.quality_floor,
                                          measure_error=args.measure_error, on_event=_on_event)
        finally:
            await mesh.close()
        return _finish(args, outcome.png, {**outcome.summary, "mode": "demo"})
