"""A ComfyUI user's files as they are on disk: the models tree, found recursively, each file told apart
by its header (never its name or folder), and the tokenizer ComfyUI keeps in its own install.

A ComfyUI install keeps its models under ``ComfyUI/models/`` by kind (``diffusion_models/`` or the old
``unet/``, ``vae/``, ``text_encoders/`` or the old ``clip/``, ``loras/``, ``checkpoints/``; users add
sub-folders of their own). meshd does not trust the folder a file sits in: a VAE dropped into
``diffusion_models/`` is still a VAE. What a file is comes from its tensor names:

- a FLUX.2 transformer has ``single_stream_modulation.lin(ear).weight`` (under a TRANSFORMER_PREFIXES prefix:
  :func:`transformer_layout`, the rule the checkpoint reader uses too);
- a VAE has ``encoder.conv_in`` and ``decoder.conv_in`` (BFL/ComfyUI naming or diffusers naming);
- a text encoder has ``model.layers.N.self_attn.q_proj`` (transformers naming, language model only; under
  ``text_encoders.<name>.transformer.`` in an all-in-one checkpoint);
- a LoRA has ``lora_`` / ``lycoris_`` tensors.

ComfyUI's Qwen tokenizer (klein's text encoder; Qwen3 and Qwen2.5 share the vocabulary) is not in the
models tree but in the install's code: ``comfy/text_encoders/qwen25_tokenizer/`` (vocab.json,
merges.txt, tokenizer_config.json), read by ``comfy/text_encoders/flux.py``'s ``Qwen3Tokenizer``.
Mistral's (dev's) ships inside the text-encoder file as a ``tekken_model`` uint8 tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .tensorfiles import GGUF_SUFFIX, SAFETENSORS_SUFFIX, ModelError, open_safetensors

TRANSFORMER, VAE, TEXT_ENCODER, LORA, OTHER = "transformer", "VAE", "text encoder", "LoRA", "other"
#: Where ComfyUI keeps the Qwen tokenizer, relative to the install (``comfy/text_encoders/flux.py``).
QWEN_TOKENIZER = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
#: The model folder inside an install (``folder_paths.models_dir``).
MODELS = "models"
#: Prefixes single files put before the transformer's names (ComfyUI, also inside an all-in-one checkpoint;
#: some other exporters; none).
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
#: The tensor that marks a FLUX.2 transformer, by naming: the single-stream blocks' shared modulation.
TRANSFORMER_MARKS = {"single_stream_modulation.lin.weight": "bfl", "single_stream_modulation.linear.weight": "diffusers"}
#: A models tree is walked at most this deep (ComfyUI users nest by family, rarely deeper than 3).
MAX_DEPTH = 8
#: At most this many links are followed one by one from a configured folder (Linux's own limit).
MAX_LINKS = 40
#: Where ComfyUI puts each kind (``folder_paths.py``): only a tie-breaker when two files fit, never how a
#: file is recognised.
KIND_FOLDERS = {TRANSFORMER: ("diffusion_models", "unet", "checkpoints"), VAE: ("vae",),
                TEXT_ENCODER: ("text_encoders", "clip"), LORA: ("loras",)}
#: Weight files meshd finds but does not read (GGUF; pickle-based, which can run code when loaded; ``.sft``,
#: safetensors under another name, which meshd reads only once renamed).
UNREAD_SUFFIXES = (".gguf", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".sft")
#: Component folders (with their config.json) whose files are a model's parts, not models of their own.
DIFFUSERS_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class ComfyInstall:
    """A ComfyUI install (``comfyui_dir``): its models tree and the tokenizer it keeps in its code."""

    root: Path

    @classmethod
    def at(cls, root: Path) -> ComfyInstall:
        """The install at ``root``, or a ModelError saying why it is not one."""
        root = Path(root).expanduser().resolve()
        if not (root / MODELS).is_dir():
            raise ModelError(f"comfyui_dir {root} has no {MODELS}/ folder: point it at the ComfyUI folder itself "
                             "(the one with main.py, comfy/ and models/)")
        return cls(root)

    @property
    def models(self) -> Path:
        """The models tree where it really is (:func:`real_folders`): a ``models/`` linked to another drive is
        the configured root, so its target holds the files."""
        return (self.root / MODELS).resolve()

    @property
    def qwen_tokenizer(self) -> Path | None:
        """ComfyUI's own Qwen tokenizer folder, if this install has one."""
        folder = self.root / QWEN_TOKENIZER
        return folder if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() else None


