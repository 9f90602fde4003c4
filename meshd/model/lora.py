"""LoRAs: named in a generation request by file name, sha256 and strength, and applied by every peer
to the blocks it holds, from its own copy of the file. Nothing of a LoRA crosses the wire but its name.

Formats (told apart by tensor names): diffusers / PEFT (``transformer.`` or ``base_model.model.`` +
diffusers module names, ``lora_A`` / ``lora_B``), ai-toolkit / BFL (``diffusion_model.`` + BFL module
names), kohya / ComfyUI (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``),
OneTrainer (``lora_transformer_`` + diffusers names with underscores) and SimpleTuner's plain LoRAs in
LyCORIS naming (``lycoris_single_transformer_blocks_0_attn_to_out`` + ``lora_down`` / ``lora_up``). As
in ComfyUI's key map, ``single_blocks.N.linear1_qkv`` adapts only the attention rows (the first
3 x hidden) of the fused ``linear1``: its up matrix is padded with zero rows for the MLP part.
A BFL-named module's up matrix goes through the same diffusers converter as checkpoints do
(:func:`.checkpoints.bfl_to_diffusers`): the converter only permutes and splits rows, and so does
``B`` in ``W + B A``. (That also gets ``final_layer.adaLN_modulation.1`` right, whose shift and scale
halves diffusers' own LoRA converter leaves unswapped.)

How a LoRA is applied, and why: each patched linear layer (dense, fp8 or GGUF: the hook only sees the
layer's input and output, so quantised weights need nothing else) gets a forward hook adding ``B (A x)``.
The base weights are never written, so taking a LoRA off restores the model exactly, with no copy
of the original weights kept anywhere; memory grows by the LoRA's factors for this peer's layers
only (rank x (in + out) per layer), never by whole weight matrices. Stacked LoRAs share one hook per
layer (their factors concatenated, each strength folded into its ``B``). The cost is two thin matmuls
per patched layer per step. comfyui-mesh's lesson (research/peers.md §1.7): forwarding a 2.5 GB LoRA's
patches over the wire costs seconds per step; here each peer reads only its own layers' factors.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MeshError
from ..fields import wire_number
from . import comfyui
from .checkpoints import bfl_linear_names, bfl_to_diffusers, expected_shapes, trace_bfl
from .precision import LINEAR_TYPES
from .presets import PRESETS, ModelPreset
from .tensorfiles import SAFETENSORS_SUFFIX, FileHashes, ModelError, TensorInfo, open_safetensors, read_header

#: At most this many LoRAs in one generation request.
MAX_LORAS = 8
#: Strengths beyond this are refused as a typo rather than applied.
MAX_LORA_STRENGTH = 10.0
#: Longest LoRA name (a hint used to find the file first, and shown in messages).
MAX_LORA_NAME = 200

ROLES = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_up.weight": "up",
         ".alpha": "alpha"}
#: Adapter kinds meshd does not apply, by how the last part of their tensor names begins.
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "oft_": "OFT", "boft_": "BOFT", "dora_scale": "DoRA",
               "lora_mid": "LoCon (mid weights)", "diff": "full-weight difference", "w_norm": "GLoRA",
               "set_weight": "set-weight"}
PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te.", "te1.", "te2.", "text_encoders.")


class LoraError(ModelError):
    """A LoRA this peer cannot apply: missing, a different file than asked for, or made for another model."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a generation request: the file's name (a hint), its sha256 (the identity), the strength."""

    name: str
    sha256: str
    strength: float = 1.0

    def __post_init__(self) -> None:
        name, sha, strength = self.name, self.sha256, self.strength
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_LORA_NAME or not name.isprintable() \
                or name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"LoRA name {str(name)[:40]!r} must be a file name of 1-{MAX_LORA_NAME} printable "
                             "characters")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower()):
            raise ValueError(f"LoRA {name}: sha256 must be 64 hexadecimal digits")
        if wire_number(strength) is None or abs(strength) > MAX_LORA_STRENGTH:
            raise ValueError(f"LoRA {name}: strength {strength!r:.20} must be a number in "
                             f"[-{MAX_LORA_STRENGTH:g}, {MAX_LORA_STRENGTH:g}]")
        object.__setattr__(self, "sha256", sha.lower())
        object.__setattr__(self, "strength", float(strength))

    def to_wire(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "strength": self.strength}

    @classmethod
    def from_wire(cls, data: object) -> LoraSpec:
        """Validate an untrusted map; MeshError("bad-request") names the first bad field."""
        if not isinstance(data, dict):
            raise MeshError("bad-request", "a LoRA must be a map with name, sha256 and strength")
        try:
            return cls(data.get("name"), data.get("sha256"), data.get("strength", 1.0))
        except ValueError as exc:
            raise MeshError("bad-request", str(exc)) from None


