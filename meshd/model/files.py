"""Models in the configured model folders: finding them (nowhere else), and pairing a transformer
checkpoint with the folder that holds the head's other parts.

A model is either a diffusers-style folder::

    <name>/model_index.json
    <name>/transformer/config.json + *.safetensors (+ diffusion_pytorch_model.safetensors.index.json)
    <name>/vae/config.json + *.safetensors
    <name>/text_encoder/ + <name>/tokenizer/   (Qwen3 for klein, Mistral Small for dev; tiny has a stand-in)
    <name>/scheduler/scheduler_config.json

or a single-file checkpoint (BFL or ComfyUI, bf16 / fp8 / scaled fp8), ``<name>.safetensors``, directly in a
model folder or in a folder of its own. A single file holds only the transformer: that is all a peer
holding blocks needs. The head also needs the VAE and the text encoder, which it takes from the file's
own folder when that has ``vae/``, else from a diffusers folder of the same model in the model folders
(FLUX.2's VAE is shared by all members, the text encoder by each size).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .access import require_readable
from .checkpoints import Checkpoint, match_preset
from .presets import ModelPreset
from .gguf import GGUF_SUFFIX
from .tensorfiles import SAFETENSORS_SUFFIX, FileHashes, ModelError, open_safetensors, read_json, refuse_pickle

__all__ = ["FileHashes", "ModelError", "ModelFiles", "ModelStore", "match_preset"]


@dataclass(frozen=True)
class ModelFiles:
    """One model: its transformer checkpoint and the folder with the head's VAE, text encoder and scheduler."""

    name: str
    checkpoint: Checkpoint
    components: Path | None  # None: a single file with no diffusers folder of its model to borrow from
    own_components: bool  # the components folder belongs to this model (its model_index.json applies)

    @property
    def root(self) -> Path:
        return self.checkpoint.path

    @property
    def preset(self) -> ModelPreset:
        return self.checkpoint.preset

    @property
    def model_id(self) -> str:
        return self.name

    def component(self, sub: str) -> Path:
        """The head's ``vae``/``text_encoder``/``tokenizer``/``scheduler`` folder, or a ModelError that says
        where to put it."""
        if self.components is None:
            raise ModelError(
                f"{self.root} is a single-file checkpoint with no {sub}/ beside it, and no diffusers folder of "
                f"{self.preset.name} in the model folders to take it from; the head needs one (see docs/models.md)"
            )
        return self.components / sub


class ModelStore:
    """The configured model folders. A model is found by folder or file name, or by a path that lies
    inside one of them; nothing outside them is ever read."""

    def __init__(self, dirs: Iterable[Path], cache_dir: Path | None = None) -> None:
        self.dirs = [Path(d).expanduser().resolve() for d in dirs]
        self.cache_dir = cache_dir

    def _inside(self, path: Path) -> bool:
        return any(path == d or d in path.parents for d in self.dirs)

    def resolve(self, name: str) -> Path:
        """The folder or single file of model ``name`` (a name in a model folder, or a path inside one)."""
        if not self.dirs:
            raise ModelError("no model folders are configured (models_dir)")
        candidate = Path(name).expanduser()
        if candidate.is_absolute() or os.sep in name or name.startswith("."):
            path = candidate.resolve()
            if not self._inside(path):
                raise ModelError(
                    f"{path} is outside the configured model folders ({', '.join(map(str, self.dirs))}); "
                    "meshd reads model files only from there"
                )
            require_readable(path)
            if not path.exists():
                raise ModelError(f"model {path} does not exist")
            return path
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ModelError(f"invalid model name {name!r}")
        for d in self.dirs:
            require_readable(d, "models_dir")
            for path in (d / name, d / f"{name}{SAFETENSORS_SUFFIX}", d / f"{name}{GGUF_SUFFIX}"):
                if path.is_dir() or path.is_file():
                    return path
        raise ModelError(f"model {name!r} not found in {', '.join(map(str, self.dirs))}")

    def open(self, name: str) -> ModelFiles:
        """The model ``name``: its checkpoint opened (headers read and checked) and its head parts located."""
        path = self.resolve(name)
        require_readable(path)
        if path.is_dir():
            require_readable(path / "transformer")
        if path.is_file():
            if path.suffix != GGUF_SUFFIX:
                refuse_pickle(path)
            checkpoint = Checkpoint.open_file(path)
            model_name = path.name.removesuffix(path.suffix)
            if (path.parent / "vae" / "config.json").is_file():
                return ModelFiles(model_name, checkpoint, path.parent, own_components=True)
            return ModelFiles(model_name, checkpoint, self._borrowed_components(checkpoint.preset),
                              own_components=False)
        transformer = path / "transformer"
        if not (transformer / "config.json").is_file():
            single = sorted(path.glob(f"*{SAFETENSORS_SUFFIX}"))
            if len(single) == 1:  # a single file in a folder of its own, maybe with vae/ and text_encoder/
                checkpoint = Checkpoint.open_file(single[0])
                own = (path / "vae" / "config.json").is_file()
                return ModelFiles(path.name, checkpoint, path if own else self._borrowed_components(checkpoint.preset),
                                  own_components=own)
            raise ModelError(f"{path} is neither a diffusers model folder (no transformer/config.json) nor a folder "
                             f"with one single-file checkpoint ({len(single)} .safetensors files)")
        return ModelFiles(path.name, Checkpoint.open_folder(transformer), path, own_components=True)

    def _borrowed_components(self, preset: ModelPreset) -> Path | None:
        """A diffusers folder of ``preset`` in the model folders, whose VAE and text encoder a single file
        can use (first by folder order, then name)."""
        for d in self.dirs:
            for sub in _entries(d):
                config = sub / "transformer" / "config.json"
                if config.is_file() and (sub / "vae" / "config.json").is_file():
                    try:
                        if match_preset(read_json(config)) == preset:
                            return sub
                    except ModelError:
                        continue
        return None

    def available(self) -> list[tuple[str, Path]]:
        """(name, path) of every model found in the model folders (diffusers folders and single files),
        for ``meshd check``. Files are recognised by their tensor names, not opened in full."""
        found = []
        for d in self.dirs:
            for sub in _entries(d):
                if (sub / "transformer" / "config.json").is_file():
                    found.append((sub.name, sub))
                elif sub.is_file() and sub.suffix == SAFETENSORS_SUFFIX and _is_candidate(sub):
                    found.append((sub.name.removesuffix(SAFETENSORS_SUFFIX), sub))
                elif sub.is_file() and sub.suffix == GGUF_SUFFIX:  # GGUF text encoders are not served: shown as such
                    found.append((sub.name.removesuffix(GGUF_SUFFIX), sub))
                elif sub.is_dir():
                    single = sorted(sub.glob(f"*{SAFETENSORS_SUFFIX}"))
                    if len(single) == 1 and _is_candidate(single[0]):
                        found.append((sub.name, sub))
        return found


def _entries(folder: Path) -> list[Path]:
    """The entries of a model folder that can be models: hidden ones (``.tiny-*`` half-written folders,
    ``.cache``, editors' files) never are."""
    if not folder.is_dir():
        return []
    require_readable(folder, "models_dir")
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_candidate(path: Path) -> bool:
    """A file that holds a FLUX.2 transformer, or cannot be read at all (so ``meshd check`` shows why);
    readable VAE, text-encoder and LoRA files sharing the folder are skipped."""
    try:
        with open_safetensors(path) as f:
            return any(k.endswith(("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"))
                       for k in f.keys())
    except ModelError:
        return True
