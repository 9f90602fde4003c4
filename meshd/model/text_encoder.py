"""Turning a prompt into FLUX.2 prompt embeddings, and keeping the big text encoder out of the way.

Real models use a large language model (Qwen3 for klein, Mistral Small 3 for dev) whose chosen hidden
layers, stacked, become ``[1, L, joint_attention_dim]``. :class:`LanguageModelEncoder` loads it from the
model's ``text_encoder/`` and ``tokenizer/`` folders (local files and safetensors only) and calls
diffusers' own ``_get_qwen3_prompt_embeds`` / ``_get_mistral_3_small_prompt_embeds``, so the embeddings
are the pipelines' to the bit.

The ``tiny`` model uses :class:`StandInTextEncoder`: a few seeded layers over the prompt's UTF-8 bytes.
It is **not a language model**; it only gives the tiny transformer deterministic, prompt-dependent
input of the right shape, so that the whole data path (prompt -> embeddings -> blocks -> image) runs.

The text encoder is larger than a klein transformer (Qwen3-8B: 16 GB; Mistral Small: 48 GB), so
:class:`PromptEmbedder` loads it only for a prompt it has not seen, runs it where
:class:`TextEncoderOptions` says, then keeps it, parks it in CPU RAM, or frees it; embeddings are
cached on the CPU by prompt hash, within a byte budget.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from .presets import ModelPreset
from .seeded import seeded_state
from .tekken import check_tokenizer_folder
from .tensorfiles import ModelError, read_json, require_safetensors

STAND_IN_CLASS = "StandInTextEncoder"
IDLE_POLICIES = ("keep", "cpu", "release")
DEFAULT_CACHE_BYTES = 256 << 20


class PromptEncoder(Protocol):
    """prompt -> ``[1, L, joint_attention_dim]`` embeddings."""

    def __call__(self, prompt: str) -> torch.Tensor: ...

    def to(self, device: torch.device | str): ...


class StandInTextEncoder(torch.nn.Module):
    """Deterministic stand-in for a text encoder (tiny model only): bytes -> seeded tanh layers."""

    def __init__(self, hidden: int, layers: int, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = torch.nn.Embedding(257, hidden)  # 0 = padding, 1..256 = byte values
        self.position = torch.nn.Parameter(torch.zeros(max_length, hidden))
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers))

    def token_ids(self, prompt: str) -> torch.Tensor:
        data = list(prompt.encode("utf-8"))[: self.max_length]
        ids = [b + 1 for b in data] + [0] * (self.max_length - len(data))
        return torch.tensor([ids], dtype=torch.long)

    @torch.no_grad()
    def forward(self, prompt: str) -> torch.Tensor:
        h = self.embed(self.token_ids(prompt).to(self.embed.weight.device)) + self.position
        states = []
        for layer in self.layers:
            h = torch.tanh(layer(h))
            states.append(h)
        return torch.cat(states, dim=-1)  # like stacking the LLM's chosen hidden layers

    @classmethod
    def create(cls, joint_dim: int, max_length: int, layers: int = 3) -> StandInTextEncoder:
        enc = cls(joint_dim // layers, layers, max_length)
        enc.load_state_dict(seeded_state(enc, "tiny/text_encoder", "cpu", torch.float32))
        return enc

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "_class_name": STAND_IN_CLASS,
            "note": "deterministic stand-in for a text encoder; not a language model",
            "hidden": self.embed.embedding_dim,
            "layers": len(self.layers),
            "max_length": self.max_length,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> StandInTextEncoder:
        config = read_json(folder / "config.json")
        if config.get("_class_name") != STAND_IN_CLASS:
            raise ModelError(f"{folder} does not hold a {STAND_IN_CLASS}")
        enc = cls(int(config["hidden"]), int(config["layers"]), int(config["max_length"]))
        enc.load_state_dict(load_file(str(folder / "model.safetensors")))
        return enc


# --- real language-model text encoders -----------------------------------------------------------

@dataclass(frozen=True)
class EncoderFamily:
    """How one family of text encoders is loaded and turned into FLUX.2 prompt embeddings."""

    name: str  # the presets' ``text_encoder`` value, and config.json's ``model_type``
    model_class: str  # transformers class
    tokenizer_class: str  # AutoTokenizer, or AutoProcessor for dev's Pixtral processor
    pipeline: str  # the diffusers pipeline whose static method computes the embeddings
    method: str

    def hidden_size(self, config: dict) -> int:
        text = config.get("text_config", config) if self.name == "mistral3" else config
        return int(text.get("hidden_size", 0))

    def num_layers(self, config: dict) -> int:
        text = config.get("text_config", config) if self.name == "mistral3" else config
        return int(text.get("num_hidden_layers", 0))

    def truncated_config(self, folder: Path, layers: int):
        """The folder's transformers config with only ``layers`` decoder layers (the rest is never read)."""
        import transformers  # noqa: PLC0415

        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        text = config.text_config if self.name == "mistral3" else config
        text.num_hidden_layers = layers
        return config

    def embed_fn(self) -> Callable[..., torch.Tensor]:
        import diffusers  # noqa: PLC0415

        return getattr(getattr(diffusers, self.pipeline), self.method)