def loras_to_wire(specs: Iterable[LoraSpec]) -> list[dict]:
    return [spec.to_wire() for spec in specs]


def loras_from_wire(data: object) -> tuple[LoraSpec, ...]:
    """A request's LoRA list (None or absent: none), validated: at most MAX_LORAS, no file twice."""
    if data is None:
        return ()
    if not isinstance(data, list) or len(data) > MAX_LORAS:
        raise MeshError("bad-request", f"loras must be a list of at most {MAX_LORAS} LoRAs")
    specs = tuple(LoraSpec.from_wire(item) for item in data)
    seen = set()
    for spec in specs:
        if spec.sha256 in seen:
            raise MeshError("bad-request", f"LoRA {spec.name} is listed twice; give it once with the summed strength")
        seen.add(spec.sha256)
    return specs


# --- one LoRA file, indexed from its header ------------------------------------------------------

@dataclass(frozen=True)
class LoraModule:
    """One adapted layer of a LoRA file: its factors as stored, and the model layers they patch."""

    source: str  # the layer's name in the file's own naming, without prefix
    naming: str  # "bfl" or "diffusers"
    down: TensorInfo  # A: (rank, in)
    up: TensorInfo  # B: (out, rank)
    alpha: TensorInfo | None
    targets: tuple[str, ...]  # diffusers names of the linear layers it patches
    rows: int = 0  # >0: the factors adapt only the first ``rows`` rows of ``source`` (``linear1_qkv``)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


#: How the underscore spellings begin, and the format each names.
UNDERSCORED = {"lora_unet_": "kohya", "lora_transformer_": "kohya", "lycoris_": "SimpleTuner (LyCORIS names)"}
#: ComfyUI's partial key: the attention third of a single block's fused ``linear1``.
QKV_PART = "_qkv"


@functools.lru_cache(maxsize=None)
def _linear_names(preset_name: str) -> tuple[dict[str, tuple[int, int]], dict[str, str], dict[str, str]]:
    """(diffusers linear -> weight shape, BFL linear -> itself, underscore spelling -> dotted name)."""
    preset = PRESETS[preset_name]
    linears = {n[: -len(".weight")]: s for n, s in expected_shapes(preset).items()
               if n.endswith(".weight") and len(s) == 2}
    bfl = {n: n for n in bfl_linear_names(preset)}
    underscored = {"lora_unet_" + n.replace(".", "_"): n for n in bfl}
    underscored.update({"lora_transformer_" + n.replace(".", "_"): n for n in linears})
    underscored.update({"lycoris_" + n.replace(".", "_"): n for n in linears})
    return linears, bfl, underscored


