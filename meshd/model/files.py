"""Model files on disk: finding them (only inside configured folders), hashing them, and reading
exactly the tensors a span needs.

A model is a diffusers-style folder::

    <name>/model_index.json
    <name>/transformer/config.json + *.safetensors (+ diffusion_pytorch_model.safetensors.index.json)
    <name>/vae/config.json + *.safetensors
    <name>/text_encoder/...             (optional; the tiny model has a stand-in)
    <name>/scheduler/scheduler_config.json

Tensors are read with ``safetensors.safe_open``, one by one, so a peer holding 8 of 32 blocks never
reads (or allocates) the other 24.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .presets import PRESETS, ModelPreset

HASH_CHUNK = 8 << 20


class ModelError(Exception):
    """A model that cannot be found, is outside the model folders, or does not match its preset."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def match_preset(config: dict, vae_config: dict | None = None) -> ModelPreset:
    """The preset whose block structure ``config`` has (a transformer config.json)."""
    keys = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
            "in_channels")
    for preset in PRESETS.values():
        if all(int(config.get(k, -1)) == int(preset.transformer[k]) for k in keys):
            return preset
    shape = {k: config.get(k) for k in keys}
    raise ModelError(f"transformer config {shape} matches no known FLUX.2 model ({', '.join(PRESETS)})")


@dataclass
class ModelFiles:
    """One model folder: its preset, weight files and content hash."""

    root: Path
    preset: ModelPreset
    transformer_files: list[Path]
    weight_map: dict[str, Path]  # tensor name -> file
    tensors_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model_id(self) -> str:
        return self.root.name

    @classmethod
    def open(cls, root: Path) -> ModelFiles:
        transformer = root / "transformer"
        config = _read_json(transformer / "config.json")
        preset = match_preset(config)
        index = transformer / "diffusion_pytorch_model.safetensors.index.json"
        weight_map: dict[str, Path] = {}
        if index.exists():
            mapping = _read_json(index).get("weight_map")
            if not isinstance(mapping, dict):
                raise ModelError(f"{index} has no weight_map")
            for name, file in mapping.items():
                path = (transformer / str(file)).resolve()
                if path.parent != transformer.resolve():
                    raise ModelError(f"{index} points outside its folder: {file}")
                weight_map[name] = path
        else:
            files = sorted(transformer.glob("*.safetensors"))
            if not files:
                raise ModelError(f"{transformer} holds no .safetensors file")
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        weight_map[name] = path
        files = sorted(set(weight_map.values()))
        for path in files:
            if not path.is_file():
                raise ModelError(f"weight file {path} is missing")
        return cls(root=root, preset=preset, transformer_files=files, weight_map=weight_map)

    def read(self, names: Iterable[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read exactly the tensors ``names`` (cast to ``dtype``), and nothing else."""
        wanted: dict[Path, list[str]] = {}
        for name in names:
            wanted.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in wanted.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    out[name] = tensor.to(device=device, dtype=dtype if tensor.dtype.is_floating_point else tensor.dtype)
                    with self._lock:
                        self.tensors_read += 1
        return out

    def content_hash(self, cache_dir: Path | None = None) -> str:
        """sha256 over the transformer weight files (cached by path, size and mtime)."""
        cache = _HashCache(cache_dir)
        digest = hashlib.sha256()
        for path in self.transformer_files:
            digest.update(path.name.encode() + b"\0" + cache.file_hash(path).encode() + b"\n")
        return digest.hexdigest()


class _HashCache:
    """File hashes remembered across runs, so an 18 GB checkpoint is hashed once, not at every start."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.path = cache_dir / "file-hashes.json" if cache_dir else None

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        table = {}
        if self.path and self.path.exists():
            try:
                table = json.loads(self.path.read_text())
            except ValueError:
                table = {}
        if key in table:
            return table[key]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(HASH_CHUNK):
                digest.update(block)
        value = digest.hexdigest()
        if self.path:
            table[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, self.path)
        return value


class ModelStore:
    """The configured model folders. A model is found by preset or folder name, or by a path that
    lies inside one of them; nothing outside them is ever read."""

    def __init__(self, dirs: Iterable[Path], cache_dir: Path | None = None) -> None:
        self.dirs = [Path(d).expanduser().resolve() for d in dirs]
        self.cache_dir = cache_dir

    def resolve(self, name: str) -> Path:
        """The folder of model ``name`` (a name under a model folder, or a path inside one)."""
        if not self.dirs:
            raise ModelError("no model folders are configured (models_dir)")
        candidate = Path(name).expanduser()
        if candidate.is_absolute() or os.sep in name or name.startswith("."):
            path = candidate.resolve()
            if not any(path == d or d in path.parents for d in self.dirs):
                raise ModelError(
                    f"{path} is outside the configured model folders ({', '.join(map(str, self.dirs))}); "
                    "meshd reads model files only from there"
                )
            if not path.is_dir():
                raise ModelError(f"model folder {path} does not exist")
            return path
        if name in ("", ".", "..") or "/" in name:
            raise ModelError(f"invalid model name {name!r}")
        for d in self.dirs:
            if (d / name).is_dir():
                return d / name
        raise ModelError(f"model {name!r} not found in {', '.join(map(str, self.dirs))}")

    def open(self, name: str) -> ModelFiles:
        return ModelFiles.open(self.resolve(name))

    def available(self) -> list[tuple[str, Path]]:
        """(name, folder) of every model folder found, for ``meshd check``."""
        found = []
        for d in self.dirs:
            if d.is_dir():
                for sub in sorted(d.iterdir()):
                    if (sub / "transformer" / "config.json").is_file():
                        found.append((sub.name, sub))
        return found