FAMILIES = {
    "qwen3": EncoderFamily("qwen3", "Qwen3ForCausalLM", "AutoTokenizer", "Flux2KleinPipeline",
                           "_get_qwen3_prompt_embeds"),
    "mistral3": EncoderFamily("mistral3", "Mistral3ForConditionalGeneration", "AutoProcessor", "Flux2Pipeline",
                              "_get_mistral_3_small_prompt_embeds"),
}


class LanguageModelEncoder:
    """Qwen3 (klein) or Mistral Small 3 (dev) from a model's ``text_encoder/`` and ``tokenizer/`` folders."""

    def __init__(self, family: EncoderFamily, model: torch.nn.Module, tokenizer, layers: tuple[int, ...],
                 max_length: int) -> None:
        self.family = family
        self.model = model
        self.tokenizer = tokenizer
        self.layers = layers
        self.max_length = max_length
        self._embed = family.embed_fn()

    @classmethod
    def load(cls, text_encoder: Path, tokenizer: Path, preset: ModelPreset, device: torch.device,
             dtype: torch.dtype) -> LanguageModelEncoder:
        """Load from local folders only (never the network; .safetensors weights only), checked against
        ``preset``."""
        import transformers  # noqa: PLC0415

        config = read_json(text_encoder / "config.json")
        family = FAMILIES.get(str(config.get("model_type")))
        if family is None:
            raise ModelError(f"{text_encoder} holds a {config.get('model_type')!r} model; FLUX.2 uses Qwen3 (klein) "
                             "or Mistral Small 3 (dev)")
        if preset.text_encoder in FAMILIES and family.name != preset.text_encoder:
            raise ModelError(f"{text_encoder} holds a {family.name} model; {preset.name} needs {preset.text_encoder}")
        joint = int(preset.transformer["joint_attention_dim"])
        hidden, layers = family.hidden_size(config), preset.text_encoder_layers
        if hidden * len(layers) != joint:
            raise ModelError(f"{text_encoder} is a {family.name} of hidden size {hidden}; {preset.name} needs "
                             f"{len(layers)} x {joint // len(layers)} = {joint} (the wrong size of model?)")
        if family.num_layers(config) < max(layers):
            raise ModelError(f"{text_encoder} has {family.num_layers(config)} layers; {preset.name} reads layer "
                             f"{max(layers)}")
        require_safetensors(text_encoder)
        if not tokenizer.is_dir():
            raise ModelError(f"{tokenizer} is missing: the text encoder needs its tokenizer")
        check_tokenizer_folder(tokenizer)
        kwargs = {"local_files_only": True, "use_safetensors": True, "dtype": dtype}
        if device.type == "cuda":
            kwargs["device_map"] = str(device)  # straight to the GPU, not through CPU RAM
        try:
            # Only the layers FLUX.2 reads are built; the file's later layers are left unread.
            kwargs["config"] = family.truncated_config(text_encoder, max(layers))
            model = getattr(transformers, family.model_class).from_pretrained(str(text_encoder), **kwargs)
            tok = getattr(transformers, family.tokenizer_class).from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load the text encoder from {text_encoder}: {exc}") from exc
        if max(layers) < family.num_layers(config):
            drop_final_norm(model)
        if "device_map" not in kwargs:
            model = model.to(device)
        return cls(family, model.eval(), tok, layers, preset.max_sequence_length)

    def to(self, device: torch.device | str) -> LanguageModelEncoder:
        self.model.to(device)
        return self

    @property
    def num_layers(self) -> int:
        """Decoder layers built (the last one FLUX.2 reads)."""
        return len(decoder_stack(self.model).layers)

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self._embed(text_encoder=self.model, tokenizer=self.tokenizer, prompt=prompt, device=device,
                           max_sequence_length=self.max_length, hidden_states_layers=self.layers)


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's decoder stack (the module with ``layers`` and the final ``norm``)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList) and hasattr(module, "norm"):
            return module
    raise ModelError(f"{type(model).__name__} has no decoder stack with a final norm")