class LoraFile:
    """A LoRA file checked against a model's layer names and shapes; reads only the factors asked for."""

    def __init__(self, path: Path, preset: ModelPreset, format_name: str, modules: dict[str, LoraModule],
                 default_alpha: float | None, rslora: bool) -> None:
        self.path = path
        self.preset = preset
        self.format = format_name
        self.modules = modules
        self.default_alpha = default_alpha  # PEFT's lora_alpha from the file's metadata, if any
        self.rslora = rslora
        self.tensors_read = 0

    @classmethod
    def open(cls, path: Path, preset: ModelPreset) -> LoraFile:
        """Index ``path`` from its header and check every layer it adapts exists in ``preset`` with its shape."""
        header, metadata = read_header(path)
        linears, bfl, underscored = _linear_names(preset.name)
        parts: dict[str, dict[str, TensorInfo]] = {}
        unknown = []
        formats = set()
        for key, info in header.items():
            leaf = key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1]
            kind = next((label for start, label in UNSUPPORTED.items() if leaf.startswith(start)), None)
            if kind:
                raise LoraError(f"{path} is a {kind} adapter ({key}); meshd applies plain LoRA (up/down) files only")
            role = next((r for suffix, r in ROLES.items() if key.endswith(suffix)), None)
            if role is None:
                raise LoraError(f"{path}: tensor {key} is not part of a LoRA (expected lora_A/lora_B, "
                                "lora_down/lora_up or alpha)")
            module = key[: key.rindex(next(s for s in ROLES if key.endswith(s)))]
            if module.startswith(TEXT_ENCODER_PREFIXES):
                raise LoraError(f"{path} also adapts the text encoder ({key}); meshd applies LoRAs to the "
                                "transformer only, so this LoRA would not give the image it was made for")
            name, fmt = _normalise(module, linears, bfl, underscored)
            if name is None:
                unknown.append(module)
                continue
            formats.add(fmt)
            parts.setdefault(name, {})[role] = info
        if unknown:
            raise LoraError(f"{path} adapts {len(unknown)} layers {preset.name} does not have, e.g. {unknown[0]} "
                            "(a LoRA for another model?)")
        if not parts:
            raise LoraError(f"{path} holds no LoRA layers")
        modules = {}
        for name, roles in parts.items():
            if "down" not in roles or "up" not in roles:
                raise LoraError(f"{path}: layer {name} lacks its {'up' if 'down' in roles else 'down'} matrix")
            down, up = roles["down"], roles["up"]
            if len(down.shape) != 2 or len(up.shape) != 2 or down.shape[0] != up.shape[1]:
                raise LoraError(f"{path}: layer {name} has factors {down.shape} and {up.shape}, not a LoRA pair")
            naming = "bfl" if name in bfl or name.endswith(".linear1" + QKV_PART) else "diffusers"
            weight_shape, rows = (up.shape[0], down.shape[1]), 0
            if name.endswith(".linear1" + QKV_PART):  # the attention rows of linear1, the MLP rows untouched
                rows, name = up.shape[0], name.removesuffix(QKV_PART)
                if rows != 3 * preset.hidden:
                    raise LoraError(f"{path}: {name}{QKV_PART} has {rows} rows; {preset.name}'s attention part of "
                                    f"linear1 has {3 * preset.hidden}")
                weight_shape = (3 * preset.hidden + 2 * _mlp_hidden(preset), down.shape[1])
            try:
                targets = ({name: weight_shape} if naming == "diffusers" else
                           {t[: -len(".weight")]: s for t, s in trace_bfl(name + ".weight", weight_shape).items()})
            except (KeyError, RuntimeError) as exc:
                raise LoraError(f"{path}: layer {name} cannot be mapped onto {preset.name}: {exc}") from None
            for target, shape in targets.items():
                if tuple(shape) != tuple(linears[target]):
                    raise LoraError(f"{path} was made for another model: it changes {target} as {tuple(shape)}, "
                                    f"which is {tuple(linears[target])} in {preset.name}")
            if name in modules:
                raise LoraError(f"{path} adapts {name} twice (as {name} and {name}{QKV_PART})")
            modules[name] = LoraModule(name, naming, down, up, roles.get("alpha"), tuple(targets), rows)
        alpha, rslora = _peft_metadata(path, metadata)
        return cls(path, preset, " + ".join(sorted(formats)), modules, alpha, rslora)

    def targets(self) -> set[str]:
        """Every linear layer (diffusers name) this LoRA patches."""
        return {t for m in self.modules.values() for t in m.targets}

    def factors(self, held: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (A, B * scale)}`` in float32 on the CPU, for the layers in ``held`` only; the factors of
        other layers are never read."""
        out = {}
        wanted = [m for m in self.modules.values() if held.intersection(m.targets)]
        if not wanted:
            return out
        with open_safetensors(self.path) as f:
            def fetch(info: TensorInfo) -> torch.Tensor:
                self.tensors_read += 1
                return f.get_tensor(info.key).float()

            for module in wanted:
                down, up = fetch(module.down), fetch(module.up)
                up = up * self._scale(module, fetch(module.alpha) if module.alpha is not None else None)
                if module.rows:  # linear1_qkv: zero rows for the MLP part it leaves alone
                    full = linears_of(self.preset)[module.targets[0]][0]
                    up = torch.cat([up, up.new_zeros(full - module.rows, up.shape[1])])
                ups = ({module.source: up} if module.naming == "diffusers" else
                       {n[: -len(".weight")]: t for n, t in bfl_to_diffusers(module.source + ".weight", up).items()})
                for target, part in ups.items():
                    if target in held:
                        out[target] = (down, part)
        return out

    def _scale(self, module: LoraModule, alpha: torch.Tensor | None) -> float:
        """alpha / rank (kohya, PEFT), alpha / sqrt(rank) with rsLoRA; 1 when the file gives no alpha."""
        value = float(alpha.item()) if alpha is not None else self.default_alpha
        if value is None:
            return 1.0
        return value / (math.sqrt(module.rank) if self.rslora else module.rank)


def linears_of(preset: ModelPreset) -> dict[str, tuple[int, int]]:
    """Every linear layer of ``preset`` (diffusers name) with its weight shape."""
    return _linear_names(preset.name)[0]


def _mlp_hidden(preset: ModelPreset) -> int:
    return int(preset.hidden * float(preset.transformer["mlp_ratio"]))


def _normalise(module: str, linears: dict, bfl: dict, underscored: dict) -> tuple[str | None, str]:
    """A LoRA layer name as a diffusers or BFL layer name of the model (None if it has none), and the format."""
    if module in underscored:
        return underscored[module], next(f for start, f in UNDERSCORED.items() if module.startswith(start))
    name, stripped = module, True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    if name in linears:
        return name, "diffusers/PEFT"
    if name in bfl:
        return name, "BFL/ai-toolkit"
    if name.endswith(".linear1" + QKV_PART) and name.removesuffix(QKV_PART) in bfl:
        return name, "BFL/ai-toolkit"
    return None, ""


def _peft_metadata(path: Path, metadata: dict[str, str]) -> tuple[float | None, bool]:
    """PEFT's ``lora_alpha`` and ``use_rslora`` from diffusers' ``lora_adapter_metadata``, if present."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False
    try:
        data = json.loads(raw)
    except ValueError:
        raise LoraError(f"{path} has unreadable lora_adapter_metadata") from None
    config = {k.removeprefix("transformer."): v for k, v in data.items()} if isinstance(data, dict) else {}
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise LoraError(f"{path} uses per-layer alpha or rank patterns, which meshd does not apply")
    alpha = config.get("lora_alpha")
    return (float(alpha) if isinstance(alpha, (int, float)) else None), bool(config.get("use_rslora", False))


