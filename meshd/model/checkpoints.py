"""FLUX.2 transformer checkpoints in the layouts users already have, read one span at a time.

Layouts, told apart by their tensor names (never by the file name):

- **diffusers folder**: ``transformer/config.json`` and one or more ``*.safetensors`` (+ the shard index);
- **BFL single file**: the reference code's names (``double_blocks.N.img_attn.qkv.weight``, ...);
- **ComfyUI single file**: the BFL names under ``model.diffusion_model.``, in bf16, raw fp8 (e4m3 or e5m2),
  "scaled fp8" (fp8 plus a per-tensor ``.weight_scale`` / ``.scale_weight``), or a mix of these;
- a single file with diffusers names (with or without a prefix) is read the same way.

All of them go through one path. The header (names, dtypes, shapes) is indexed without reading any
data. A span asks for tensors by their diffusers names; each is traced to the one stored tensor it
comes from (``qkv`` feeds ``to_q``, ``to_k`` and ``to_v``), which is read, dequantized and handed to
diffusers' own ``convert_flux2_transformer_checkpoint_to_diffusers``. The converter only ever sees one
dequantized tensor without prefix: the input it handles correctly. Given a whole ComfyUI file it fails
on the prefix, crashes on ``qkv.weight_scale`` and silently drops the other scales (research/flux2.md §5).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .presets import PRESETS, ModelPreset
from .span import span_modules
from .tensorfiles import FileHashes, ModelError, TensorInfo, open_safetensors, read_header, read_json, require_safetensors

#: Prefixes single files put before the transformer's names (ComfyUI; some other exporters).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
#: Suffixes of a weight's dequantization scale (both spellings exist in the wild).
SCALE_SUFFIXES = ("weight_scale", "scale_weight")
#: ComfyUI's per-layer quantisation record: a uint8 tensor holding JSON such as {"format": "float8_e4m3fn"}.
QUANT_RECORD_SUFFIX = "comfy_quant"
#: Activation scales for native fp8 matmuls. meshd dequantizes the weights and computes in bf16/fp16,
#: where an input scale has no meaning, so these are never read.
UNUSED_SUFFIXES = ("input_scale",)
#: Whole-file markers (ComfyUI's legacy scaled-fp8 flag), not weights.
MARKER_KEYS = ("scaled_fp8",)
#: Suffixes of quantisation schemes meshd does not dequantize (NVFP4's second scale, GGUF-style blocks).
UNSUPPORTED_SUFFIXES = ("weight_scale_2", "qweight", "absmax")

FLOAT_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
FP8_DTYPES = {"F8_E4M3": "fp8 e4m3", "F8_E5M2": "fp8 e5m2"}

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
    scale: TensorInfo | None = None  # per-tensor (or per-row) dequantization scale
    record: TensorInfo | None = None  # ComfyUI's quantisation record

    @property
    def kind(self) -> str:
        """bf16, fp16, fp32, "fp8 e4m3", "fp8 e4m3 scaled"..."""
        base = FLOAT_DTYPES.get(self.info.dtype) or FP8_DTYPES.get(self.info.dtype, self.info.dtype)
        return f"{base} scaled" if self.scale else base


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
        self.tensors_read = 0  # every tensor fetched from disk (weights, scales, records); tests count these
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
                path = (transformer / file).resolve()
                if path.parent != transformer.resolve():
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
        """A single-file checkpoint (BFL or ComfyUI, any precision); its preset is read from its shapes."""
        header, metadata = read_header(path)
        return cls._build(path, [path], header, metadata, None, folder=False)

    @classmethod
    def _build(cls, path: Path, files: list[Path], header: dict[str, TensorInfo], metadata: dict[str, str],
               preset: ModelPreset | None, folder: bool) -> Checkpoint:
        prefix, naming = _detect_layout(path, header)
        _check_quantisation_metadata(path, metadata)
        local = {k[len(prefix):]: info for k, info in header.items() if k.startswith(prefix)}
        stored = _index_weights(path, local)
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

    # --- reading ------------------------------------------------------------------------------

    def read(self, names: Iterable[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Exactly the tensors ``names`` (diffusers names) as ``dtype`` on ``device``; nothing else is read."""
        wanted: dict[str, list[str]] = {}
        for name in names:
            source = self._sources.get(name)
            if source is None:
                raise ModelError(f"{self.path} has no tensor {name}")
            wanted.setdefault(source, []).append(name)
        out: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}

            def fetch(info: TensorInfo) -> torch.Tensor:
                if info.file not in handles:
                    handles[info.file] = stack.enter_context(open_safetensors(info.file))
                tensor = handles[info.file].get_tensor(info.key)
                with self._lock:
                    self.tensors_read += 1
                return tensor

            for source, targets in wanted.items():
                value = _dequantize(self._stored[source], fetch)
                converted = {source: value} if self.naming == "diffusers" else bfl_to_diffusers(source, value)
                for name in targets:  # shapes were checked against the preset when the header was read
                    tensor = converted[name]
                    cast = dtype if tensor.dtype.is_floating_point else tensor.dtype
                    out[name] = tensor.to(device=device, dtype=cast)
        return out

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
    """(prefix, naming) of a checkpoint: naming is "bfl" or "diffusers"."""
    if any(".lora_" in k or k.startswith("lora_") or k.endswith(".alpha") for k in header):
        raise ModelError(f"{path} is a LoRA, not a model: put it in a LoRA folder (lora_dir) and name it in the "
                         "generation request")
    for prefix in PREFIXES:
        for naming, markers in (("bfl", ("double_blocks.", "single_blocks.")),
                                ("diffusers", ("transformer_blocks.", "single_transformer_blocks."))):
            if any(k.startswith(prefix + m) for k in header for m in markers):
                return prefix, naming
    example = next(iter(header), "no tensors at all")
    raise ModelError(f"{path} holds no FLUX.2 transformer blocks (e.g. {example}); is it a VAE, a text encoder, "
                     "or another model?")


