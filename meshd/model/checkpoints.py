"""FLUX.2 transformer checkpoints in the layouts users already have, read one span at a time.

Layouts, told apart by their tensor names (never by the file name):

- **diffusers folder**: ``transformer/config.json`` and one or more ``*.safetensors`` (+ the shard index);
- **BFL single file**: the reference code's names (``double_blocks.N.img_attn.qkv.weight``, ...);
- **ComfyUI single file**: the BFL names under ``model.diffusion_model.``, in bf16, raw fp8 (e4m3 or e5m2),
  "scaled fp8" (fp8 plus a per-tensor ``.weight_scale`` / ``.scale_weight``), or a mix of these;
- a single file with diffusers names (with or without a prefix) is read the same way;
- a **GGUF file** (city96's ComfyUI-GGUF layout: BFL names, block linears in Q8_0/Q6_K/Q5_K/Q4_K), see
  :mod:`.gguf`.

Weights are handed out at the precision they are stored in (:mod:`.precision`): fp8 stays fp8 with its
scale, GGUF stays packed; ``weights = "bf16"`` dequantises at load instead, and ``weights = "fp8"`` (or a
GGUF type) quantises a dense file's block weights at load, one tensor at a time on the device.

Which layers are quantised is read the way ComfyUI reads it (comfy/utils.py ``convert_old_quants``,
comfy/ops.py): a per-layer ``comfy_quant`` record, the header's ``_quantization_metadata``, or the legacy
``scaled_fp8`` marker with ``.scale_weight`` scales. A scale beside a layer none of these declare is
ignored, as ComfyUI ignores it. Every declared format, scale dtype and scale shape is checked when the
file is opened, and anything meshd cannot compute is refused there, by name.

All of them go through one path. The header (names, dtypes, shapes) is indexed without reading any
data. A span asks for tensors by their diffusers names; each is traced to the one stored tensor it
comes from (``qkv`` feeds ``to_q``, ``to_k`` and ``to_v``), which is read and handed to diffusers' own
``convert_flux2_transformer_checkpoint_to_diffusers``. The converter only ever sees one tensor without
prefix (values, a per-row scale or packed GGUF rows: it only splits and swaps rows), the input it handles
correctly. Given a whole ComfyUI file it fails
on the prefix, crashes on ``qkv.weight_scale`` and silently drops the other scales (research/flux2.md §5).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import comfyui
from .gguf import GGUF_SUFFIX, gguf_type, open_gguf, read_gguf_header
from .dequant import dequantise_fp8, dequantise_gguf
from .precision import (
    DENSE,
    GGUF_FLOATS,
    LOAD_FORMATS,
    LinearFormat,
    gguf_sizes,
    load_format,
    quantise,
)
from .presets import PRESETS, ModelPreset
from .span import span_modules
from .tensorfiles import FileHashes, ModelError, TensorInfo, open_safetensors, read_header, read_json, require_safetensors

#: Suffixes of a weight's dequantization scale (both spellings exist in the wild).
SCALE_SUFFIXES = ("weight_scale", "scale_weight")
#: ComfyUI's per-layer quantisation record: a uint8 tensor holding JSON such as {"format": "float8_e4m3fn"}.
QUANT_RECORD_SUFFIX = "comfy_quant"
#: A record is a few dozen bytes of JSON; anything bigger is not one (and is not read into memory).
MAX_RECORD_BYTES = 4096
#: Static activation scales (new and old spelling). meshd scales activations per token on its native fp8
#: path and computes in bf16 elsewhere, so these are never read.
UNUSED_SUFFIXES = ("input_scale", "scale_input")
#: Whole-file markers (ComfyUI's legacy scaled-fp8 flag), not weights.
MARKER_KEYS = ("scaled_fp8",)
#: Suffixes of quantisation schemes meshd does not dequantize (NVFP4's second scale, GGUF-style blocks).
UNSUPPORTED_SUFFIXES = ("weight_scale_2", "qweight", "absmax")

FLOAT_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
FP8_DTYPES = {"F8_E4M3": "fp8 e4m3", "F8_E5M2": "fp8 e5m2"}
#: safetensors fp8 dtype -> the fp8 format name of :class:`.precision.LinearFormat`.
FP8_FORMATS = {"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}
#: ComfyUI's quantisation formats meshd computes: the per-layer record's "format" -> the stored dtype it means.
QUANT_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
#: Formats ComfyUI knows that meshd refuses, with what they are (so the message says why).
REFUSED_FORMATS = {"mxfp8": "mxfp8 (e4m3 values with one E8M0 scale per 32)",
                   "nvfp4": "nvfp4 (4-bit floats with block scales)", "mxfp4": "mxfp4 (4-bit floats with E8M0 scales)",
                   "int8_tensorwise": "int8", "int8_blockwise": "int8"}
#: Dtypes a dequantisation scale may have (an E8M0 or uint8 scale belongs to a block format).
SCALE_DTYPES = ("F32", "BF16", "F16")

#: FLUX.2's linear layers in BFL naming (the reference code, ComfyUI, kohya and ai-toolkit LoRAs).
BFL_DOUBLE_LINEARS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                      "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
BFL_SINGLE_LINEARS = ("linear1", "linear2")
BFL_SHARED_LINEARS = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                      "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                      "single_stream_modulation.lin", "final_layer.linear", "final_layer.adaLN_modulation.1")
BFL_GUIDANCE_LINEARS = ("guidance_in.in_layer", "guidance_in.out_layer")


def bfl_linear_names(preset: ModelPreset) -> list[str]:
    """Every linear layer of ``preset`` by its BFL name (no ``.weight``)."""
    names = [f"double_blocks.{i}.{m}" for i in range(preset.num_double) for m in BFL_DOUBLE_LINEARS]
    names += [f"single_blocks.{i}.{m}" for i in range(preset.num_single) for m in BFL_SINGLE_LINEARS]
    names += list(BFL_SHARED_LINEARS)
    if preset.transformer["guidance_embeds"]:
        names += list(BFL_GUIDANCE_LINEARS)
    return names


def bfl_to_diffusers(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One BFL-named tensor (no prefix, dequantized) as the diffusers tensors it becomes.

    Only row operations happen (the ``qkv`` split, the final layer's shift/scale swap), which is why
    a LoRA's up matrix converts with this same function. Raises KeyError for a name FLUX.2 lacks.
    """
    # Imported here: the module costs ~4 s of import (it pulls in transformers), and only single-file
    # checkpoints need it.
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: PLC0415

    return convert_flux2_transformer_checkpoint_to_diffusers({key: value})


