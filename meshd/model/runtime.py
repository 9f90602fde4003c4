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

from codec.header import dtype_name

from ..config import COMPUTE_DTYPES, WEIGHTS_CHOICES
from ..pipeline.plan import WeightBytes
from .access import require_readable, require_tree_readable, unreadable
from .checkpoints import expected_shapes, target_format
from .compiled import BlockCompiler, DecoderShape
from .files import ModelError, ModelFiles, ModelStore
from .lora import LoraError, LoraPatch, LoraSpec, LoraStore, held_linears, stack_factors
from .precision import DENSE, LinearFormat, fp8_compute, quantise, quantised_layers
from .presets import ModelPreset, get_preset
from .seeded import seeded_value
from .span import HEAD_MODULES, TAIL_MODULES, SpanModel, block_prefix, span_modules
from .tensorfiles import FileHashes, read_json, require_safetensors
from .text_encoder import (FAMILIES, STAND_IN_CLASS, LanguageModelEncoder, PromptEmbedder, PromptEncoder,
                           StandInTextEncoder, TextEncoderOptions)
from .text_encoder_file import EncoderFile
from .tiny import write_tiny
from .vae_file import VaeFile

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}




@dataclass(frozen=True)
class ModelIdentity:
    """What a plan checks before anything runs: the same model, the same bytes, the same dtype, the same
    weight precision (a peer that quantised at load computes other numbers than one that did not). Shown in
    words as a peer reads it: ``meshd.node.info.ModelInfo.of(identity).describe()``."""

    model_id: str
    preset: str
    content_hash: str
    dtype: str
    weights: str = "bf16"  # e.g. "fp8 e4m3fn per-tensor 160, bf16 12" (layers per format)

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "preset": self.preset, "hash": self.content_hash, "dtype": self.dtype,
                "weights": self.weights}


def weights_label(formats: dict[str, LinearFormat], dtype: torch.dtype) -> str:
    """The precision of a model's linear layers in words: "bf16", or "fp8 e4m3fn per-row 24, bf16 12"."""
    dense = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    counts: dict[str, int] = {}
    for fmt in formats.values():
        label = dense if fmt.kind == "dense" else fmt.label()
        counts[label] = counts.get(label, 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), dense)
    return ", ".join(f"{label} {n}" for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class WeightSource:
    """Where a span's tensors come from."""

    preset: ModelPreset
    model_id: str

    def content_hash(self) -> str:
        raise NotImplementedError

    def linear_formats(self, weights: str) -> dict[str, LinearFormat]:
        """How each linear layer of the whole model is held under the ``weights`` option."""
        raise NotImplementedError

    def read(self, expected: dict[str, torch.Size], device: torch.device, dtype: torch.dtype,
             formats: dict[str, LinearFormat]) -> dict[str, torch.Tensor]:
        """The tensors ``expected`` on ``device``, each linear layer as ``formats`` holds it."""
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

    def check_head_files(self, text_encoder: bool = True) -> None:
        """A ModelError naming the file and the permission when the head's VAE (or text encoder) could not
        be read, asked before any step runs rather than found out at decode."""

    def scheduler_config(self) -> dict:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **self.preset.scheduler}

    def distilled(self) -> bool:
        return self.preset.distilled