# --- the LoRA folders ------------------------------------------------------------------------------

class LoraStore:
    """The configured LoRA folders. A LoRA is found by its sha256 (the name only says where to look
    first); files are never taken from anywhere else, and never sent over the wire."""

    def __init__(self, dirs: Iterable[Path], cache_dir: Path | None = None) -> None:
        self.dirs = list(dict.fromkeys(comfyui.real_folders(dirs)))  # a folder given twice (through a link): once
        self._hashes = FileHashes(cache_dir)
        self._opened: dict[tuple[Path, str, str], LoraFile] = {}

    def scan(self) -> tuple[list[Path], list[tuple[Path, Path]]]:
        """One walk of the LoRA folders: every ``.safetensors`` file in them (subfolders included), and
        (link, target) of each file or subfolder that a link takes out of them (never read, only named). A file
        in two of them (one folder inside another) is listed once, as the first finds it."""
        inside, linked, seen = [], [], set()
        for d in self.dirs:
            if d.is_dir():  # rglob does not descend into a linked folder: one linked in from inside them is
                for path in sorted(d.rglob("*")):  # listed where it really is, one linked out is named
                    if path in seen:  # (as spelled: a link to another file of them is a name of its own)
                        continue
                    seen.add(path)
                    if path.is_symlink() and path.is_dir():
                        target = comfyui.escapes(path, self.dirs)
                        if target is not None:
                            linked.append((path, target))
                    elif path.name.endswith(SAFETENSORS_SUFFIX) and path.is_file():
                        target = comfyui.escapes(path, self.dirs)
                        if target is None:
                            inside.append(path)
                        else:
                            linked.append((path, target))
        return inside, linked

    def name_of(self, path: Path) -> str:
        """The name a request should use for ``path``: its path in its LoRA folder, without ``.safetensors``."""
        for d in self.dirs:
            if d in path.parents:
                return path.relative_to(d).as_posix().removesuffix(SAFETENSORS_SUFFIX)
        return path.name.removesuffix(SAFETENSORS_SUFFIX)

    def _names(self, path: Path) -> set[str]:
        """Every name that points at ``path``: file name, stem, and path in its folder (with or without suffix)."""
        short = self.name_of(path)
        return {path.name, path.name.removesuffix(SAFETENSORS_SUFFIX), short, short + SAFETENSORS_SUFFIX}

    def _where(self) -> str:
        return ", ".join(map(str, self.dirs)) or "none configured (lora_dir)"

    def find(self, spec: LoraSpec) -> Path:
        """The file with ``spec.sha256``, looking first at files named ``spec.name``; LoraError otherwise."""
        if not self.dirs:
            raise LoraError(f"LoRA {spec.name} was asked for, but no LoRA folders are configured here (lora_dir)")
        files, _ = self.scan()
        hinted = [p for p in files if spec.name in self._names(p)]
        wrong = []
        for path in hinted + [p for p in files if p not in hinted]:
            digest = self._hashes.sha256(path)
            if digest == spec.sha256:
                return path
            if path in hinted:
                wrong.append((path, digest))
        if wrong:
            path, digest = wrong[0]
            raise LoraError(f"LoRA {spec.name}: {path} has sha256 {digest[:12]}, the request wants "
                            f"{spec.sha256[:12]} (another version of the file); copy the requester's file into "
                            f"{self._where()}")
        raise LoraError(f"LoRA {spec.name} (sha256 {spec.sha256[:12]}) is not in the LoRA folders here "
                        f"({self._where()}); copy the file there")

    def spec(self, name: str, strength: float = 1.0) -> LoraSpec:
        """The spec naming the file ``name`` of these folders (by file name, stem or relative path)."""
        try:
            probe = LoraSpec(name, "0" * 64, strength)
        except ValueError as exc:
            raise LoraError(str(exc)) from None
        files, links = self.scan()
        matches = [p for p in files if probe.name in self._names(p)]
        if not matches:  # a file linked out, or one in a folder linked out: the link is named
            linked = next(((p, t) for p, t in links if probe.name in self._names(p)
                           or probe.name.startswith(self.name_of(p) + "/")), None)
            if linked is not None:
                raise LoraError(comfyui.link_refusal(*linked, self.dirs, "lora_dir"))
            raise LoraError(f"no LoRA named {name} in {self._where()}")
        if len(matches) > 1:
            raise LoraError(f"LoRA name {name} is ambiguous: {', '.join(map(str, matches))}; give its relative path")
        return LoraSpec(name, self._hashes.sha256(matches[0]), strength)

    def open(self, spec: LoraSpec, preset: ModelPreset) -> LoraFile:
        """The file of ``spec``, found by hash and checked against ``preset`` (its index is kept)."""
        path = self.find(spec)
        key = (path, spec.sha256, preset.name)
        if key not in self._opened:
            try:
                self._opened[key] = LoraFile.open(path, preset)
            except LoraError:
                raise
            except ModelError as exc:
                raise LoraError(f"LoRA {spec.name}: {exc}") from None
        return self._opened[key]