def lora_dirs(configured: Iterable[Path], comfyui_dir: Path | None) -> tuple[Path, ...]:
    """The LoRA folders: the configured ``lora_dir``, then a ComfyUI install's ``models/loras`` (when it has
    one): what the daemon and ``meshtui generate --local`` both search. A folder named twice (``lora_dir``
    set to where ``models/loras`` links, say) is listed once, as first spelled: folders are compared where
    they really are (:func:`real_folders`)."""
    comfy = (Path(comfyui_dir) / MODELS / "loras",) if comfyui_dir else ()
    found: dict[Path, Path] = {}
    for d in (*(Path(d) for d in configured), *(d for d in comfy if d.is_dir())):
        found.setdefault(real_folders([d])[0], d)
    return tuple(found.values())


def is_lora(keys: Iterable[str]) -> bool:
    """Whether these tensor names are a LoRA's (PEFT's ``.lora_A``, kohya's ``lora_unet_``, LyCORIS, an alpha):
    the one test the inventory and :class:`.checkpoints.Checkpoint` (which refuses one as a model) share."""
    return any(".lora_" in k or k.startswith(("lora_", "lycoris_")) or k.endswith(".alpha") for k in keys)


def transformer_layout(keys: Iterable[str]) -> tuple[str, str] | None:
    """(prefix, naming) of the FLUX.2 transformer among these tensor names, naming "bfl" or "diffusers"; None
    when they hold none. The one rule for "is this a FLUX.2 transformer": the inventory (:func:`parts_of_keys`)
    and :class:`.checkpoints.Checkpoint` both ask it, so every file listed as a transformer is one the
    checkpoint reader takes, and the reader strips exactly the prefix found here. The mark is the single-stream
    blocks' shared modulation, which FLUX.1 (a modulation per block) and other models lack, under one of
    TRANSFORMER_PREFIXES."""
    for key in keys:
        for mark, naming in TRANSFORMER_MARKS.items():
            if key.endswith(mark) and key[: -len(mark)] in TRANSFORMER_PREFIXES:
                return key[: -len(mark)], naming
    return None


def kind_of_keys(keys: Iterable[str]) -> str:
    """What a safetensors file holds, from its tensor names alone: a LoRA, else the first of its parts
    (:func:`parts_of_keys`; an all-in-one checkpoint is a transformer), else OTHER."""
    keys = list(keys)
    if is_lora(keys):
        return LORA
    return next(iter(parts_of_keys(keys)), OTHER)


def parts_of_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """The parts a file holds (TRANSFORMER, VAE, TEXT_ENCODER, in that order), from its tensor names under any
    prefix: more than one is a ComfyUI all-in-one checkpoint (``checkpoints/``: ``model.diffusion_model.``,
    ``vae.`` and ``text_encoders.<name>.transformer.``, ComfyUI's ``supported_models.Flux2`` prefixes)."""
    keys = list(keys)
    found = []
    if transformer_layout(keys) is not None:
        found.append(TRANSFORMER)
    if any(k.endswith("encoder.conv_in.weight") for k in keys) and any(k.endswith("decoder.conv_in.weight")
                                                                        for k in keys):
        found.append(VAE)  # both halves: FLUX.2's VAE file (VaeFile) has them, a decoder alone fits nothing
    if any(k.startswith(("model.layers.", "text_encoders.")) and ".self_attn.q_proj." in k for k in keys):
        found.append(TEXT_ENCODER)
    return tuple(found)


def identify(path: Path) -> str:
    """What the safetensors file at ``path`` holds (header only); a ModelError if it cannot be read."""
    with open_safetensors(path) as f:
        return kind_of_keys(f.keys())


def in_kind_folder(path: Path, kind: str) -> bool:
    """Whether ``path`` lies under the folder ComfyUI keeps ``kind`` in."""
    return any(part in KIND_FOLDERS.get(kind, ()) for part in path.parts[:-1])


def is_diffusers_folder(path: Path) -> bool:
    return (path / "transformer" / "config.json").is_file() or (path / "model_index.json").is_file()


def entries(root: Path, enter: Callable[[Path], bool] = lambda folder: True) -> Iterator[Path]:
    """Every file and folder under ``root``, depth-first in name order, each folder before what it holds: the one
    walk of the model folders. A folder is entered when ``enter`` says so, a symlinked folder at most once (a loop
    is not a hang), nothing deeper than MAX_DEPTH, and a folder that cannot be listed is passed over (opening
    what is in it says why)."""
    seen: set[Path] = set()

    def visit(folder: Path, depth: int) -> Iterator[Path]:
        real = folder.resolve()
        if real in seen or depth > MAX_DEPTH:
            return
        seen.add(real)
        try:
            listed = sorted(folder.iterdir())
        except OSError:
            return
        for entry in listed:
            yield entry
            if entry.is_dir() and enter(entry):
                yield from visit(entry, depth + 1)

    if root.is_dir():
        yield from visit(root, 0)