def trace_bfl(key: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The diffusers names and shapes a BFL tensor of ``shape`` becomes, without any data."""
    out = bfl_to_diffusers(key, torch.empty(shape, device="meta"))
    return {name: tuple(t.shape) for name, t in out.items()}


@functools.lru_cache(maxsize=None)
def _expected_shapes(preset_name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = span_modules(PRESETS[preset_name], range(PRESETS[preset_name].num_blocks), True, True)
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict(keep_vars=True).items())


def expected_shapes(preset: ModelPreset) -> dict[str, tuple[int, ...]]:
    """Every tensor of the whole ``preset`` transformer by diffusers name, with its shape."""
    return dict(_expected_shapes(preset.name))


def _known() -> str:
    return ", ".join(f"{p.name}: {p.num_double} + {p.num_single} of {p.hidden}" for p in PRESETS.values())


def match_preset(config: dict) -> ModelPreset:
    """The preset whose block structure ``config`` has (a transformer config.json)."""
    keys = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
            "in_channels")
    for preset in PRESETS.values():
        if all(int(config.get(k, -1)) == int(preset.transformer[k]) for k in keys) and \
                bool(config.get("guidance_embeds", preset.transformer["guidance_embeds"])) == \
                bool(preset.transformer["guidance_embeds"]):
            return preset
    shape = {k: config.get(k) for k in (*keys, "guidance_embeds")}
    raise ModelError(f"transformer config {shape} matches no known FLUX.2 model ({', '.join(PRESETS)})")


@dataclass(frozen=True)
class StoredTensor:
    """A weight as stored, with what it takes to turn it back into numbers."""

    info: TensorInfo
    scale: TensorInfo | None = None  # the declared per-tensor (or per-row) dequantisation scale
    format: LinearFormat = DENSE  # how it is stored: dense, fp8 (scaled or raw) or GGUF blocks

    @property
    def kind(self) -> str:
        """bf16, fp16, fp32, "fp8 e4m3", "fp8 e4m3 scaled", "fp8 e4m3 scaled per-row", "gguf Q4_K"..."""
        qtype = gguf_type(self.info)
        if qtype is not None:
            # GGUF names its float types as safetensors does (BF16, F16, F32)
            return FLOAT_DTYPES[qtype] if qtype in GGUF_FLOATS else f"gguf {qtype}"

        base = FLOAT_DTYPES.get(self.info.dtype) or FP8_DTYPES.get(self.info.dtype, self.info.dtype)
        if not self.scale:
            return base
        return f"{base} scaled per-row" if self.format.per_row else f"{base} scaled"


class Checkpoint:
    """A FLUX.2 transformer on disk, in any supported layout, that reads exactly the tensors asked for.

    Opening it reads headers only and checks every tensor's name and shape against its preset, so a
    wrong or incomplete file is refused before anything is loaded.
    """

    def __init__(self, path: Path, files: list[Path], layout: str, naming: str, folder: bool, preset: ModelPreset,
                 stored: dict[str, StoredTensor], sources: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = path  # the model folder, or the single file
        self.files = files
        self.layout = layout
        self.naming = naming  # "bfl" or "diffusers"
        self.folder = folder
        self.preset = preset
        self._stored = stored  # name in the file (without prefix) -> stored weight
        self._sources = sources  # diffusers name -> name of the stored tensor it comes from
        self._shapes = shapes  # diffusers name -> shape
        self.tensors_read = 0  # tensors fetched from disk by read() (weights, scales); tests count these
        self._lock = threading.Lock()
        self._check()

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open_folder(cls, transformer: Path) -> Checkpoint:
        """A diffusers ``transformer/`` folder: config.json, shards, and their index when there is one."""
        preset = match_preset(read_json(transformer / "config.json"))
        index = transformer / "diffusion_pytorch_model.safetensors.index.json"
        if index.exists():
            mapping = read_json(index).get("weight_map")
            if not isinstance(mapping, dict):
                raise ModelError(f"{index} has no weight_map")
            files = []
            for file in sorted(set(map(str, mapping.values()))):
                # a name of this folder, as spelled; where a linked shard really is, the model folders' one
                # rule decides (ModelStore refuses a link out of them, as it does without an index)
                path = Path(os.path.normpath(transformer / file))
                if path.parent != Path(os.path.normpath(transformer)):
                    raise ModelError(f"{index} points outside its folder: {file}")
                files.append(path)
        else:
            files = require_safetensors(transformer)
        header: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for path in files:
            infos, meta = read_header(path)
            header.update(infos)
            metadata.update(meta)
        if index.exists():
            lost = [k for k, f in mapping.items() if k not in header or header[k].file.name != Path(str(f)).name]
            if lost:
                raise ModelError(f"{index} lists {len(lost)} tensors its shards do not hold, e.g. {lost[0]}")
        return cls._build(transformer.parent, files, header, metadata, preset, folder=True)

    @classmethod
    def open_file(cls, path: Path) -> Checkpoint:
        """A single-file checkpoint (BFL or ComfyUI, any precision, or GGUF); its preset is read from its shapes."""
        header, metadata = read_gguf_header(path) if path.suffix == GGUF_SUFFIX else read_header(path)
        return cls._build(path, [path], header, metadata, None, folder=False)

    @classmethod
    def _build(cls, path: Path, files: list[Path], header: dict[str, TensorInfo], metadata: dict[str, str],
               preset: ModelPreset | None, folder: bool) -> Checkpoint:
        prefix, naming = _detect_layout(path, header)
        local = {k[len(prefix):]: info for k, info in header.items() if k.startswith(prefix)}
        declared = _declared_formats(path, local, metadata, prefix)
        stored = _index_weights(path, local, declared)
        sources: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        unknown = []
        for name, weight in stored.items():
            if naming == "diffusers":
                targets = {name: weight.info.shape}
            else:
                try:
                    targets = trace_bfl(name, weight.info.shape)
                except (KeyError, RuntimeError):
                    unknown.append(name)
                    continue
            for target, shape in targets.items():
                sources[target] = name
                shapes[target] = shape
        if unknown:
            raise ModelError(f"{path} holds {len(unknown)} tensors FLUX.2 does not have, e.g. {unknown[0]} "
                             "(a FLUX.1 or other model's checkpoint?)")
        if preset is None:
            config = _config_from_shapes(path, shapes)
            try:
                preset = match_preset(config)
            except ModelError:
                raise ModelError(
                    f"{path} holds a FLUX.2 transformer of {config['num_layers']} + {config['num_single_layers']} "
                    f"blocks, width {config['num_attention_heads'] * config['attention_head_dim']}, text width "
                    f"{config['joint_attention_dim']}, which no known model has ({_known()}); a partial checkpoint?"
                ) from None
        if folder:
            layout = "diffusers folder"
        elif path.suffix == GGUF_SUFFIX:
            layout = "GGUF single file"
        elif prefix == "model.diffusion_model.":
            layout = "ComfyUI single file"
        else:
            layout = f"{'BFL' if naming == 'bfl' else 'diffusers-named'} single file"
        return cls(path, files, layout, naming, folder, preset, stored, sources, shapes)

    def _check(self) -> None:
        """Every tensor of the preset, with its shape, and nothing else: or a ModelError naming the first miss."""
        shapes, expected = self._shapes, expected_shapes(self.preset)
        missing = [n for n in expected if n not in shapes]
        if missing:
            raise ModelError(f"{self.path} lacks {len(missing)} of the {len(expected)} tensors of "
                             f"{self.preset.name}, e.g. {missing[0]} (an incomplete or partial checkpoint?)")
        extra = [n for n in shapes if n not in expected]
        if extra:
            raise ModelError(f"{self.path} holds {len(extra)} tensors {self.preset.name} does not have, "
                             f"e.g. {extra[0]}")
        for name, shape in expected.items():
            if shapes[name] != shape:
                raise ModelError(f"{self.path}: tensor {name} has shape {shapes[name]}; {self.preset.name} "
                                 f"needs {shape}")

    # --- what it holds ------------------------------------------------------------------------

    @property
    def quantisation(self) -> str:
        """How the weights are stored, e.g. "bf16" or "fp8 e4m3 scaled 180, bf16 12"."""
        counts: dict[str, int] = {}
        for weight in self._stored.values():
            counts[weight.kind] = counts.get(weight.kind, 0) + 1
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor by diffusers name, with its shape (from the header)."""
        return dict(self._shapes)

    def linear_formats(self, weights: str = "auto") -> dict[str, LinearFormat]:
        """How each linear layer (diffusers module name) is held on the device under ``weights``: "auto"
        as stored, "bf16" dense, or a format of :data:`.precision.LOAD_FORMATS` for the dense block weights
        (already quantised layers stay as stored)."""
        return {module: target_format(self._stored[self._sources[f"{module}.weight"]].format, weights, module, shape)
                for module, shape in _linears(self._shapes).items()}

    # --- reading ------------------------------------------------------------------------------

    def read(self, names: Iterable[str], device: torch.device, dtype: torch.dtype,
             formats: dict[str, LinearFormat] | None = None) -> dict[str, torch.Tensor]:
        """Exactly the tensors ``names`` (diffusers state-dict names of layers held as ``formats``, dense
        where a layer is not named) on ``device``: floats in ``dtype``, fp8 and GGUF as their layer holds
        them. Nothing else is read; a quantised-at-load layer is quantised on ``device`` tensor by tensor."""
        formats = formats or {}
        wanted: dict[str, list[str]] = {}
        for name in names:
            weight = name.removesuffix("_scale") if name.endswith(".weight_scale") else name
            source = self._sources.get(weight)
            if source is None:
                raise ModelError(f"{self.path} has no tensor {name}")
            wanted.setdefault(source, []).append(name)
        out: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}

            def fetch(info: TensorInfo) -> torch.Tensor:
                if info.file not in handles:
                    opener = open_gguf if info.file.suffix == GGUF_SUFFIX else open_safetensors
                    handles[info.file] = stack.enter_context(opener(info.file))
                handle = handles[info.file]
                tensor = handle.get_tensor(info.key, info.shape) if gguf_type(info) else handle.get_tensor(info.key)
                with self._lock:
                    self.tensors_read += 1
                return tensor

            for source, targets in wanted.items():
                stored = self._stored[source]
                pieces = self._convert(source, fetch(stored.info))
                scales = self._scales(source, stored, fetch)
                held: dict[str, dict[str, torch.Tensor]] = {}  # diffusers weight -> its layer's tensors
                for name in targets:
                    weight = name.removesuffix("_scale") if name.endswith(".weight_scale") else name
                    module = weight.removesuffix(".weight")
                    fmt = formats.get(module, DENSE) if weight.endswith(".weight") else DENSE
                    if weight not in held:
                        held[weight] = _as_format(pieces[weight], stored.format, scales.get(weight), fmt, device,
                                                  dtype)
                    out[name] = held[weight]["weight" if name == weight else "weight_scale"]
        return out

    def _convert(self, source: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """A stored tensor (values, per-row scales or packed GGUF rows) under its diffusers name(s)."""
        return {source: value} if self.naming == "diffusers" else bfl_to_diffusers(source, value)

    def _scales(self, source: str, stored: StoredTensor, fetch) -> dict[str, torch.Tensor]:
        """The float32 scale of each diffusers weight ``source`` becomes: ``()`` per tensor, ``[rows, 1]`` per row."""
        if stored.format.kind != "fp8":
            return {}
        scale = fp8_scale(fetch(stored.scale) if stored.scale is not None else None, stored.format.per_row)
        if scale.ndim == 0:
            return {name: scale for name in self._convert(source, torch.empty(stored.info.shape, device="meta"))}
        return self._convert(source, scale)

    def content_hash(self, cache_dir: Path | None = None) -> str:
        """What the handshake compares: the file's sha256 (as ``sha256sum`` prints it) for a single file;
        for a folder, a sha256 over its shards' names and hashes."""
        hashes = FileHashes(cache_dir)
        if not self.folder:
            return hashes.sha256(self.files[0])
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.name.encode() + b"\0" + hashes.sha256(path).encode() + b"\n")
        return digest.hexdigest()


