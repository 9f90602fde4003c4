"""A model as one peer hosts it: where its weights come from, the blocks it holds with the LoRAs
they carry, and (on the head, or a peer placed to encode prompts) the VAE, text encoder and scheduler."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .compiled import BlockCompiler
from .files import ModelError, ModelFiles, ModelStore
from .lora import LoraError, LoraPatch, LoraSpec, LoraStore, held_linears, stack_factors
from .presets import ModelPreset, get_preset
from .seeded import seeded_value
from .span import HEAD_MODULES, TAIL_MODULES, SpanModel, block_prefix, span_modules
from .tensorfiles import FileHashes, read_json, require_safetensors
from .text_encoder import (
    STAND_IN_CLASS,
    LanguageModelEncoder,
    PromptEmbedder,
    PromptEncoder,
    StandInTextEncoder,
    TextEncoderOptions,
)
from .tiny import write_tiny

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelIdentity:
    """What a plan checks before anything runs: the same model, the same bytes, the same dtype."""

    model_id: str
    preset: str
    content_hash: str
    dtype: str

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "preset": self.preset, "hash": self.content_hash, "dtype": self.dtype}

    def describe(self) -> str:
        return f"{self.model_id} ({self.preset}, {self.dtype}, sha256 {self.content_hash[:12]})"


class WeightSource:
    """Where a span's tensors come from."""

    preset: ModelPreset
    model_id: str

    def content_hash(self) -> str:
        raise NotImplementedError

    def read(self, expected: dict[str, torch.Size], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def vae(self, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError

    def text_encoder(self, device: torch.device, dtype: torch.dtype) -> PromptEncoder:
        """The prompt encoder, loaded on ``device``; ModelError when this source has none."""
        raise NotImplementedError

    def has_text_encoder(self) -> bool:
        return True

    def text_encoder_identity(self) -> str:
        """What two peers compare before one uses the other's prompt embeddings."""
        raise NotImplementedError

    def scheduler_config(self) -> dict:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **self.preset.scheduler}

    def distilled(self) -> bool:
        return self.preset.distilled


class FolderSource(WeightSource):
    """A model in the configured model folders: a diffusers folder or a single-file checkpoint."""

    def __init__(self, files: ModelFiles, cache_dir: Path | None = None) -> None:
        self.files = files
        self.checkpoint = files.checkpoint
        self.preset = files.preset
        self.model_id = files.model_id
        self._cache_dir = cache_dir
        self._hash: str | None = None
        self._te_hash: str | None = None

    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = self.checkpoint.content_hash(self._cache_dir)
        return self._hash

    def read(self, expected, device, dtype):
        return self.checkpoint.read(expected, device, dtype)

    def vae(self, device, dtype):
        from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

        folder = self.files.component("vae")
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} is missing: the head needs the VAE")
        require_safetensors(folder)
        return AutoencoderKLFlux2.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                  use_safetensors=True).to(device).eval()

    def has_text_encoder(self) -> bool:
        try:
            return (self.files.component("text_encoder") / "config.json").is_file()
        except ModelError:
            return False

    def text_encoder(self, device, dtype):
        if not self.has_text_encoder():
            where = self.files.components or self.files.root
            raise ModelError(f"{where} has no text_encoder/; encode prompts on a peer that has it (a plan can "
                             "place the text encoder there), or add text_encoder/ and tokenizer/ from the "
                             "diffusers release")
        folder = self.files.component("text_encoder")
        config = folder / "config.json"
        if read_json(config).get("_class_name") == STAND_IN_CLASS:
            return StandInTextEncoder.load(folder).to(device)
        return LanguageModelEncoder.load(folder, self.files.component("tokenizer"), self.preset, device, dtype)

    def text_encoder_identity(self) -> str:
        """sha256 over the text encoder's and tokenizer's files (hashed once, then remembered)."""
        if not self.has_text_encoder():
            raise ModelError(f"{self.files.root} has no text encoder")
        if self._te_hash is None:
            hashes = FileHashes(self._cache_dir)
            digest = hashlib.sha256()
            for sub in ("text_encoder", "tokenizer"):
                folder = self.files.component(sub)
                for path in sorted(folder.glob("*")) if folder.is_dir() else []:
                    if path.is_file():
                        digest.update(f"{sub}/{path.name}\0{hashes.sha256(path)}\n".encode())
            self._te_hash = digest.hexdigest()
        return self._te_hash

    def scheduler_config(self) -> dict:
        return self._scheduler_config

    @functools.cached_property
    def _scheduler_config(self) -> dict:  # read once, not per generation
        if self.files.components is not None:
            path = self.files.components / "scheduler" / "scheduler_config.json"
            if path.is_file():
                return read_json(path)
        return super().scheduler_config()

    def distilled(self) -> bool:
        """model_index.json's ``is_distilled`` when the model has its own; else the preset's default (klein's
        released checkpoints are the step-distilled ones)."""
        return self._distilled

    @functools.cached_property
    def _distilled(self) -> bool:  # read once, not per generation
        if self.files.own_components:
            path = self.files.components / "model_index.json"
            if path.is_file():
                data = read_json(path)
                if "is_distilled" in data:
                    return bool(data["is_distilled"])
        return self.preset.distilled


