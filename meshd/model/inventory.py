"""What ``meshd check`` says about a box's model and LoRA folders: every model and LoRA found, whether
it can be used, how it is stored, and the hash the handshake (or a LoRA request) will compare, so a
user can line up two boxes before a generation ever refuses to run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .files import ModelStore
from .lora import LoraFile, LoraStore
from .presets import PRESETS
from .tensorfiles import FileHashes, ModelError


@dataclass(frozen=True)
class FileReport:
    """One model or LoRA as ``meshd check`` shows it."""

    kind: str  # "model" or "lora"
    name: str  # what to pass as --model, or a LoRA request's name
    path: Path
    ok: bool
    summary: str  # layout, preset and precision; or format, rank, layers and the models it fits
    problem: str = ""  # why it cannot be used, in words a user can act on
    sha256: str = ""  # models: the identity hash the handshake compares; LoRAs: the file's sha256

    def describe(self) -> str:
        head = f"{'ok ' if self.ok else 'BAD'} {self.kind:5} {self.name}"
        detail = self.summary if self.ok else self.problem
        digest = f"  sha256 {self.sha256[:16]}" if self.sha256 else ""
        return f"{head}: {detail}{digest}\n      {self.path}"


def inventory_models(store: ModelStore, hashes: bool = True) -> list[FileReport]:
    """Open every model in the model folders (headers and shapes only; sha256 when ``hashes``)."""
    reports = []
    for name, path in store.available():
        try:
            files = store.open(str(path))  # by path: two folders may hold a model of one name
        except ModelError as exc:
            reports.append(FileReport("model", name, path, False, "", str(exc)))
            continue
        parts = (f"head parts (VAE, text encoder) from {files.components}" if files.components
                 else "blocks only: no VAE/text encoder for the head (see docs/models.md)")
        summary = f"{files.checkpoint.layout}, {files.preset.name}, {files.checkpoint.quantisation}; {parts}"
        digest = files.checkpoint.content_hash(store.cache_dir) if hashes else ""
        reports.append(FileReport("model", name, path, True, summary, sha256=digest))
    return reports


def inventory_loras(store: LoraStore, cache_dir: Path | None = None, hashes: bool = True) -> list[FileReport]:
    """Index every LoRA in the LoRA folders and say which models it fits (header only)."""
    reports = []
    file_hashes = FileHashes(cache_dir)
    for path in store.files():
        name = store.name_of(path)
        fits, problems, first = [], [], None
        for preset in PRESETS.values():
            try:
                lora = LoraFile.open(path, preset)
            except ModelError as exc:
                problems.append(str(exc))
                continue
            fits.append(preset.name)
            first = first or lora
        if first is None:
            reports.append(FileReport("lora", name, path, False, "", f"fits no known model: {problems[0]}"))
            continue
        ranks = sorted({m.rank for m in first.modules.values()})
        summary = (f"{first.format}, rank {'/'.join(map(str, ranks))}, {len(first.targets())} layers; "
                   f"fits {', '.join(fits)}")
        reports.append(FileReport("lora", name, path, True, summary,
                                  sha256=file_hashes.sha256(path) if hashes else ""))
    return reports