# --- layout detection and indexing ---------------------------------------------------------------

def _detect_layout(path: Path, header: dict[str, TensorInfo]) -> tuple[str, str]:
    """(prefix, naming) of a checkpoint, by the inventory's own rule (:func:`.comfyui.transformer_layout`),
    or a ModelError saying what the file is instead."""
    if comfyui.is_lora(header):
        raise ModelError(f"{path} is a LoRA, not a model: put it in a LoRA folder (lora_dir) and name it in the "
                         "generation request")
    layout = comfyui.transformer_layout(header)
    if layout is None:
        example = next(iter(header), "no tensors at all")
        raise ModelError(f"{path} holds no FLUX.2 transformer blocks (e.g. {example}); is it a VAE, a text encoder, "
                         "or another model?")
    return layout


def _declared_formats(path: Path, local: dict[str, TensorInfo], metadata: dict[str, str],
                      prefix: str) -> dict[str, str]:
    """The transformer's :func:`declared_formats`, each one meshd computes (else a ModelError naming the layer)."""
    declared = declared_formats(path, local, metadata, prefix)
    for module, fmt in declared.items():
        if fmt not in QUANT_FORMATS:
            what = REFUSED_FORMATS.get(fmt, repr(fmt))
            raise ModelError(f"{path}: layer {module} is quantised as {what}; meshd computes fp8 (float8_e4m3fn, "
                             "float8_e5m2) scaled per tensor or per row, bf16 and GGUF; use such a checkpoint")
    return declared


