"""What ``meshd check`` says about a box's model and LoRA folders: every model and LoRA found, whether
it can be used, how it is stored, and the hash the handshake (or a LoRA request) will compare, so a
user can line up two boxes before a generation ever refuses to run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import comfyui
from .files import ModelFiles, ModelStore
from .lora import LoraFile, LoraStore
from .presets import PRESETS
from .tensorfiles import FileHashes, ModelError
from .text_encoder_file import EncoderFile
from .vae_file import VaeFile


@dataclass(frozen=True)
class FileReport:
    """One model or LoRA as ``meshd check`` shows it."""

    kind: str  # "model", "VAE", "text encoder" or "lora"
    name: str  # what to pass as --model, or a LoRA request's name
    path: Path
    ok: bool
    summary: str  # layout, preset and precision; or format, rank, layers and the models it fits
    problem: str = ""  # why it cannot be used, in words a user can act on
    sha256: str = ""  # models: the identity hash the handshake compares; LoRAs: the file's sha256

    def describe(self) -> str:
        head = f"{'ok ' if self.ok else 'BAD'} {self.kind:5} {self.name}"  # kinds longer than 5 just push on
        detail = self.summary if self.ok else self.problem
        digest = f"  sha256 {self.sha256[:16]}" if self.sha256 else ""
        return f"{head}: {detail}{digest}\n      {self.path}"


def inventory_models(store: ModelStore, hashes: bool = True, distilled: bool | None = None) -> list[FileReport]:
    """Open every model in the model folders (headers and shapes only; sha256 when ``hashes``);
    ``distilled`` is the operator's override, shown as what the model will run as."""
    reports = []
    for name, path in store.available():
        try:
            files = store.open(str(path))  # by path: two folders may hold a model of one name
            sampling = files.sampling(distilled).describe(files.preset)
        except ModelError as exc:
            reports.append(FileReport("model", name, path, False, "", str(exc)))
            continue
        summary = (f"{files.checkpoint.layout}, {files.preset.name}, {files.checkpoint.quantisation}, {sampling}; "
                   f"{_head_parts(files)}")
        digest = files.checkpoint.content_hash(store.cache_dir) if hashes else ""
        reports.append(FileReport("model", name, path, True, summary, sha256=digest))
    return reports


def _head_parts(files: ModelFiles) -> str:
    """Where the head's VAE, text encoder and tokenizer come from, and what is missing (a block-only peer
    needs none of them)."""
    found, missing = [], []
    for what, sub, single in (("VAE", "vae", files.parts.vae), ("text encoder", "text_encoder",
                                                                 files.parts.text_encoder)):
        if single is not None:  # (chosen over the diffusers folder's only where that folder just lends it)
            found.append(f"{what} {single.name}")
        elif files.components is not None and (files.components / sub / "config.json").is_file():
            found.append(f"{what} from {files.components}")
        else:
            missing.append(what)
    if files.parts.tokenizer is not None:
        found.append(f"tokenizer {files.parts.tokenizer}")
    text = f"head parts: {', '.join(found)}" if found else "blocks only"
    if missing:
        text += f"; no {' or '.join(missing)} for the head (see docs/models.md)"
    text += f"; {files.parts.notes}" if files.parts.notes else ""
    return text + (f"; {files.parts.tokenizer_hint}" if files.parts.tokenizer_hint else "")


def inventory_parts(store: ModelStore, hashes: bool = True) -> list[FileReport]:
    """Every VAE and text-encoder single file in the model folders: what it is, its precision, which
    models can use it (header only; sha256 when ``hashes``)."""
    reports = []
    file_hashes = FileHashes(store.cache_dir)
    for path, kind in store.part_files():
        name = comfyui.relative_name(path, store.dirs)
        opener = VaeFile if kind == comfyui.VAE else EncoderFile
        try:
            part = opener.open(path)
        except ModelError as exc:
            reports.append(FileReport(kind, name, path, False, "", str(exc)))
            continue
        fits = [p.name for p in PRESETS.values() if part.fits(p)]
        if not fits:
            problem = part.mismatch(next(iter(PRESETS.values())))
            reports.append(FileReport(kind, name, path, False, "", f"{part.describe()}; fits no known model"
                                      + (f" ({problem})" if problem else "")))
            continue
        reports.append(FileReport(kind, name, path, True, f"{part.describe()}; fits {', '.join(fits)}",
                                  sha256=file_hashes.sha256(path) if hashes else ""))
    return reports


def inventory_loras(store: LoraStore, cache_dir: Path | None = None, hashes: bool = True) -> list[FileReport]:
    """Index every LoRA in the LoRA folders and say which models it fits (header only)."""
    reports = []
    file_hashes = FileHashes(cache_dir)
    files, links = store.scan()
    for path in files:
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
    for link, target in links:  # never read: named, with what to do
        reports.append(FileReport("lora", store.name_of(link), link, False, "",
                                  comfyui.link_refusal(link, target, store.dirs, "lora_dir")))
    return reports