class RandomSource(WeightSource):
    """A preset's real-size config with seeded per-tensor weights built on the device (benchmarks).

    Every peer builds exactly the tensors of its own span, identical to an all-local run's.
    """

    def __init__(self, preset: ModelPreset, seed: int = 0) -> None:
        self.preset = preset
        self.seed = seed
        self.model_id = f"{preset.name}-random{seed}"
        self._base = f"random/{preset.name}/{seed}"

    def content_hash(self) -> str:
        return hashlib.sha256(f"flux-mesh seeded weights v1|{self._base}".encode()).hexdigest()

    def read(self, expected, device, dtype):
        return {name: seeded_value(self._base, name, tuple(shape), device, dtype) for name, shape in expected.items()}

    def vae(self, device, dtype):
        from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

        with torch.device("meta"):
            vae = AutoencoderKLFlux2(**self.preset.vae)
        state = {
            name: seeded_value(f"{self._base}/vae", name, tuple(t.shape), device, dtype if t.dtype.is_floating_point else t.dtype)
            for name, t in vae.state_dict().items()
        }
        vae.load_state_dict(state, assign=True)
        return vae.eval()

    def text_encoder(self, device, dtype):
        joint = int(self.preset.transformer["joint_attention_dim"])
        return StandInTextEncoder.create(joint, self.preset.max_sequence_length).to(device)

    def text_encoder_identity(self) -> str:
        return hashlib.sha256(f"flux-mesh stand-in text encoder v1|{self.preset.name}".encode()).hexdigest()


def open_source(model: str, store: ModelStore, *, random_weights: bool = False, seed: int = 0) -> WeightSource:
    """The weight source for ``--model``: a preset with ``--random-weights``, ``tiny`` (written on first
    use), or a model folder (by name or path) inside the model folders."""
    if random_weights:
        return RandomSource(get_preset(model), seed)
    if model == "tiny":
        if not store.dirs:
            raise ModelError("no model folder is configured to write the tiny model into")
        try:
            store.resolve("tiny")
        except ModelError:
            write_tiny(store.dirs[0] / "tiny")
    return FolderSource(store.open(model), store.cache_dir)


