"""One text-to-image generation, from prompt to PNG, with the transformer forward left pluggable.

:class:`Sampler` is everything around the transformer — prompt embeddings, latents, the FLUX.2
scheduler, the VAE — done exactly as diffusers' ``Flux2KleinPipeline`` / ``Flux2Pipeline`` do it
(the tests compare). :func:`run_generation` drives it step by step and hands each step's transformer
forward to a runner: :class:`LocalRunner` runs every block in this process (``meshtui generate
--local``, the reference); the head daemon's split runner sends the stream across the mesh.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import functools
import logging
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ..config import describe_ranges
from ..errors import MeshError, file_refusal
from ..model.compile_events import compiled_event, compiling_event, pending_parts
from ..model.lora import LoraSpec
from ..model.runtime import HostedModel
from ..model.tensorfiles import ModelError
from ..model.span import Conditioning, Stream
from ..node.gpu import GpuWorker
from .png import encode_png
from .request import GenerationParams

log = logging.getLogger(__name__)


@functools.cache
def _diffusers() -> SimpleNamespace:
    """diffusers' pipeline helpers, imported on first use: the pipeline module pulls in transformers
    (~2 s), which a daemon that never runs the head does not need."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415
    from diffusers.pipelines.flux2.pipeline_flux2_klein import (  # noqa: PLC0415
        Flux2KleinPipeline,
        compute_empirical_mu,
        retrieve_timesteps,
    )
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    # Flux2KleinPipeline's static helpers are the reference implementation of everything around
    # the transformer.
    return SimpleNamespace(pipe=Flux2KleinPipeline, scheduler=FlowMatchEulerDiscreteScheduler,
                           mu=compute_empirical_mu, timesteps=retrieve_timesteps, randn=randn_tensor)


def uses_cfg(model: HostedModel, params: GenerationParams) -> bool:
    """True-CFG (a second pass on the empty prompt): base models without a guidance embedding only."""
    return (not model.source.distilled() and not bool(model.preset.transformer["guidance_embeds"])
            and params.guidance > 1.0)


def prompts_needed(model: HostedModel, params: GenerationParams) -> list[str]:
    """The prompts a generation embeds: its own, and the empty one when it runs CFG."""
    return [params.prompt, ""] if uses_cfg(model, params) else [params.prompt]