def declared_formats(path: Path, local: dict[str, TensorInfo], metadata: dict[str, str],
                     prefix: str) -> dict[str, str]:
    """Module name (no prefix) -> the quantisation format the file declares for it, from the header's
    ``_quantization_metadata`` (its layers under ``prefix`` only: an all-in-one file lists its VAE's and text
    encoder's too, which say nothing about the part read), ComfyUI's per-layer ``comfy_quant`` records among
    ``local`` (the part's tensors, prefix stripped; tiny tensors, read here), and the legacy ``scaled_fp8``
    marker with ``.scale_weight`` scales (ComfyUI's ``convert_old_quants``). The transformer and the text
    encoders read their files by this one rule; each refuses, in its own words, a format it cannot compute."""
    declared: dict[str, str] = {}
    if metadata.get("_quantization_metadata"):
        declared = {module[len(prefix):]: fmt for module, fmt in metadata_formats(path, metadata).items()
                    if module.startswith(prefix)}
    elif "scaled_fp8" in local:
        for name in local:
            if name.endswith(".scale_weight"):
                declared[name.removesuffix(".scale_weight")] = "float8_e4m3fn"
    records: dict[Path, list[str]] = {}  # by file: a sharded folder may spread them over its shards
    for name, info in local.items():
        if name.endswith("." + QUANT_RECORD_SUFFIX):
            records.setdefault(info.file, []).append(name)
    for file, names in records.items():
        with open_safetensors(file) as f:
            for name in names:
                declared[name.removesuffix("." + QUANT_RECORD_SUFFIX)] = record_format(path, f, local[name])
    return declared


