"""Models in the configured model folders: finding them (nowhere else), and pairing a transformer
checkpoint with the folder that holds the head's other parts.

A model is either a diffusers-style folder::

    <name>/model_index.json
    <name>/transformer/config.json + *.safetensors (+ diffusion_pytorch_model.safetensors.index.json)
    <name>/vae/config.json + *.safetensors
    <name>/text_encoder/ + <name>/tokenizer/   (Qwen3 for klein, Mistral Small for dev; tiny has a stand-in)
    <name>/scheduler/scheduler_config.json

or a single-file checkpoint (BFL or ComfyUI, bf16 / fp8 / scaled fp8), ``<name>.safetensors``, anywhere
under a model folder (a ComfyUI models tree is walked recursively; ``comfyui_dir`` adds an install's
``models/``). A single file holds only the transformer: that is all a peer holding blocks needs. The
head also needs the VAE and the text encoder, which it takes, in this order, from the file's own folder
when that has ``vae/``; from the file itself when it is an all-in-one checkpoint and they fit; from a
diffusers folder of the same model in the model folders (FLUX.2's VAE is shared by all members, the text
encoder by each size); or from the VAE and text-encoder single files found in the model folders, each
recognised by its header and matched to the model by its shapes (:class:`HeadParts`).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import comfyui
from .access import require_readable, unreadable
from .checkpoints import Checkpoint, match_preset
from .presets import ModelPreset
from .tensorfiles import (GGUF_SUFFIX, SAFETENSORS_SUFFIX, FileHashes, ModelError, open_safetensors, read_json,
                          refuse_pickle)

__all__ = ["FileHashes", "HeadParts", "ModelError", "ModelFiles", "ModelStore", "match_preset"]

log = logging.getLogger(__name__)

#: What ``ModelStore`` calls a file or folder that a link takes out of the model folders.
OUTSIDE = "outside"
#: ... and one of those where ComfyUI keeps LoRAs (``loras/``) when that is no LoRA folder: not a model.
LINKED_LORA = "linked LoRA"


@dataclass(frozen=True)
class HeadParts:
    """The head's VAE and text encoder as single files (a ComfyUI tree), and the tokenizer folder that
    goes with the text encoder (None: inside the file, as Mistral's is, or nowhere: ``tokenizer_hint``)."""

    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    tokenizer_hint: str = ""  # where to put the tokenizer, when none was found
    vae_problem: str = ""  # no VAE fits, and a file where VAEs go cannot be read: why (one line)
    text_encoder_problem: str = ""  # the same for the text encoder
    notes: str = ""  # what was passed over and why: an all-in-one file's parts, a folder's, a lending folder's


#: A word in a single file's name that marks klein's non-distilled base model (BFL's flux-2-klein-base-9b,
#: ComfyUI's flux-2-klein-base-9b-fp8): the only sign a file has, since base and distilled share every tensor.
BASE_WORD = "base"


@dataclass(frozen=True)
class Sampling:
    """Whether a model is step-distilled (few steps, no CFG), and what says so (for ``meshd check``)."""

    distilled: bool
    why: str

    def describe(self, preset: ModelPreset) -> str:
        if preset.transformer.get("guidance_embeds"):  # dev: guidance is an input, never CFG
            return "guidance-distilled (no CFG)"
        return f"{'distilled' if self.distilled else 'base (CFG)'}, {self.why}"


@dataclass(frozen=True)
class ModelFiles:
    """One model: its transformer checkpoint and the folder with the head's VAE, text encoder and scheduler."""

    name: str
    checkpoint: Checkpoint
    components: Path | None  # None: a single file with no diffusers folder of its model to borrow from
    own_components: bool  # the components folder belongs to this model (its model_index.json applies)
    parts: HeadParts = HeadParts()  # single-file VAE / text encoder, used where ``components`` lacks them

    @property
    def root(self) -> Path:
        return self.checkpoint.path

    @property
    def preset(self) -> ModelPreset:
        return self.checkpoint.preset

    @property
    def model_id(self) -> str:
        return self.name

    def sampling(self, override: bool | None = None) -> Sampling:
        """Step-distilled or base: the operator's ``distilled =`` first; then the model's own model_index.json,
        whose missing ``is_distilled`` means False, as in diffusers' Flux2KleinPipeline; a single file cannot
        be told by its tensors (ComfyUI's model_detection reads shapes only, diffusers maps every FLUX.2 file
        to one config), so a "base" in its file name, else the preset's (the released klein is distilled)."""
        if override is not None:
            return Sampling(override, f"set by distilled = {str(override).lower()}")
        if self.own_components and self.components is not None:
            path = self.components / "model_index.json"
            if path.is_file():
                data = read_json(path)
                if "is_distilled" in data:
                    flag = data["is_distilled"]
                    if not isinstance(flag, bool):  # bool("false") is True: only a JSON boolean says which
                        raise ModelError(f"{path}: is_distilled is {json.dumps(flag)[:40]}, not true or false (a JSON "
                                         "boolean); set it to one, or remove it for diffusers' default (base)")
                    return Sampling(flag, "from model_index.json")
                if data.get("_class_name") == "Flux2KleinPipeline":
                    return Sampling(False, "model_index.json has no is_distilled (diffusers' default)")
        if not self.checkpoint.folder and self.preset.distilled:
            words = re.split(r"[^a-z0-9]+", self.checkpoint.path.name.lower())
            if BASE_WORD in words:
                return Sampling(False, f'"{BASE_WORD}" in its file name')
            return Sampling(True, "assumed: a klein base file holds the same tensors (set distilled = false "
                                  "for one)")
        return Sampling(self.preset.distilled, f"{self.preset.name}'s default")

    def component(self, sub: str) -> Path:
        """The head's ``vae``/``text_encoder``/``tokenizer``/``scheduler`` folder, or a ModelError that says
        where to put it."""
        if self.components is None:
            raise ModelError(
                f"{self.root} is a single-file checkpoint with no {sub}/ beside it, no diffusers folder of "
                f"{self.preset.name} and no {sub.replace('_', ' ')} single file for it in the model folders; the "
                "head needs one (see docs/models.md)"
            )
        return self.components / sub


class ModelStore:
    """The configured model folders (and a ComfyUI install's ``models/``). A model is found by folder or
    file name, by its path relative to a model folder, or by a path that lies inside one; nothing outside
    them is ever read."""

    def __init__(self, dirs: Iterable[Path], cache_dir: Path | None = None, comfyui_dir: Path | None = None,
                 lora_dir: Iterable[Path] = ()) -> None:
        self.configured = [Path(d) for d in dirs]  # as given: where a linked models/ belongs (:meth:`_installs`)
        self.dirs = comfyui.real_folders(self.configured)
        self.comfyui = comfyui.ComfyInstall.at(comfyui_dir) if comfyui_dir else None
        if self.comfyui is not None and self.comfyui.models not in self.dirs:
            self.dirs.append(self.comfyui.models)
        #: The LoRA folders (the configured ``lora_dir``, and the install's ``models/loras``, added here as
        #: DaemonConfig.lora_dirs adds it) where they really are: the LoRA store's, so the model walk does not
        #: enter one (a LoRA is not a model, nor is a link out found there).
        self.lora_dirs = comfyui.real_folders(comfyui.lora_dirs(lora_dir, comfyui_dir))
        self.cache_dir = cache_dir

    def resolve(self, name: str) -> Path:
        """The folder or single file of model ``name`` (a name in a model folder, a path relative to one
        such as ``diffusion_models/x.safetensors``, or a path inside one)."""
        if not self.dirs:
            raise ModelError("no model folders are configured (models_dir)")
        if comfyui.is_relative_model_name(name):  # relative to the model folders first, not the working dir
            for d in self.dirs:
                for path in (d / name, d / f"{name}{SAFETENSORS_SUFFIX}", d / f"{name}{GGUF_SUFFIX}"):
                    if path.is_dir() or path.is_file():
                        self._refuse_escape(path)
                        return path.resolve()
        candidate = Path(name).expanduser()
        if candidate.is_absolute() or os.sep in name or name.startswith("."):
            path = candidate.resolve()
            if not comfyui.within(path, self.dirs):
                spelled = Path(os.path.normpath(candidate.absolute()))  # as written, "..", but no links, followed
                if comfyui.within(spelled, self.dirs):  # so a link in a model folder to something outside them
                    self._refuse_escape(spelled)
                raise ModelError(
                    f"{path} is outside the configured model folders ({', '.join(map(str, self.dirs))}); "
                    "meshd reads model files only from there"
                )
            require_readable(path)
            if not path.exists():
                raise ModelError(f"model {path} does not exist")
            self._refuse_escape(path)
            return path
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ModelError(f"invalid model name {name!r}")
        for d in self.dirs:
            require_readable(d, "models_dir")
            for path in (d / name, d / f"{name}{SAFETENSORS_SUFFIX}", d / f"{name}{GGUF_SUFFIX}"):
                if path.is_dir() or path.is_file():
                    self._refuse_escape(path)
                    return path
        raise ModelError(f"model {name!r} not found in {', '.join(map(str, self.dirs))}")

    def _refuse_escape(self, path: Path, dirs: list[Path] | None = None) -> None:
        """A ModelError naming the link when ``path``, or for a folder anything in it, is a link out of the
        model folders (or ``dirs``); a diffusers folder may hold linked shards: they are read like the folder,
        and a folder linked in from inside them is checked through."""
        dirs = self.dirs if dirs is None else dirs
        inside = comfyui.entries(path) if path.is_dir() else ()
        for item in itertools.chain((path,), inside):  # lazily: a link out is named, never walked into
            target = comfyui.escapes(item, dirs)
            if target is not None:
                raise ModelError(comfyui.link_refusal(item, target, dirs))

    def open(self, name: str) -> ModelFiles:
        """The model ``name``: its checkpoint opened (headers read and checked) and its head parts located,
        every file it will read checked to lie in the model folders."""
        files = self._open(self.resolve(name))
        self._refuse_links_out(files)
        if files.parts.notes:  # which of a file's parts serve the head, and which are passed over
            log.info("%s: %s", files.root, files.parts.notes)
        return files

    def _refuse_links_out(self, files: ModelFiles) -> None:
        """A ModelError naming the link when a file the model reads leads out of the model folders, asked when
        the model is opened rather than only where the folders were walked: its checkpoint's files, its
        components folder's parts (a single file's own ``vae/``), the head's single files and their tokenizer
        (ComfyUI's own Qwen tokenizer lies in the install: it may be there)."""
        paths = [*files.checkpoint.files, files.parts.vae, files.parts.text_encoder]
        if files.components is not None:
            paths += [files.components / part for part in (*comfyui.DIFFUSERS_PARTS, "model_index.json")]
        for path in paths:
            if path is not None and os.path.lexists(path):
                self._refuse_escape(path)
        if files.parts.tokenizer is not None:
            self._refuse_escape(files.parts.tokenizer, [*self.dirs, *(i.root for i in self._installs())])

    def _open(self, path: Path) -> ModelFiles:
        require_readable(path)
        if path.is_dir():
            require_readable(path / "transformer")
        if path.is_file():
            if path.suffix != GGUF_SUFFIX:
                refuse_pickle(path)
            return self._open_single(path.name.removesuffix(path.suffix), path, path.parent)
        transformer = path / "transformer"
        if not (transformer / "config.json").is_file():
            single = [p for p in comfyui.entries(path, enter=lambda _: False) if p.suffix == SAFETENSORS_SUFFIX]
            if len(single) == 1:  # a single file in a folder of its own, maybe with vae/ and text_encoder/
                return self._open_single(path.name, single[0], path)
            raise ModelError(f"{path} is neither a diffusers model folder (no transformer/config.json) nor a folder "
                             f"with one single-file checkpoint ({len(single)} .safetensors files)")
        return ModelFiles(path.name, Checkpoint.open_folder(transformer), path, own_components=True,
                          parts=HeadParts(notes=_passed_over_beside(path)))

    def _open_single(self, name: str, file: Path, folder: Path) -> ModelFiles:
        """A single-file checkpoint, asked for by its name or by its folder's (one way, so both find the same
        head parts): its folder's own parts when it has ``vae/``, else the file's and those lent elsewhere."""
        checkpoint = Checkpoint.open_file(file)
        if (folder / "vae" / "config.json").is_file():
            return ModelFiles(name, checkpoint, folder, own_components=True,
                              parts=self._own_parts(checkpoint.preset, folder, file))
        borrowed = self._borrowed_components(checkpoint.preset)
        return ModelFiles(name, checkpoint, borrowed, own_components=False,
                          parts=self.head_parts(checkpoint.preset, borrowed, own=file, lent=True))

    def _own_parts(self, preset: ModelPreset, folder: Path, file: Path) -> HeadParts:
        """The head parts of a single file in a folder of its own (``folder`` has ``vae/``): the folder's own;
        an all-in-one checkpoint's parts only where the folder lacks one, the others named as passed over."""
        if file.suffix != SAFETENSORS_SUFFIX or len(comfyui.parts_of_keys(_keys(file))) < 2:
            return HeadParts()
        return self.head_parts(preset, folder, own=file)

    def head_parts(self, preset: ModelPreset, components: Path | None = None, own: Path | None = None,
                   lent: bool = False) -> HeadParts:
        """The VAE and text-encoder single files in the model folders that fit ``preset`` (recognised by
        header, matched by shapes), for what ``components`` (a diffusers folder) does not already hold. A
        ComfyUI all-in-one checkpoint (``own``) gives its own parts before the single files; before those of
        ``components`` too when that folder only lends them (``lent``: another model's folder, not the file's
        own). A part of it that does not fit is named in ``notes`` with the reason, and so is a part passed over
        either way: never skipped in silence."""
        from .text_encoder_file import EncoderFile  # noqa: PLC0415 - pulls in transformers' configs
        from .vae_file import VaeFile  # noqa: PLC0415

        inside = comfyui.parts_of_keys(_keys(own)) if own is not None and own.suffix == SAFETENSORS_SUFFIX else ()
        used, refused, passed, lender = [], [], [], []

        def holds(sub: str) -> bool:
            """Whether the diffusers folder has this part (``vae``, ``text_encoder``) itself."""
            return components is not None and (components / sub / "config.json").is_file()

        def best(kind: str, opener, sub: str):
            """The checkpoint's own part when it fits; else, when several files fit: a file where ComfyUI keeps
            its kind first, then exact weights (bf16 before fp8 of the same encoder), then by path."""
            held = holds(sub)
            if held and not (lent and kind in inside):
                if kind in inside:  # the folder's own part comes first
                    passed.append((kind, f"{sub}/"))
                return None
            if kind in inside:
                try:
                    part = opener.open(own)
                    problem = part.mismatch(preset)
                except ModelError as exc:
                    part, problem = None, str(exc)
                if not problem:
                    used.append(kind)
                    if held:  # a lent folder's part comes after the file's own
                        lender.append((kind, f"{sub}/"))
                    return part
                refused.append(f"its {kind} part is not used ({problem})")
            if held:  # the lending folder's, where the file's own does not fit
                return None
            fitting = [opener.open(p) for p, k in self.part_files() if k == kind and _fits(opener, p, preset)]
            fitting.sort(key=lambda f: (not comfyui.in_kind_folder(f.path, kind), f.quantised,
                                        str(f.path)))
            return fitting[0] if fitting else None

        def closed(kind: str) -> str:
            """Why a file where ComfyUI keeps ``kind`` could not even be identified (a permission, say):
            so that a missing part is not reported as absent when it is there but closed."""
            why = (unreadable(p) for p, _, k in self._files() if k == "unreadable" and comfyui.in_kind_folder(p, kind))
            return next((w for w in why if w), "")

        vae = best(comfyui.VAE, VaeFile, "vae")
        encoder = best(comfyui.TEXT_ENCODER, EncoderFile, "text_encoder")
        # a file's own encoder whose tokenizer is nowhere else may take the one its model's lending folder has
        spare = components / "tokenizer" if lent and (comfyui.TEXT_ENCODER, "text_encoder/") in lender else None
        tokenizer, hint = self._tokenizer_for(encoder, spare) if encoder is not None else (None, "")
        notes = ""
        if passed:
            refused.append(_passed_over(f"its {_both(k for k, _ in passed)}",
                                        f"{components}'s own {_both(s for _, s in passed)}", len(passed)))
        if lender:
            refused.append(_passed_over(f"{components}'s {_both(s for _, s in lender)}",
                                        f"this file's own {_both(k for k, _ in lender)}", len(lender)))
        if len(inside) > 1:
            notes = "; ".join([f"all-in-one checkpoint ({', '.join(inside)})"
                               + (f": {' and '.join(used)} from this file" if used else ""), *refused])
        # a closed file where a kind goes matters only when neither a single file nor the folder serves that part
        return HeadParts(vae and vae.path, encoder and encoder.path, tokenizer, hint,
                         "" if vae is not None or holds("vae") else closed(comfyui.VAE),
                         "" if encoder is not None or holds("text_encoder") else closed(comfyui.TEXT_ENCODER), notes)

    def _tokenizer_for(self, encoder, spare: Path | None = None) -> tuple[Path | None, str]:
        """The tokenizer folder for a text-encoder file (``spare``, a lending folder's, last), or (None, what to
        put where)."""
        beside = encoder.path.parent / "tokenizer"
        if beside.is_dir():
            return beside, ""
        if encoder.embedded_tokenizer:
            return None, ""
        if encoder.family == "qwen3":
            for install in self._installs():
                if install.qwen_tokenizer is not None:
                    return install.qwen_tokenizer, ""
        if spare is not None and spare.is_dir():
            return spare, ""
        return None, (
            f"{encoder.path} needs its tokenizer: set comfyui_dir to your ComfyUI folder (its "
            f"{comfyui.QWEN_TOKENIZER}/ is used), or copy the diffusers release's tokenizer/ folder to {beside}")

    def _installs(self) -> list[comfyui.ComfyInstall]:
        """The configured ComfyUI install, and any model folder that is an install's ``models/``: as configured,
        through each link on the way, or where it really is (an install's ``models/`` linked to another drive is
        still that install's, as it is for comfyui_dir)."""
        found = [self.comfyui] if self.comfyui else []
        for d in self.configured:
            for spelled in comfyui.spellings(d):
                if spelled.name == comfyui.MODELS and (spelled.parent / comfyui.QWEN_TOKENIZER).is_dir():
                    found.append(comfyui.ComfyInstall(spelled.parent.resolve()))
                    break
        return found

    def _borrowed_components(self, preset: ModelPreset) -> Path | None:
        """A diffusers folder of ``preset`` in the model folders, whose VAE and text encoder a single file
        can use (first by folder order, then name)."""
        for folder, _ in self._diffusers_folders():
            config = folder / "transformer" / "config.json"
            if config.is_file() and (folder / "vae" / "config.json").is_file():
                try:
                    self._refuse_escape(folder)  # its parts linked in from outside: not a source of parts
                    if match_preset(read_json(config)) == preset:
                        return folder
                except ModelError:
                    continue
        return None

    def _diffusers_folders(self) -> list[tuple[Path, str]]:
        return [(p, n) for p, n, kind in self._files() if kind == "diffusers"]

    def part_files(self) -> list[tuple[Path, str]]:
        """(path, kind) of every VAE and text-encoder single file in the model folders."""
        return [(p, kind) for p, _, kind in self._files() if kind in (comfyui.VAE, comfyui.TEXT_ENCODER)]

    @functools.cache  # noqa: B019 - a store lives as long as its daemon; the folders are walked once
    def _files(self) -> tuple[tuple[Path, str, str], ...]:
        """(path, name, kind) of everything in the model folders: diffusers folders, and each single
        file with what its header says it is (``unreadable`` when it cannot be read)."""
        found, seen = [], set()
        for d in self.dirs:
            if d.is_dir():
                require_readable(d, "models_dir")
            for path, folder in comfyui.walk(d, skip=self.lora_dirs):
                if path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                name = comfyui.relative_name(path, [d])
                if comfyui.escapes(path, self.dirs) is not None:  # never read, not even its header
                    # where ComfyUI keeps LoRAs (no LoRA folder set there): a LoRA's, most likely, not a model
                    lora = comfyui.in_kind_folder(path.relative_to(d), comfyui.LORA)
                    found.append((path, name, LINKED_LORA if lora else OUTSIDE))
                    continue
                if folder:
                    found.append((path, name, "diffusers" if (path / "transformer" / "config.json").is_file()
                                  else comfyui.OTHER))
                    continue
                if path.suffix.lower() == GGUF_SUFFIX:  # a transformer, or refused by name when opened
                    found.append((path, name, "gguf"))
                    continue
                if path.suffix.lower() in comfyui.UNREAD_SUFFIXES:
                    found.append((path, name, "unread"))
                    continue
                try:
                    kind = comfyui.identify(path)
                except ModelError:
                    kind = "unreadable"
                found.append((path, name, kind))
        return tuple(found)

    def skipped_files(self) -> list[tuple[Path, str]]:
        """(path, why) of the weight files in the model folders that are neither a FLUX.2 part nor read."""
        why = {"unread": "a format meshd does not read", comfyui.OTHER: "not a FLUX.2 transformer, VAE or text "
               "encoder", comfyui.LORA: "a LoRA (put LoRAs in a LoRA folder)",
               LINKED_LORA: "a link out of the model folders where ComfyUI keeps LoRAs; LoRAs are read from the LoRA "
                            "folders (lora_dir, or comfyui_dir's models/loras)"}
        return [(p, why[kind]) for p, _, kind in self._files() if kind in why and not
                (kind == comfyui.LORA and comfyui.within(p.resolve(), self.lora_dirs))]  # (a folder set as both)

    def available(self) -> list[tuple[str, Path]]:
        """(name, path) of every model found in the model folders (diffusers folders and transformer single
        files at any depth), for ``meshd check``. Files are recognised by their tensor names, not opened in
        full; a file that cannot be read at all is listed too, so ``meshd check`` shows why."""
        found = []
        for path, name, kind in self._files():
            if kind == "diffusers":
                found.append((name, path))
            elif kind in (comfyui.TRANSFORMER, "gguf", "unreadable", OUTSIDE):  # outside: opening says why not
                own = path.parent != path.parent.parent and (path.parent / "vae" / "config.json").is_file() \
                    and path.parent not in self.dirs
                found.append((comfyui.relative_name(path.parent, self.dirs) if own else name, path))
        return found


def _both(words) -> str:
    return " and ".join(words)


def _passed_over(what: str, instead: str, count: int) -> str:
    """``what`` (``count`` parts) is passed over because ``instead`` comes first, in words."""
    return f"{what} {'is' if count == 1 else 'are'} passed over: {instead} come{'s' if count == 1 else ''} first"


def _passed_over_beside(folder: Path) -> str:
    """What a diffusers folder's own parts pass over, in words: each FLUX.2 single file at its top (an all-in-one
    or ComfyUI checkpoint beside ``transformer/``, ``vae/``, ...), with the parts it holds."""
    own = [f"{sub}/" for sub in ("transformer", "vae", "text_encoder") if (folder / sub / "config.json").is_file()]
    listed = ", ".join(own[:-1]) + f" and {own[-1]}" if len(own) > 1 else "".join(own)
    notes = []
    for file in comfyui.entries(folder, enter=lambda _: False):
        if file.suffix == SAFETENSORS_SUFFIX and file.is_file() and (parts := comfyui.parts_of_keys(_keys(file))):
            notes.append(f"{file.name} ({', '.join(parts)}) is passed over: the folder's own {listed} come first")
    return "; ".join(notes)


def _keys(path: Path) -> list[str]:
    """A safetensors file's tensor names (header only; none when it cannot be read: opening it says why)."""
    try:
        with open_safetensors(path) as f:
            return list(f.keys())
    except ModelError:
        return []


def _fits(kind, path: Path, preset: ModelPreset) -> bool:
    """Whether the VAE / text-encoder file at ``path`` is one ``preset`` can use (unreadable: no)."""
    try:
        return kind.open(path).fits(preset)
    except ModelError:
        return False