def drop_final_norm(model: torch.nn.Module) -> None:
    """Make a truncated model report its last layer's raw output: transformers gives the model's last hidden
    state after the final norm, which in the full model applies only after the last layer, not this one."""
    decoder_stack(model).norm = torch.nn.Identity()


# --- placement and caching -----------------------------------------------------------------------

@dataclass(frozen=True)
class TextEncoderOptions:
    """Where the text encoder runs, and what happens to it between prompts.

    ``device``: where prompts are encoded (None: the model's device). ``idle``: "keep" leaves it loaded
    where it ran; "cpu" parks it in CPU RAM and moves it back for the next prompt; "release" frees it
    and loads it again for the next prompt not in the cache. ``cache_bytes`` bounds the CPU cache of
    prompt embeddings.
    """

    device: str | None = None
    idle: str = "release"
    cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if self.idle not in IDLE_POLICIES:
            raise ValueError(f"text encoder idle policy {self.idle!r}: use one of {', '.join(IDLE_POLICIES)}")
        if self.cache_bytes < 0:
            raise ValueError("the prompt cache size cannot be negative")


def prompt_key(prompt: str) -> str:
    """The cache key of a prompt (sha256 of its UTF-8 text)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class PromptCache:
    """Prompt embeddings on the CPU, least recently used evicted first, within a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            old = self._entries.pop(key)
            self._bytes -= old.numel() * old.element_size()
        while self._entries and self._bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        self._entries[key] = value
        self._bytes += size

    def __len__(self) -> int:
        return len(self._entries)


class PromptEmbedder:
    """A peer's prompt -> embeddings path: the text encoder loaded on demand and put away after, and
    the embeddings cached on the CPU in the model dtype."""

    def __init__(self, load: Callable[[torch.device], PromptEncoder], options: TextEncoderOptions,
                 model_device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> None:
        self._load = load
        self.options = options
        self.device = torch.device(options.device) if options.device else model_device
        self.dtype = dtype
        self.shape = shape  # (L, joint_attention_dim) of one prompt's embeddings
        self.cache = PromptCache(options.cache_bytes)
        self._encoder: PromptEncoder | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def embeds(self, prompts: list[str]) -> list[torch.Tensor]:
        """Embeddings (CPU, model dtype) of each prompt; the encoder runs once for all uncached ones."""
        with self._lock:
            out = {p: self.cache.get(prompt_key(p)) for p in prompts}
            todo = [p for p, e in out.items() if e is None]
            if todo:
                if self._encoder is None:
                    self._encoder = self._load(self.device)
                encoder = self._encoder.to(self.device)  # back from CPU RAM when parked there
                try:
                    for prompt in todo:
                        value = encoder(prompt).to(device="cpu", dtype=self.dtype)
                        self._check(value, "the text encoder")
                        out[prompt] = value
                        self.cache.put(prompt_key(prompt), value)
                finally:
                    self._put_away()
            return [out[p] for p in prompts]

    def remember(self, prompt: str, embeds: torch.Tensor) -> None:
        """Cache embeddings computed elsewhere (a peer that holds the text encoder)."""
        self._check(embeds, "the embeddings received")
        with self._lock:
            self.cache.put(prompt_key(prompt), embeds.to(device="cpu", dtype=self.dtype))

    def release(self) -> None:
        """Free the text encoder now (the cache stays)."""
        with self._lock:
            self._encoder = None
            _free_cuda(self.device)

    def _check(self, value: torch.Tensor, what: str) -> None:
        if tuple(value.shape) != (1, *self.shape) or not value.dtype.is_floating_point:
            raise ModelError(f"{what}: prompt embeddings of shape {tuple(value.shape)} ({value.dtype}); this model "
                             f"needs (1, {self.shape[0]}, {self.shape[1]})")

    def _put_away(self) -> None:
        if self.options.idle == "release":
            self._encoder = None
            _free_cuda(self.device)
        elif self.options.idle == "cpu" and self.device.type != "cpu":
            self._encoder.to("cpu")
            _free_cuda(self.device)


def _free_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