# --- applying LoRAs to a span --------------------------------------------------------------------

def stack_factors(loaded: list[tuple[LoraSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]],
                  device: torch.device, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One (A, B) pair per layer for several LoRAs: A's stacked, B's side by side, each scaled by its
    strength, in the order given, then cast to the model dtype."""
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for spec, factors in loaded:
        for layer, (down, up) in factors.items():
            per_layer.setdefault(layer, []).append((down, up * spec.strength))
    return {
        layer: (torch.cat([d for d, _ in pairs]).to(device=device, dtype=dtype),
                torch.cat([u for _, u in pairs], dim=1).to(device=device, dtype=dtype))
        for layer, pairs in sorted(per_layer.items())
    }


class _LowRank:
    """The forward hook of one patched layer: adds ``B (A x)`` to its output."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.down, self.up = down, up

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + torch.nn.functional.linear(torch.nn.functional.linear(args[0], self.down), self.up)


class LoraPatch:
    """Low-rank updates hooked onto a span's linear layers. Removing it leaves the weights untouched."""

    def __init__(self, span: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        modules = dict(span.named_modules())
        missing = [name for name in factors if not isinstance(modules.get(name), LINEAR_TYPES)]
        if missing:
            raise ValueError(f"no linear layer {missing[0]} in this span")
        self.layers = tuple(factors)
        self._handles = [modules[name].register_forward_hook(_LowRank(*factors[name])) for name in self.layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def held_linears(span: torch.nn.Module) -> set[str]:
    """Names of the linear layers a span holds (diffusers naming), dense, fp8 or GGUF alike."""
    return {name for name, module in span.named_modules() if isinstance(module, LINEAR_TYPES)}