def _index_weights(path: Path, local: dict[str, TensorInfo]) -> dict[str, StoredTensor]:
    """The weights among ``local`` tensors, each with its scale and quantisation record."""
    stored = {}
    for name, info in local.items():
        leaf = name.rsplit(".", 1)[-1]
        if name in MARKER_KEYS or leaf in SCALE_SUFFIXES or leaf in UNUSED_SUFFIXES or leaf == QUANT_RECORD_SUFFIX:
            continue
        if leaf in UNSUPPORTED_SUFFIXES:
            raise ModelError(f"{path} uses a quantisation meshd cannot dequantize ({name}); use a bf16, fp8 or "
                             "scaled-fp8 checkpoint")
        module = name.rsplit(".", 1)[0]
        scale = next((local[f"{module}.{s}"] for s in SCALE_SUFFIXES if leaf == "weight" and f"{module}.{s}" in local),
                     None)
        record = local.get(f"{module}.{QUANT_RECORD_SUFFIX}") if leaf == "weight" else None
        if info.dtype not in FLOAT_DTYPES and info.dtype not in FP8_DTYPES:
            raise ModelError(f"{path}: {name} is stored as {info.dtype}, a quantisation meshd cannot dequantize; "
                             "use a bf16, fp8 or scaled-fp8 checkpoint")
        stored[name] = StoredTensor(info, scale, record)
    return stored


def _check_quantisation_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Refuse files whose header declares a quantisation other than fp8 (NVFP4, MXFP4, int8...)."""
    raw = metadata.get("_quantization_metadata")
    if not raw:
        return
    try:
        layers = json.loads(raw).get("layers", {})
    except (ValueError, AttributeError):
        raise ModelError(f"{path} has unreadable _quantization_metadata") from None
    formats = {str(v.get("format", "")) for v in layers.values() if isinstance(v, dict)}
    bad = sorted(f for f in formats if f and "float8" not in f and "fp8" not in f)
    if bad:
        raise ModelError(f"{path} is quantised as {', '.join(bad)}; meshd dequantizes only fp8 and scaled fp8")


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


def _dequantize(weight: StoredTensor, fetch) -> torch.Tensor:
    """The stored tensor as numbers: fp8 times its scale where it has one, in float32; others as stored."""
    value = fetch(weight.info)
    if weight.record is not None:
        record = fetch(weight.record)
        try:
            fmt = json.loads(bytes(record.to(torch.uint8).tolist()).decode()).get("format", "")
        except (ValueError, AttributeError):
            raise ModelError(f"{weight.info.file}: {weight.record.key} is not a readable quantisation record") from None
        if "float8" not in fmt and "fp8" not in fmt:
            raise ModelError(f"{weight.info.file}: {weight.info.key} is quantised as {fmt!r}; meshd dequantizes only "
                             "fp8 and scaled fp8")
    if weight.scale is None:
        return value.float() if weight.info.dtype in FP8_DTYPES else value
    scale = fetch(weight.scale).float()
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif value.ndim == 2 and scale.numel() == value.shape[0]:
        scale = scale.reshape(-1, 1)  # one scale per output row
    else:
        raise ModelError(f"{weight.info.file}: scale {weight.scale.key} has shape {tuple(scale.shape)}, neither "
                         f"per-tensor nor per-row for weight {tuple(value.shape)}")
    return value.float() * scale