class HostedModel:
    """The blocks (and head/tail modules) one daemon holds, loaded from a weight source, with the LoRAs
    they carry; and the head-side parts (VAE, prompt embeddings) loaded when first needed."""

    def __init__(self, source: WeightSource, device: torch.device, dtype: torch.dtype,
                 text_encoder: TextEncoderOptions | None = None, compiler: BlockCompiler | None = None) -> None:
        self.source = source
        #: Runs the blocks through compiled graphs when set (compile = on); None runs them eagerly.
        self.compiler = compiler
        self.preset = source.preset
        self.device = device
        self.dtype = dtype
        self.span: SpanModel | None = None
        self.loras: tuple[LoraSpec, ...] = ()
        self.lora_store: LoraStore | None = None  # this peer's LoRA folders (set by its owner)
        self._lora_store: LoraStore | None = None
        self._lora_patch: LoraPatch | None = None
        # Stacked factors of recently used LoRA sets: jobs with different sets take turns on the GPU
        # queue, and switching then costs hook registration, not file reads.
        self._lora_factors: dict[tuple[LoraSpec, ...], dict] = {}
        self._vae = None
        self._lock = threading.Lock()
        shape = (self.preset.max_sequence_length, int(self.preset.transformer["joint_attention_dim"]))
        self.prompts = PromptEmbedder(lambda d: source.text_encoder(d, dtype), text_encoder or TextEncoderOptions(),
                                      device, dtype, shape)
        self.identity = ModelIdentity(source.model_id, self.preset.name, source.content_hash(),
                                      next(k for k, v in DTYPES.items() if v == dtype))

    @property
    def blocks(self) -> tuple[int, ...]:
        return self.span.block_indices if self.span else ()

    @property
    def has_head(self) -> bool:
        return bool(self.span and self.span.has_head)

    @property
    def has_tail(self) -> bool:
        return bool(self.span and self.span.has_tail)

    def holds(self, start: int, end: int) -> bool:
        return all(i in self.blocks for i in range(start, end))

    def load(self, blocks: Iterable[int], head: bool, tail: bool,
             progress: Callable[[int, int], None] | None = None) -> None:
        """Hold exactly ``blocks`` (+ head/tail modules): keep what is loaded, read what is missing,
        free the rest. The current LoRAs are applied to the new set of layers. Runs on the GPU thread."""
        blocks = sorted(set(blocks))
        new = span_modules(self.preset, blocks, head, tail)
        old = self.span
        wanted = {}
        for name, tensor in new.state_dict(keep_vars=True).items():
            wanted[name] = tensor.shape
        kept = {}
        if old is not None:
            old_state = old.state_dict(keep_vars=True)
            kept = {n: t for n, t in old_state.items() if n in wanted and t.device.type != "meta"}
        todo = {n: s for n, s in wanted.items() if n not in kept}
        groups = _group_by_module(self.preset, todo)
        done = 0
        loaded = dict(kept)
        for group in groups:
            loaded.update(self.source.read(group, self.device, self.dtype))
            done += 1
            if progress:
                progress(done, len(groups))
        new.load_state_dict(loaded, strict=True, assign=True)
        new.requires_grad_(False).eval()
        self._drop_lora_patch()
        self._lora_factors.clear()  # they were cut to the old set of layers
        self.span = new
        del old, kept, loaded
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            if self.loras:
                self._lora_patch = self._patch_for(self.loras, self._lora_store)
        except LoraError as exc:
            self.loras = ()
            raise LoraError(f"blocks loaded, but without LoRAs: {exc}") from None
        finally:
            self._choose_block_call()

    # --- LoRAs ----------------------------------------------------------------------------------

    def set_loras(self, specs: Iterable[LoraSpec], store: LoraStore) -> None:
        """Make the held layers carry exactly ``specs`` (in order), each from this peer's own copy found by
        hash in ``store``. Idempotent; the previous set is removed exactly (the weights are never written).
        On a LoraError nothing changes. Runs on the GPU thread."""
        specs = tuple(specs)
        if specs == self.loras:  # load() keeps the current set applied, so equal means already carried
            return
        patch = self._patch_for(specs, store)  # raises before anything changes
        self._drop_lora_patch()
        self._lora_patch = patch
        self.loras = specs
        self._lora_store = store
        self._choose_block_call()

    def use_loras(self, specs: Iterable[LoraSpec]) -> None:
        """:meth:`set_loras` from this peer's own LoRA folders (``lora_store``). GPU thread."""
        specs = tuple(specs)
        if specs != self.loras:
            if specs and self.lora_store is None:
                raise LoraError("this peer has no LoRA folder configured (lora_dir)")
            self.set_loras(specs, self.lora_store)

    def _patch_for(self, specs: tuple[LoraSpec, ...], store: LoraStore | None) -> LoraPatch | None:
        if not specs:
            return None
        factors = self._lora_factors.get(specs)
        if factors is None:
            files = [(spec, store.open(spec, self.preset)) for spec in specs]
            if self.span is None:
                return None
            held = held_linears(self.span)
            loaded = [(spec, lora.factors(held)) for spec, lora in files]
            factors = stack_factors(loaded, self.device, self.dtype)
            while len(self._lora_factors) >= 4:
                self._lora_factors.pop(next(iter(self._lora_factors)))
            self._lora_factors[specs] = factors
        return LoraPatch(self.span, factors)

    # --- compiled blocks ------------------------------------------------------------------------

    def _choose_block_call(self) -> None:
        # Dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards): a
        # graph compiled without the LoRA hooks would silently run without them. With LoRAs the
        # blocks run eagerly, on every peer alike, so a split with LoRAs still equals the all-local run.
        if self.span is not None:
            use = self.compiler is not None and self._lora_patch is None
            self.span.block_call = self.compiler.call if use else None

    def compile_pending(self, txt_len: int, img_tokens: int, loras: Iterable[LoraSpec] = ()) -> list:
        """The block graphs a generation of this geometry (with these LoRAs) would compile first."""
        if self.compiler is None or self.span is None or tuple(loras):
            return []
        return self.compiler.pending(self.span, txt_len, img_tokens)

    def warm_compiled(self, txt_len: int, img_tokens: int) -> float:
        """Compile the held blocks for this geometry now; returns the seconds it took. GPU thread."""
        if self.compiler is None or self.span is None:
            return 0.0
        return self.compiler.warm(self.span, txt_len, img_tokens)

    def warm_default(self) -> float:
        """Compile the held blocks for the preset's default size (at load, so the usual size never waits)."""
        side = self.preset.default_size // self.preset.size_multiple
        return self.warm_compiled(self.preset.max_sequence_length, side * side)

    def _drop_lora_patch(self) -> None:
        if self._lora_patch is not None:
            self._lora_patch.remove()
            self._lora_patch = None

    # --- head-only parts ------------------------------------------------------------------------

    def vae(self):
        with self._lock:
            if self._vae is None:
                self._vae = self.source.vae(self.device, self.dtype)
            return self._vae

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt embeddings ``[1, L, joint_dim]`` on the model's device and dtype, cached by prompt hash."""
        return self.encode_prompts([prompt])[0]

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Several prompts' embeddings, loading the text encoder at most once for all that are not cached
        (a prompt and CFG's empty negative prompt, say)."""
        return [e.to(self.device) for e in self.prompts.embeds(list(prompts))]

    def remember_prompt(self, prompt: str, embeds: torch.Tensor) -> None:
        """Cache ``prompt``'s embeddings computed on another peer (checked for shape)."""
        self.prompts.remember(prompt, embeds)

    def release_text_encoder(self) -> None:
        self.prompts.release()


def _group_by_module(preset: ModelPreset, names: dict[str, torch.Size]) -> list[dict[str, torch.Size]]:
    """Split tensor names into load units: one per block, one for the head and one for the tail."""
    groups: dict[str, dict[str, torch.Size]] = {}
    prefixes = [block_prefix(preset, i) for i in range(preset.num_blocks)]
    for name, shape in names.items():
        key = next((p for p in prefixes if name.startswith(p)), None)
        if key is None:
            key = "head" if name.split(".")[0] in HEAD_MODULES else "tail" if name.split(".")[0] in TAIL_MODULES else "other"
        groups.setdefault(key, {})[name] = shape
    return list(groups.values())
