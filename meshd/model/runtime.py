"""A model as one peer hosts it: where its weights come from, the blocks it holds, and (on the head)
the VAE, text encoder and scheduler."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import ModelError, ModelFiles, ModelStore
from .presets import ModelPreset, get_preset
from .seeded import seeded_value
from .span import HEAD_MODULES, TAIL_MODULES, SpanModel, block_prefix, span_modules
from .text_encoder import StandInTextEncoder
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

    def text_encoder(self):
        raise NotImplementedError

    def scheduler_config(self) -> dict:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **self.preset.scheduler}

    def distilled(self) -> bool:
        return self.preset.distilled


class FolderSource(WeightSource):
    """A model folder inside the configured model folders."""

    def __init__(self, files: ModelFiles, cache_dir: Path | None = None) -> None:
        self.files = files
        self.preset = files.preset
        self.model_id = files.model_id
        self._cache_dir = cache_dir
        self._hash: str | None = None

    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = self.files.content_hash(self._cache_dir)
        return self._hash

    def read(self, expected, device, dtype):
        missing = [n for n in expected if n not in self.files.weight_map]
        if missing:
            raise ModelError(f"{self.files.root} lacks {len(missing)} tensors this span needs, e.g. {missing[0]}")
        tensors = self.files.read(expected, device, dtype)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise ModelError(
                    f"{self.files.root}: tensor {name} has shape {tuple(tensors[name].shape)}; "
                    f"{self.preset.name} needs {tuple(shape)}"
                )
        return tensors

    def vae(self, device, dtype):
        from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

        folder = self.files.root / "vae"
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} is missing: the head needs the VAE")
        return AutoencoderKLFlux2.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).to(device).eval()

    def text_encoder(self):
        folder = self.files.root / "text_encoder"
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "StandInTextEncoder":
            return StandInTextEncoder.load(folder)
        raise ModelError(
            f"{self.files.root} has no text encoder this version can run; pass prompt embeddings or use "
            "a model folder with its text_encoder"
        )

    def scheduler_config(self) -> dict:
        path = self.files.root / "scheduler" / "scheduler_config.json"
        if path.is_file():
            return json.loads(path.read_text())
        return super().scheduler_config()

    def distilled(self) -> bool:
        path = self.files.root / "model_index.json"
        if path.is_file():
            data = json.loads(path.read_text())
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

    def text_encoder(self):
        return StandInTextEncoder.create(int(self.preset.transformer["joint_attention_dim"]), self.preset.max_sequence_length)


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
    """The blocks (and head/tail modules) one daemon holds, loaded from a weight source."""

    def __init__(self, source: WeightSource, device: torch.device, dtype: torch.dtype) -> None:
        self.source = source
        self.preset = source.preset
        self.device = device
        self.dtype = dtype
        self.span: SpanModel | None = None
        self._vae = None
        self._text_encoder = None
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
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
        free the rest. Runs on the GPU thread."""
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
        self.span = new
        del old, kept, loaded
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- head-only parts ------------------------------------------------------------------------

    def vae(self):
        with self._lock:
            if self._vae is None:
                self._vae = self.source.vae(self.device, self.dtype)
            return self._vae

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt embeddings ``[1, L, joint_dim]`` in the model dtype, cached by prompt hash."""
        key = hashlib.sha256(prompt.encode()).hexdigest()
        with self._lock:
            cached = self._prompt_cache.get(key)
            if cached is not None:
                return cached
            if self._text_encoder is None:
                self._text_encoder = self.source.text_encoder()
            encoder = self._text_encoder
        embeds = encoder(prompt).to(device=self.device, dtype=self.dtype)
        with self._lock:
            if len(self._prompt_cache) > 64:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = embeds
        return embeds


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