class Sampler:
    """The per-generation state around the transformer. Methods run on the GPU thread."""

    def __init__(self, model: HostedModel, params: GenerationParams,
                 embeds: dict[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.params = params
        self.device = model.device
        self.dtype = model.dtype
        preset = model.preset
        self.guidance_embeds = bool(preset.transformer["guidance_embeds"])
        self.cfg = uses_cfg(model, params)
        #: Prompt embeddings computed elsewhere (the peer that holds the text encoder), by prompt.
        self.embeds = embeds or {}

    def _prompt_embeds(self) -> list[torch.Tensor]:
        """The embeddings of :func:`prompts_needed`, in its order: given ones as they are, the rest from
        the model in one call (so a CFG run loads the text encoder at most once for both prompts)."""
        prompts = prompts_needed(self.model, self.params)
        todo = [p for p in prompts if p not in self.embeds]
        computed = dict(zip(todo, self.model.encode_prompts(todo))) if todo else {}
        return [(self.embeds[p] if p in self.embeds else computed[p]).to(device=self.device, dtype=self.dtype)
                for p in prompts]

    def prepare(self) -> None:
        """Prompt embeddings, latent noise, position ids, timesteps; embed the text once."""
        p, span, d = self.params, self.model.span, _diffusers()
        self.model.use_loras(p.loras)  # the embedders carry LoRAs too
        embeds = self._prompt_embeds()  # the prompt, then (CFG) the empty one
        self.text_ids = d.pipe._prepare_text_ids(embeds[0]).to(self.device)
        self.txt_len = embeds[0].shape[1]
        self.contexts = [span.embed_text(e) for e in embeds]
        self.latent_hw = self.model.preset.latent_grid(p.height, p.width)
        channels = int(self.model.preset.transformer["in_channels"])
        generator = torch.Generator("cpu").manual_seed(p.seed)
        noise = d.randn((1, channels, *self.latent_hw), generator=generator, device=self.device, dtype=self.dtype)
        self.latent_ids = d.pipe._prepare_latent_ids(noise).to(self.device)
        self.latents = d.pipe._pack_latents(noise)
        self.scheduler = d.scheduler.from_config(self.model.source.scheduler_config())
        sigmas = np.linspace(1.0, 1 / p.steps, p.steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = d.mu(image_seq_len=self.latents.shape[1], num_steps=p.steps)
        self.timesteps, _ = d.timesteps(self.scheduler, p.steps, self.device, sigmas=sigmas, mu=mu)
        self.scheduler.set_begin_index(0)
        self.rotary = span.rotary(self.text_ids, self.latent_ids)
        # The VAE decodes only after the last step; read now (once, then kept), a damaged file fails
        # the generation before any step runs rather than after all of them.
        self.model.vae()
        self.guidance = (
            torch.full([1], p.guidance, device=self.device, dtype=torch.float32).expand(1)
            if self.guidance_embeds else None
        )

    @property
    def passes(self) -> int:
        """Transformer forwards per step: 2 with classifier-free guidance, else 1."""
        return len(self.contexts)

    @property
    def image_tokens(self) -> int:
        return self.latents.shape[1]

    def conditioning(self, step: int) -> Conditioning:
        self.model.use_loras(self.params.loras)  # other jobs' LoRAs may be on the model meanwhile
        t = self.timesteps[step]
        timestep = t.expand(self.latents.shape[0]).to(self.latents.dtype)
        return self.model.span.conditioning(timestep / 1000, self.guidance, self.latents.dtype)

    def embed(self, pass_index: int) -> Stream:
        image = self.model.span.embed_image(self.latents.to(self.dtype))
        return Stream(txt_len=self.txt_len, pair=(self.contexts[pass_index], image))

    def apply(self, step: int, predictions: list[torch.Tensor]) -> None:
        """The scheduler step, combining the passes' predictions (CFG) first."""
        n = self.latents.shape[1]
        predictions = [p.to(self.device) for p in predictions]  # a split's come back on the host
        noise = predictions[0][:, :n]
        if self.cfg:
            uncond = predictions[1][:, :n]
            noise = uncond + self.params.guidance * (noise - uncond)
        self.latents = self.scheduler.step(noise, self.timesteps[step], self.latents, return_dict=False)[0]

    def final_latents(self) -> torch.Tensor:
        """Unpacked, de-normalised, unpatchified latents (what the VAE decodes)."""
        h, w = self.latent_hw
        vae, pipe = self.model.vae(), _diffusers().pipe
        latents = pipe._unpack_latents_with_ids(self.latents, self.latent_ids, h, w)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                                  latents.dtype)
        return pipe._unpatchify_latents(latents * std + mean)

    def decode(self) -> tuple[torch.Tensor, np.ndarray, float]:
        """VAE-decode; returns (final latents, height x width x 3 uint8 pixels, the VAE's seconds)."""
        latents = self.final_latents()
        vae = self.model.vae()
        start = time.perf_counter()
        # Contiguous, as the compiled decoder's graph was traced (compiled.py: _compile_decoder).
        image = vae.decode(latents.to(self.device).contiguous(), return_dict=False)[0]
        if image.is_cuda:
            torch.cuda.current_stream(image.device).synchronize()  # the VAE's time alone (to_pixels waits anyway)
        vae_s = time.perf_counter() - start
        return latents, to_pixels(image)[0], vae_s


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Decoded images (batch x 3 x H x W, in [-1, 1]) as batch x H x W x 3 uint8 on the host, made on their device.

    The same arithmetic as diffusers' ``Flux2ImageProcessor.postprocess(output_type="pil")`` — the
    denormalisation in the images' dtype, then float32 ``* 255``, round half to even, uint8 — so the
    pixels are the same bit for bit (tested), but done before the copy to the host: 3 MB of uint8
    cross instead of 6 MB of bf16, already interleaved (height x width x 3, what PNG and PIL take),
    and the CPU is spared the float32 conversion, scaling and rounding passes over the image."""
    images = (images * 0.5 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize (do_normalize is on)
    images = (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
    return images.contiguous().cpu().numpy()  # contiguous on the device: permute alone keeps planes apart


class StepRunner(Protocol):
    """Runs one transformer forward of a step (all blocks, wherever they are)."""

    async def forward(self, sampler: Sampler, step: int, pass_index: int,
                      cond: Conditioning) -> tuple[torch.Tensor, dict | Awaitable[dict]]:
        """Return the noise prediction and this forward's timing record, or an awaitable of the record
        where it is complete only later (a split head takes the prediction before the reply with the
        hop records arrives). The runner raises a failure of that later part at its next forward."""


class LocalRunner:
    """Every block in this process: the all-local reference."""

    def __init__(self, worker: GpuWorker) -> None:
        self.worker = worker

    async def forward(self, sampler: Sampler, step: int, pass_index: int, cond: Conditioning):
        model = sampler.model

        def compute() -> torch.Tensor:
            model.use_loras(sampler.params.loras)  # jobs with other LoRAs may have run in between
            stream = model.span.run(0, model.preset.num_blocks, sampler.embed(pass_index), cond, sampler.rotary)
            return model.span.final(stream, cond.temb)

        prediction, seconds = await self.worker.run(compute)
        return prediction, {"compute_ms": seconds * 1e3, "hops": []}


@dataclass
class GenerationResult:
    png: bytes
    image: Image.Image
    latents: torch.Tensor
    summary: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[dict], Awaitable[None] | None]


async def _emit(progress: ProgressFn | None, event: dict) -> None:
    if progress is not None:
        result = progress(event)
        if hasattr(result, "__await__"):
            await result


async def compile_blocks(model: HostedModel, worker: GpuWorker, txt_len: int, img_tokens: int,
                         loras: tuple[LoraSpec, ...], *, size: str, node: str,
                         progress: ProgressFn | None, decode_hw: tuple[int, int] | None = None) -> float:
    """Compile the held blocks (and, given the latent grid ``decode_hw``, the VAE decoder) for a geometry
    they have not run yet, announced by a ``compiling`` event (with the expected seconds) and a
    ``compiled`` one; returns the seconds (0: nothing to compile).

    Synchronous on purpose: a generation that ran some steps eager and the rest compiled would give a
    different image than the same seed all compiled (see docs/models.md, "Compiled blocks")."""
    pending = model.compile_pending(txt_len, img_tokens, loras, decode_hw)
    if not pending:
        return 0.0
    estimate, cached = model.compiler.estimate(pending)
    await _emit(progress, compiling_event(node, *pending_parts(model.blocks, pending), size, txt_len + img_tokens, cached,
                                          estimate))
    try:
        seconds, _ = await worker.run(model.warm_compiled, txt_len, img_tokens, loras, decode_hw)
    except MeshError:
        raise
    except ModelError as exc:  # the head's VAE, read when its decoder is first compiled: the file's fault
        raise file_refusal(node or "this peer", exc) from None
    except Exception as exc:  # noqa: BLE001 - inductor's failures (no compiler, a lowering bug) end here
        log.exception("compiling blocks %s for %s failed", describe_ranges(model.blocks), size)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise MeshError("internal", f"{node or 'this peer'} could not compile blocks {describe_ranges(model.blocks)} "
                                    f"for {size}: {type(exc).__name__}: {first} (compile = false runs them "
                                    "eagerly)") from None
    await _emit(progress, compiled_event(node, seconds))
    return seconds


async def run_generation(model: HostedModel, worker: GpuWorker, params: GenerationParams, runner: StepRunner,
                         *, metadata: dict | None = None, progress: ProgressFn | None = None,
                         embeds: dict[str, torch.Tensor] | None = None,
                         before_steps: Callable[[], Awaitable[None]] | None = None) -> GenerationResult:
    """Prompt -> PNG. ``progress`` receives one event per step (and one when decoding starts).
    ``embeds``: prompt embeddings already computed (by the peer holding the text encoder).
    ``before_steps``: awaited once the sampler is prepared and the blocks compiled, before the first
    step (a split head waits there for the stages' prepare, which ran meanwhile). ``metadata`` is read
    at the end, into the summary and the PNG."""
    start = time.perf_counter()
    # The VAE decodes only after the last step: a file closed since the blocks were loaded is reported now.
    model.source.check_head_files(text_encoder=False)
    sampler = Sampler(model, params, embeds)
    _, prep_s = await worker.run(sampler.prepare)
    compile_s = await compile_blocks(model, worker, sampler.txt_len, sampler.image_tokens, params.loras,
                                     size=f"{params.width}x{params.height}",
                                     node=str((metadata or {}).get("head", "")), progress=progress,
                                     decode_hw=sampler.latent_hw)
    if before_steps is not None:
        await before_steps()
    steps = []
    told: asyncio.Future | None = None  # the step events still waiting for a pass's record, in order
    try:
        for step in range(params.steps):
            step_start = time.perf_counter()
            cond, cond_s = await worker.run(sampler.conditioning, step)
            predictions, records = [], []
            for pass_index in range(sampler.passes):
                prediction, record = await runner.forward(sampler, step, pass_index, cond)
                predictions.append(prediction)
                records.append(record)
            _, apply_s = await worker.run(sampler.apply, step, predictions)
            del predictions, prediction  # (a split's may hold runs of a shared region: they go back now)
            record = {
                "step": step,
                "ms": (time.perf_counter() - step_start) * 1e3,
                "head_ms": (cond_s + apply_s) * 1e3,
                "passes": records,
            }
            steps.append(record)
            if told is not None and told.done():
                told.result()  # (a late record's failure ends the generation here, if the runner has not)
                told = None
            if told is None and all(isinstance(r, dict) for r in records):
                await _emit(progress, _step_event(record, params.steps))
            else:  # told once the records are complete, after the steps before it
                told = asyncio.ensure_future(_tell(told, record, progress, params.steps))
                told.add_done_callback(lambda f: f.cancelled() or f.exception())
        if told is not None:
            await told
    finally:
        if told is not None and not told.done():
            told.cancel()
    await _emit(progress, {"kind": "decode"})
    (latents, pixels, vae_s), decode_s = await worker.run(sampler.decode)
    total = time.perf_counter() - start
    info = {
        "flux-mesh": "1",
        "model": model.identity.to_dict(),
        "params": params.to_wire(),
        **(metadata or {}),
    }
    summary = {
        "params": params.to_wire(),
        "model": model.identity.to_dict(),
        "prepare_ms": prep_s * 1e3,
        "compile_s": compile_s,  # the head's blocks, before the first step (0: already compiled)
        "compiled": model.span.block_call is not None,
        "decode_ms": decode_s * 1e3,  # the latents' unpacking, the VAE and the pixels' copy to the host
        "vae_ms": vae_s * 1e3,
        "total_s": total,
        "steps": steps,
        **(metadata or {}),
    }
    # Off the event loop: compressing a 1024x1024 PNG takes long enough to stall every other generation
    # and every keep-alive ping this process serves (and PIL copies RGB pixels into its own layout).
    png, image, png_s = await asyncio.to_thread(_image_files, pixels, info)
    summary["png_ms"] = png_s * 1e3
    return GenerationResult(png=png, image=image, latents=latents.float().cpu(), summary=summary)


def _step_event(record: dict, steps: int) -> dict:
    return {**record, "kind": "step", "step": record["step"] + 1, "steps": steps}


async def _tell(before: asyncio.Future | None, record: dict, progress: ProgressFn | None, steps: int) -> None:
    """Emit a step's event once the step before was told and each pass's record is complete (a
    runner's record may come after its prediction: :class:`StepRunner`); the records replace their
    awaitables in ``record``, the step's entry in the summary."""
    if before is not None:
        await before
    record["passes"] = [r if isinstance(r, dict) else await r for r in record["passes"]]
    await _emit(progress, _step_event(record, steps))


def _image_files(pixels: np.ndarray, info: dict) -> tuple[bytes, Image.Image, float]:
    """(the PNG, the PIL image, the PNG's seconds)."""
    start = time.perf_counter()
    png = png_bytes(pixels, info)
    return png, Image.fromarray(pixels), time.perf_counter() - start


def png_bytes(pixels: np.ndarray, info: dict) -> bytes:
    """The image as PNG with the generation parameters in a ``flux-mesh`` text chunk (and the prompt
    in ``parameters``, where other tools look for it)."""
    return encode_png(pixels, {"flux-mesh": json.dumps(info, sort_keys=True),
                               "parameters": f"{info.get('params', {}).get('prompt', '')}"})