class FolderSource(WeightSource):
    """A model in the configured model folders: a diffusers folder or a single-file checkpoint."""

    def __init__(self, files: ModelFiles, cache_dir: Path | None = None, distilled: bool | None = None) -> None:
        self.files = files
        self.checkpoint = files.checkpoint
        self.preset = files.preset
        self.model_id = files.model_id
        self._cache_dir = cache_dir
        self._distilled_override = distilled  # the operator's ``distilled =``, over anything detected
        self._hash: str | None = None
        self._te_hash: str | None = None
        self.distilled()  # read now: a bad model_index.json refuses the model when opened (a daemon's start)

    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = self.checkpoint.content_hash(self._cache_dir)
        return self._hash

    def linear_formats(self, weights):
        return self.checkpoint.linear_formats(weights)

    def read(self, expected, device, dtype, formats):
        return self.checkpoint.read(expected, device, dtype, formats)

    def check_head_files(self, text_encoder: bool = True) -> None:
        parts = self.files.parts
        if parts.vae_problem:  # a VAE file that is there but closed: not "no VAE", and not at decode
            raise ModelError(f"the head's VAE cannot be read: {parts.vae_problem}")
        if text_encoder and parts.text_encoder_problem:
            raise ModelError(f"the text encoder cannot be read: {parts.text_encoder_problem}")
        if self.files.components is None:  # no head parts at all: vae() says where to put them
            return
        if not self._from_file("vae"):  # (a single file's part was read when the model was opened)
            require_tree_readable([self.files.component("vae")], "the head's VAE")
        if text_encoder and self.has_text_encoder() and not self._from_file("text_encoder"):
            self._check_text_encoder_files()

    def _check_text_encoder_files(self) -> None:
        # A folder that is not there is not checked here: loading says what is missing.
        require_tree_readable([self.files.component("text_encoder"), self.files.component("tokenizer")],
                              "the text encoder")

    def vae(self, device, dtype):
        from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

        if self._from_file("vae"):
            return VaeFile.open(self.files.parts.vae).load(self.preset, device, dtype)
        folder = self.files.component("vae")
        require_tree_readable([folder], "the head's VAE")
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} is missing: the head needs the VAE")
        require_safetensors(folder)
        try:
            vae = AutoencoderKLFlux2.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                     use_safetensors=True)
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            # a damaged file (diffusers says which), a config that does not fit its weights (torch's
            # size-mismatch report, several lines) or holds a value of the wrong type
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"could not load the VAE from {folder}: {first}") from exc
        return vae.to(device).eval()

    def _from_file(self, sub: str) -> bool:
        """Whether the head's ``sub`` comes from a single file: the one :meth:`.files.ModelStore.head_parts`
        chose (where the diffusers folder lacks it, or only lends one the file's own comes before)."""
        return getattr(self.files.parts, sub) is not None

    def has_text_encoder(self) -> bool:
        if self._from_file("text_encoder"):
            return True
        try:
            folder = self.files.component("text_encoder")
        except ModelError:
            return False
        if unreadable(folder) is not None:
            return True  # there but closed to us: loading it says so, rather than "no text encoder"
        return (folder / "config.json").is_file()

    def text_encoder(self, device, dtype):
        if self._from_file("text_encoder"):
            file = EncoderFile.open(self.files.parts.text_encoder)
            tokenizer = file.tokenizer(self.files.parts.tokenizer, self.files.parts.tokenizer_hint)  # before GBs
            return LanguageModelEncoder(FAMILIES[file.family], file.load(self.preset, device, dtype), tokenizer,
                                        self.preset.text_encoder_layers, self.preset.max_sequence_length)
        if not self.has_text_encoder():
            where = self.files.components or self.files.root
            raise ModelError(f"{where} has no text_encoder/; encode prompts on a peer that has it (a plan can "
                             "place the text encoder there), or add text_encoder/ and tokenizer/ from the "
                             "diffusers release")
        folder = self.files.component("text_encoder")
        self._check_text_encoder_files()
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
            parts = self.files.parts
            folders = ((("text_encoder", parts.text_encoder), ("tokenizer", parts.tokenizer))
                       if self._from_file("text_encoder") else
                       (("text_encoder", self.files.component("text_encoder")),
                        ("tokenizer", self.files.component("tokenizer"))))
            for sub, folder in folders:
                if folder is not None and folder.is_file():
                    digest.update(f"{sub}/{folder.name}\0{hashes.sha256(folder)}\n".encode())
                    continue
                for path in sorted(folder.glob("*")) if folder is not None and folder.is_dir() else []:
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
        """Whether the model is step-distilled (few steps, no CFG): see :meth:`.files.ModelFiles.sampling`."""
        return self._distilled

    @functools.cached_property
    def _distilled(self) -> bool:  # read once, not per generation
        return self.files.sampling(self._distilled_override).distilled


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

    def linear_formats(self, weights):
        linears = {n.removesuffix(".weight"): s for n, s in expected_shapes(self.preset).items()
                   if n.endswith(".weight") and len(s) == 2}
        return {module: target_format(DENSE, weights, module, shape) for module, shape in linears.items()}

    def read(self, expected, device, dtype, formats):
        """Seeded weights; a quantised layer's are built dense on ``device`` and quantised there."""
        dense_shapes = expected_shapes(self.preset)
        out = {}
        for name, shape in expected.items():
            weight = name.removesuffix("_scale") if name.endswith(".weight_scale") else name
            fmt = formats.get(weight.removesuffix(".weight"), DENSE) if weight.endswith(".weight") else DENSE
            if fmt.kind == "dense":
                out[name] = seeded_value(self._base, name, tuple(shape), device, dtype)
            elif name == weight:  # the layer's weight_scale (if any) is made with it
                dense = seeded_value(self._base, weight, dense_shapes[weight], device, dtype)
                held = quantise(dense, fmt)
                del dense
                out[name] = held["weight"]
                if "weight_scale" in held:
                    out[f"{weight}_scale"] = held["weight_scale"]
        return out

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