def walk(root: Path, skip: Iterable[Path] = ()) -> Iterator[tuple[Path, bool]]:
    """Every diffusers model folder (``(path, True)``) and every weight file outside one (``(path, False)``:
    ``.safetensors`` and the UNREAD_SUFFIXES) under ``root`` (:func:`entries`). Hidden folders and files are
    skipped, a diffusers folder or a component folder is not entered, nor a folder that really is one of
    ``skip`` (:func:`real_folders`: the LoRA folders, whose files are the LoRA store's, never models)."""
    skip = set(skip)

    def enter(folder: Path) -> bool:
        # (a component folder beside a single file, e.g. its own vae/, belongs to that file)
        return not folder.name.startswith(".") and not is_diffusers_folder(folder) and not (
            folder.name in DIFFUSERS_PARTS and (folder / "config.json").is_file()) and not (
            skip and folder.resolve() in skip)

    for entry in entries(root, enter):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_diffusers_folder(entry):
                yield entry, True
        elif entry.suffix.lower() in (SAFETENSORS_SUFFIX, *UNREAD_SUFFIXES) and entry.is_file():
            yield entry, False


def relative_name(path: Path, dirs: Iterable[Path]) -> str:
    """A file's name as ``--model`` takes it: its path inside the first model folder holding it, without
    ``.safetensors`` or ``.gguf`` (``diffusion_models/flux2_dev_fp8mixed``); a file at the top is just its
    stem."""
    for d in dirs:
        try:
            text = path.relative_to(d).as_posix()
        except ValueError:
            continue
        return text.removesuffix(SAFETENSORS_SUFFIX).removesuffix(GGUF_SUFFIX)
    return path.name.removesuffix(SAFETENSORS_SUFFIX).removesuffix(GGUF_SUFFIX)


def spellings(folder: Path) -> list[Path]:
    """A configured folder as written (absolute, ``~`` expanded), then each link it goes through, then where it
    really is: a ComfyUI install's ``models/`` linked to another drive belongs to the install it is configured
    in, not to the drive (:meth:`.files.ModelStore._installs`)."""
    path = Path(os.path.abspath(Path(folder).expanduser()))
    found = [path]
    for _ in range(MAX_LINKS):
        try:
            path = Path(os.path.abspath(path.parent / os.readlink(path)))
        except OSError:  # not a link (or not there): the chain ends
            break
        found.append(path)
    found.append(path.resolve())
    return list(dict.fromkeys(found))


def real_folders(dirs: Iterable[Path]) -> list[Path]:
    """Configured folders as :func:`within` compares them: ``~`` expanded and every link resolved (what the model
    and the LoRA stores hold, so a folder configured through a link contains what lies in its target)."""
    return [Path(d).expanduser().resolve() for d in dirs]


def within(path: Path, dirs: Iterable[Path]) -> bool:
    """Whether ``path`` is one of ``dirs`` (:func:`real_folders`) or lies under one, compared as given: the one
    containment rule for model and LoRA files. Callers pass a resolved path (:func:`escapes`, a resolved
    request) to ask where a file really is, or a path as spelled to ask whether a link in the folders led out."""
    return any(path == d or d in path.parents for d in dirs)


def escapes(path: Path, dirs: Iterable[Path]) -> Path | None:
    """Where ``path`` really is when a link takes it out of every folder of ``dirs`` (:func:`real_folders`);
    None when it stays inside. ComfyUI users link model files and folders in from other drives: meshd reads
    only what lies in its configured folders, so such a link is refused, never followed silently."""
    real = path.resolve()
    return None if within(real, dirs) else real


def link_refusal(path: Path, target: Path, dirs: Iterable[Path], setting: str = "models_dir") -> str:
    """One line naming a link out of the configured folders, its target, and how to allow the target."""
    return (f"{path} is a link to {target}, outside the configured folders ({', '.join(map(str, dirs))}); meshd "
            f"reads files only from there: add {target.parent} to {setting} to use it")


def is_relative_model_name(name: str) -> bool:
    """A name like ``diffusion_models/x.safetensors``: relative, with folders, no way out of its root."""
    parts = name.replace("\\", "/").split("/")
    return len(parts) > 1 and not os.path.isabs(name) and ".." not in parts and all(parts)