def layer_scale(local: dict[str, TensorInfo], module: str) -> TensorInfo | None:
    """The dequantisation scale stored beside ``module``'s weight (either spelling), if any: what a layer
    declared quantised is scaled by (a scale beside an undeclared layer is ignored, as ComfyUI ignores it)."""
    return next((local[f"{module}.{s}"] for s in SCALE_SUFFIXES if f"{module}.{s}" in local), None)


def metadata_formats(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """Module (as the file names it, prefix and all) -> format, from the header's ``_quantization_metadata``
    (``{"layers": {module: {"format": ...}}}``; a bare format string is read as the format)."""
    raw = metadata.get("_quantization_metadata")
    if not raw:
        return {}
    try:
        items = list(json.loads(raw).get("layers", {}).items())
    except (ValueError, AttributeError, TypeError):
        raise ModelError(f"{path} has unreadable _quantization_metadata") from None
    return {str(module): str(conf.get("format", "") if isinstance(conf, dict) else conf) for module, conf in items}


def record_format(path: Path, handle, info: TensorInfo) -> str:
    """The format a ComfyUI ``comfy_quant`` record declares: a JSON string stored as a 1-d uint8 tensor, read
    from the open ``handle`` only when the header shows it small (at most MAX_RECORD_BYTES)."""
    if info.dtype != "U8" or len(info.shape) != 1 or info.shape[0] > MAX_RECORD_BYTES:
        raise ModelError(f"{path}: {info.key} is not a quantisation record (a JSON string of at most "
                         f"{MAX_RECORD_BYTES} bytes); it is {info.dtype} {list(info.shape)}")
    try:
        return str(json.loads(bytes(handle.get_tensor(info.key).to(torch.uint8).tolist()).decode()).get("format", ""))
    except (ValueError, AttributeError, TypeError, UnicodeDecodeError):
        raise ModelError(f"{path}: {info.key} is not a readable quantisation record") from None


def _index_weights(path: Path, local: dict[str, TensorInfo], declared: dict[str, str]) -> dict[str, StoredTensor]:
    """The weights among ``local`` tensors, each with its declared scale and how it is stored."""
    stored = {}
    for name, info in local.items():
        leaf = name.rsplit(".", 1)[-1]
        if name in MARKER_KEYS or leaf in SCALE_SUFFIXES or leaf in UNUSED_SUFFIXES or leaf == QUANT_RECORD_SUFFIX:
            continue
        if leaf in UNSUPPORTED_SUFFIXES:
            raise ModelError(f"{path} uses a quantisation meshd cannot dequantize ({name}); use a bf16, fp8, "
                             "scaled-fp8 or GGUF checkpoint")
        qtype = gguf_type(info)
        if qtype is not None:
            fmt = DENSE if qtype in GGUF_FLOATS else LinearFormat("gguf", qtype=qtype)
            stored[name] = StoredTensor(info, None, fmt)
            continue
        if info.dtype not in FLOAT_DTYPES and info.dtype not in FP8_DTYPES:
            raise ModelError(f"{path}: {name} is stored as {info.dtype}, a quantisation meshd cannot dequantize; "
                             "use a bf16, fp8, scaled-fp8 or GGUF checkpoint")
        module = name.rsplit(".", 1)[0]
        fmt_name = declared.get(module) if leaf == "weight" else None
        if fmt_name is not None and QUANT_FORMATS[fmt_name] != info.dtype:
            raise ModelError(f"{path}: layer {module} is declared {fmt_name} but its weight is stored as {info.dtype}")
        if info.dtype not in FP8_DTYPES:
            stored[name] = StoredTensor(info)
            continue
        # A scale counts only where the layer is declared quantised; ComfyUI ignores any other.
        scale = layer_scale(local, module) if fmt_name is not None else None
        stored[name] = fp8_weight(path, info, scale)
    return stored


def fp8_weight(path: Path, weight: TensorInfo, scale: TensorInfo | None) -> StoredTensor:
    """An fp8 weight as stored, with its declared scale (None: raw fp8) and whether that scale is per tensor or
    per row; the text encoders' files index their fp8 layers through this too."""
    per_row = scale is not None and scale_layout(path, weight, scale)
    return StoredTensor(weight, scale, LinearFormat("fp8", FP8_FORMATS[weight.dtype], per_row=per_row))


def scale_layout(path: Path, weight: TensorInfo, scale: TensorInfo) -> bool:
    """True for one scale per output row (``[rows]`` or ``[rows, 1]``), False for one per tensor; any other
    dtype or shape (per column, per block) is refused naming it."""
    if scale.dtype not in SCALE_DTYPES:
        raise ModelError(f"{path}: scale {scale.key} is {scale.dtype} (a block-format scale, as mxfp8's E8M0); meshd "
                         "reads float32/bf16/fp16 scales per tensor or per row")
    if math.prod(scale.shape) == 1:
        return False
    rows = weight.shape[0] if len(weight.shape) == 2 else -1
    if scale.shape in ((rows,), (rows, 1)):
        return True
    raise ModelError(f"{path}: scale {scale.key} has shape {scale.shape}, neither per-tensor nor per-row "
                     f"([{rows}] or [{rows}, 1]) for weight {weight.shape}")


def fp8_scale(scale: torch.Tensor | None, per_row: bool) -> torch.Tensor:
    """The float32 ``weight_scale`` an fp8 layer holds (:class:`.precision.Fp8Linear`): ``()`` per tensor (1 for
    raw fp8, which declares none), ``[rows, 1]`` per row (the layout :func:`scale_layout` told from the header)."""
    if scale is None:
        return torch.ones((), dtype=torch.float32)
    scale = scale.float()
    return scale.reshape(-1, 1) if per_row else scale.reshape(())


def _linears(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of every linear layer among diffusers-named ``shapes``."""
    return {name.removesuffix(".weight"): shape for name, shape in shapes.items()
            if name.endswith(".weight") and len(shape) == 2}


def is_block_layer(module: str) -> bool:
    """A layer inside a transformer block (what ``weights = "fp8"`` quantises; the embedders, modulation
    and final layer stay as stored)."""
    return module.startswith(("transformer_blocks.", "single_transformer_blocks."))


def target_format(stored: LinearFormat, weights: str, module: str, shape: tuple[int, int]) -> LinearFormat:
    """How a layer stored as ``stored`` is held under ``weights`` (see :meth:`Checkpoint.linear_formats`)."""
    if weights == "bf16":
        return DENSE
    if weights == "auto" or stored.kind != "dense" or not is_block_layer(module):
        return stored
    if weights not in LOAD_FORMATS:
        raise ModelError(f"weights {weights!r}: use auto, bf16 or one of {', '.join(LOAD_FORMATS)}")
    fmt = load_format(weights)
    if fmt.kind == "gguf" and shape[1] % gguf_sizes(fmt.qtype)[0]:
        return DENSE  # rows that are not whole GGUF blocks stay dense (as ComfyUI-GGUF's converter does)
    return fmt


def _config_from_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict:
    """A transformer config.json's structural fields, read off a single file's tensor shapes."""
    try:
        hidden, in_channels = shapes["x_embedder.weight"]
        _, joint = shapes["context_embedder.weight"]
        (head_dim,) = shapes["transformer_blocks.0.attn.norm_q.weight"]
    except (KeyError, ValueError):
        raise ModelError(f"{path} lacks the embedders or the first block, so its model cannot be recognised "
                         "(a partial checkpoint?)") from None

    def count(prefix: str) -> int:
        return 1 + max((int(n.split(".")[1]) for n in shapes if n.startswith(prefix)), default=-1)

    return {
        "num_layers": count("transformer_blocks."),
        "num_single_layers": count("single_transformer_blocks."),
        "num_attention_heads": hidden // head_dim,
        "attention_head_dim": head_dim,
        "joint_attention_dim": joint,
        "in_channels": in_channels,
        "guidance_embeds": any(n.startswith("time_guidance_embed.guidance_embedder.") for n in shapes),
    }


def _as_format(value: torch.Tensor, stored: LinearFormat, scale: torch.Tensor | None, fmt: LinearFormat,
               device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One stored weight (as the converter hands it out) as the tensors of a ``fmt`` layer on ``device``:
    kept as stored, dequantised into ``dtype`` (the numbers the stored layer computes with), or quantised at
    load a chunk of rows at a time (on the device, so no dense copy stays behind)."""
    if fmt == stored and fmt.kind == "fp8":
        return {"weight": value.to(device), "weight_scale": scale.to(device)}
    if fmt == stored and fmt.kind == "gguf":
        return {"weight": value.to(device)}
    if stored.kind == "fp8":
        dense = dequantise_fp8(value.to(device), scale.to(device), dtype)
    elif stored.kind == "gguf":
        dense = dequantise_gguf(value.to(device), stored.qtype, dtype)
    else:
        dense = value
    cast = dtype if dense.dtype.is_floating_point else dense.dtype
    if fmt.kind == "dense":
        return {"weight": dense.to(device=device, dtype=cast)}
    return quantise(dense, fmt, device, cast)