def open_source(model: str, store: ModelStore, *, random_weights: bool = False, seed: int = 0,
                distilled: bool | None = None) -> WeightSource:
    """The weight source for ``--model``: a preset with ``--random-weights``, ``tiny`` (written on first
    use), or a model folder (by name or path) inside the model folders. ``distilled`` overrides what is
    detected (None: detect)."""
    if random_weights:
        return RandomSource(get_preset(model), seed)
    if model == "tiny":
        if not store.dirs:
            raise ModelError("no model folder is configured to write the tiny model into")
        require_readable(store.dirs[0], "models_dir")  # else "not found" below would hide a closed folder
        try:
            store.resolve("tiny")
        except ModelError:
            write_tiny(store.dirs[0] / "tiny")
    return FolderSource(store.open(model), store.cache_dir, distilled)


class HostedModel:
    """The blocks (and head/tail modules) one daemon holds, loaded from a weight source, with the LoRAs
    they carry; and the head-side parts (VAE, prompt embeddings) loaded when first needed."""

    def __init__(self, source: WeightSource, device: torch.device, dtype: torch.dtype,
                 text_encoder: TextEncoderOptions | None = None, weights: str = "auto",
                 compiler: BlockCompiler | None = None) -> None:
        self.source = source
        #: Runs the blocks through compiled graphs when set (compile = on); None runs them eagerly.
        self.compiler = compiler
        self.preset = source.preset
        self.device = device
        self.dtype = dtype
        if weights not in WEIGHTS_CHOICES:
            raise ModelError(f"weights {weights!r}: use one of {', '.join(WEIGHTS_CHOICES)}")
        self.weights = weights
        # How every linear layer of the model is held here: from the file's header, no data read.
        self.formats = source.linear_formats(weights)
        self.span: SpanModel | None = None
        self.loras: tuple[LoraSpec, ...] = ()
        #: This peer's LoRA folders (set by its owner): the one place the held LoRAs are read from, when they
        #: are set and when a reload cuts them to a new span.
        self.lora_store: LoraStore | None = None
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
                                      dtype_name(dtype),
                                      weights_label(self.formats, dtype))

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

    def weight_bytes(self) -> WeightBytes:
        """Device bytes of each block's weights at the precision they are held in here, and of the head's and
        the tail's modules (what the planner and the Split screen size stages by)."""
        return weight_bytes(self.preset, self.formats, self.dtype)

    def compute_path(self) -> str:
        """How this peer's quantised layers compute, in words (``meshd check``, the dashboard)."""
        kinds = {fmt.kind for fmt in self.formats.values()}
        parts = []
        if "fp8" in kinds:
            parts.append("fp8: " + fp8_compute(str(self.device)).describe())
        if "gguf" in kinds:
            parts.append("gguf: dequantised per layer at each forward")
        return "; ".join(parts) or f"dense {self.identity.dtype}"

    def load(self, blocks: Iterable[int], head: bool, tail: bool,
             progress: Callable[[int, int], None] | None = None) -> None:
        """Hold exactly ``blocks`` (+ head/tail modules): keep what is loaded, read what is missing,
        free the rest. The current LoRAs are applied to the new set of layers. Runs on the GPU thread."""
        blocks = sorted(set(blocks))
        if head:  # the head decodes at the end: an unreadable VAE must stop it now, not after every step
            self.source.check_head_files(text_encoder=False)  # a plan may encode prompts on another peer
        new = span_modules(self.preset, blocks, head, tail)
        held = {name for name, m in new.named_modules() if isinstance(m, torch.nn.Linear)}
        formats = {name: fmt for name, fmt in self.formats.items() if name in held}
        quantised_layers(new, formats, self.device)
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
            loaded.update(self.source.read(group, self.device, self.dtype, formats))
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
                self._lora_patch = self._patch_for(self.loras)
        except LoraError as exc:
            self.loras = ()
            raise LoraError(f"blocks loaded, but without LoRAs: {exc}") from None
        finally:
            self._choose_block_call()

    # --- LoRAs ----------------------------------------------------------------------------------

    def use_loras(self, specs: Iterable[LoraSpec]) -> None:
        """Make the held layers carry exactly ``specs`` (in order), each from this peer's own copy found by
        hash in its LoRA folders (``lora_store``). Idempotent; the previous set is removed exactly (the weights
        are never written). On a LoraError nothing changes. Runs on the GPU thread."""
        specs = tuple(specs)
        if specs == self.loras:  # load() keeps the current set applied, so equal means already carried
            return
        patch = self._patch_for(specs)  # raises before anything changes
        self._drop_lora_patch()
        self._lora_patch = patch
        self.loras = specs
        self._choose_block_call()

    def _patch_for(self, specs: tuple[LoraSpec, ...]) -> LoraPatch | None:
        if not specs:
            return None
        if self.lora_store is None:
            raise LoraError("this peer has no LoRA folder configured (lora_dir)")
        factors = self._lora_factors.get(specs)
        if factors is None:
            files = [(spec, self.lora_store.open(spec, self.preset)) for spec in specs]
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

    def compile_pending(self, txt_len: int, img_tokens: int, loras: Iterable[LoraSpec] = (),
                        decode_hw: tuple[int, int] | None = None) -> list:
        """The graphs a generation of this geometry (with these LoRAs) would compile first: the held
        blocks' (none with LoRAs: those blocks run eagerly) and, where this peer decodes (``decode_hw``, the
        packed latent grid), the VAE decoder's."""
        if self.compiler is None or self.span is None:
            return []
        return self.compiler.pending(None if tuple(loras) else self.span, txt_len, img_tokens,
                                     self.decoder_shape(decode_hw) if decode_hw else None)

    def warm_compiled(self, txt_len: int, img_tokens: int, loras: Iterable[LoraSpec] = (),
                      decode_hw: tuple[int, int] | None = None) -> float:
        """Compile what :meth:`compile_pending` lists now; returns the seconds it took. GPU thread.
        Never the blocks while LoRAs are on them: Dynamo does not guard on hooks, so a graph traced with
        them would carry them into every later generation."""
        if self.compiler is None or self.span is None:
            return 0.0
        return self.compiler.warm(None if tuple(loras) else self.span, txt_len, img_tokens,
                                  self.vae() if decode_hw else None, self.decoder_shape(decode_hw) if decode_hw else None)

    def default_geometry(self) -> tuple[int, int, tuple[int, int] | None]:
        """(text tokens, image tokens, decoded latent grid or None) of the preset's default size: what a
        daemon compiles at load, so the usual size never waits. Only the head decodes."""
        rows, cols = self.preset.latent_grid(self.preset.default_size, self.preset.default_size)
        return self.preset.max_sequence_length, rows * cols, ((rows, cols) if self.has_head else None)

    def warm_default(self) -> float:
        """Compile the held blocks (and the head's VAE decoder) for the preset's default size."""
        txt_len, img_tokens, decode_hw = self.default_geometry()
        return self.warm_compiled(txt_len, img_tokens, decode_hw=decode_hw)

    def decoder_shape(self, latent_hw: tuple[int, int]) -> DecoderShape:
        """The VAE decoder's input for a packed latent grid of ``latent_hw`` (each packed token is 2x2 VAE
        latents)."""
        h, w = latent_hw
        return DecoderShape(int(self.preset.vae["latent_channels"]), 2 * h, 2 * w, dtype_name(self.dtype),
                            str(self.device))

    def _drop_lora_patch(self) -> None:
        if self._lora_patch is not None:
            self._lora_patch.remove()
            self._lora_patch = None

    # --- head-only parts ------------------------------------------------------------------------

    def vae(self):
        with self._lock:
            if self._vae is None:
                vae = self.source.vae(self.device, self.dtype)
                if self.compiler is not None:  # compiled when warm_compiled meets a latent grid, before step 1
                    vae.decoder = self.compiler.compiled_decoder(vae.decoder)
                self._vae = vae
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


def weight_bytes(preset: ModelPreset, formats: dict[str, LinearFormat], dtype: torch.dtype) -> WeightBytes:
    """Device bytes of ``preset``'s weights with its linear layers held as ``formats`` (headers only: no data)."""
    itemsize = dtype.itemsize
    blocks = [0] * preset.num_blocks
    head = tail = 0
    prefixes = [block_prefix(preset, i) for i in range(preset.num_blocks)]
    for name, shape in expected_shapes(preset).items():
        fmt = formats.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        size = fmt.weight_bytes(shape[0], shape[1], itemsize) if fmt else itemsize * _numel(shape)
        index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        if index is not None:
            blocks[index] += size
        elif name.split(".")[0] in TAIL_MODULES:
            tail += size
        else:
            head += size
    return WeightBytes(tuple(blocks), head, tail)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
