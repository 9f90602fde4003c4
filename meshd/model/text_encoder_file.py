"""FLUX.2's text encoders from the single files ComfyUI ships, built with only the layers FLUX.2 reads.

ComfyUI's text-encoder files hold a language model's decoder stack in transformers' names without the
vision tower or the LM head (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
``model.norm.weight``): Qwen3 4B/8B for klein (``qwen_3_4b.safetensors``, ``qwen_3_8b_fp8mixed``),
Mistral Small 3 for dev (``mistral_3_small_flux2_bf16`` / ``_fp8``: 30 of its 40 layers, no final norm,
the ``tekken_model`` tokenizer inside, read by :mod:`.tekken`). Precisions: bf16, fp8 (e4m3 with a
``weight_scale`` per layer declared by a ``comfy_quant`` record or the header's ``_quantization_metadata``)
and fp8mixed (some layers bf16). fp8 linear layers stay fp8 in memory as :class:`.precision.Fp8Linear`
(a native fp8 matmul on GPUs with fp8 tensor cores, the layer dequantised just before its matmul
elsewhere), so the 27 layers of Qwen3-8B read take about 6.5 GB in fp8 instead of 11.7; fp8 tensors that are not linear
weights (an embedding, a norm) are dequantised when read. ``input_scale`` / ``scale_input`` are static
activation scales that meshd does not use (it scales activations per token); a ``weight_scale`` beside a
layer that is not declared quantised is ignored, as ComfyUI ignores it.

What FLUX.2 reads decides what is built: klein stacks Qwen3's hidden states 9, 18 and 27, dev
Mistral's 10, 20 and 30, so the model is built with ``max(layers)`` decoder layers and nothing after
them is read from the file (Qwen3-8B: 27 of 36 layers, 11.7 instead of 16.4 GB in bf16). Hidden state
``k`` is layer ``k``'s raw output except for the model's very last one, which transformers reports
after the final norm. FLUX.2 reads no released encoder's last layer (27 of Qwen3's 36, 30 of Mistral
Small 3's 40; ComfyUI's pruned Mistral file ends at layer 30 but the model it was cut from does not),
so the built model never applies the final norm, and the embeddings are exactly those of the full
model (``tests/test_text_encoder.py``).

Width, depth, heads and vocabulary come from the tensor shapes. What shapes cannot tell (RoPE theta,
norm epsilon, Mistral's head size) is each family's released value (Qwen3-4B/8B ``config.json``;
FLUX.2-dev's ``text_encoder/config.json``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import (FLOAT_DTYPES, FP8_DTYPES, QUANT_FORMATS, QUANT_RECORD_SUFFIX, SCALE_SUFFIXES, UNUSED_SUFFIXES,
                          StoredTensor, declared_formats, fp8_scale, fp8_weight, layer_scale)
from .dequant import dequantise_fp8
from .precision import LinearFormat, quantised_layers
from .presets import ModelPreset
from .tekken import TEKKEN_KEY, check_tekken_header, check_tokenizer_folder, read_tekken, tekken_tokenizer
from .tensorfiles import ModelError, TensorInfo, file_stamp, open_safetensors, read_header

#: What the shapes cannot tell, per family (the released configs).
FAMILY_CONSTANTS = {
    "qwen3": {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960},
    "mistral3": {"rope_theta": 1_000_000_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                 "head_dim": 128},
}
#: The released encoders by (family, width): their name and depth (to tell a pruned file).
RELEASED = {("qwen3", 2560): ("Qwen3-4B", 36), ("qwen3", 4096): ("Qwen3-8B", 36),
            ("mistral3", 5120): ("Mistral Small 3", 40)}
IGNORED_SUFFIXES = (*UNUSED_SUFFIXES, QUANT_RECORD_SUFFIX)
#: Tensors in a text-encoder file that are not weights: the tokenizer blob, ComfyUI's legacy marker.
NON_WEIGHTS = (TEKKEN_KEY, "spiece_model", "tokenizer_json", "scaled_fp8")
#: Qwen3's chat template as it renders FLUX.2's prompt (one user turn, generation prompt, thinking off);
#: ComfyUI's tokenizer folder carries Qwen2.5's template, which would add a system turn.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@dataclass(frozen=True)
class EncoderFile:
    """A Qwen3 or Mistral text-encoder single file, indexed from its header."""

    path: Path
    family: str  # "qwen3" or "mistral3" (the presets' text_encoder value)
    config: dict  # shape-derived config fields
    num_layers: int
    weights: dict[str, TensorInfo]  # name inside the encoder (``model.*``) -> weight (``.key``: the file's name)
    #: name of an fp8 weight -> it as stored: its declared scale (None: raw fp8), per tensor or per row
    fp8: dict[str, StoredTensor] = field(default_factory=dict)
    tekken: TensorInfo | None = None  # Mistral's tokenizer inside the file
    has_norm: bool = True

    @classmethod
    def open(cls, path: Path) -> EncoderFile:
        """Index a text-encoder file (header only, remembered while the file is unchanged)."""
        return _open_encoder(Path(path), file_stamp(path))

    @classmethod
    def _index(cls, path: Path) -> EncoderFile:
        stored, metadata = read_header(path)
        prefix = encoder_prefix(stored)
        # From here on tensors go by their names inside the encoder; each TensorInfo keeps the file's key.
        header = {k[len(prefix):]: info for k, info in stored.items() if k.startswith(prefix)}
        if "model.embed_tokens.weight" not in header or "model.layers.0.self_attn.q_proj.weight" not in header:
            raise ModelError(f"{path} is not a text encoder ComfyUI ships (no model.embed_tokens / model.layers.0)")
        family = "qwen3" if "model.layers.0.self_attn.q_norm.weight" in header else "mistral3"
        declared = _declared_layers(path, header, metadata, prefix)
        tekken = header.get(TEKKEN_KEY, stored.get(TEKKEN_KEY))
        if tekken is not None:
            check_tekken_header(path, tekken)
        weights, fp8 = {}, {}
        for key, info in header.items():
            leaf = key.rsplit(".", 1)[-1]
            if key in NON_WEIGHTS or leaf in SCALE_SUFFIXES or leaf in IGNORED_SUFFIXES:
                continue
            if info.dtype not in FLOAT_DTYPES and info.dtype not in FP8_DTYPES:
                raise ModelError(f"{path}: {key} is stored as {info.dtype}; meshd reads text encoders in bf16, "
                                 "fp16, fp32 or fp8")
            weights[key] = info
            if info.dtype in FP8_DTYPES:
                module = key.rsplit(".", 1)[0]
                scale = layer_scale(header, module) if leaf == "weight" and module in declared else None
                fp8[key] = fp8_weight(path, info, scale)  # the transformer checkpoints' rule: layout checked here
        layers = {int(m[1]) for k in weights if (m := re.match(r"model\.layers\.(\d+)\.", k))}
        count = max(layers, default=-1) + 1
        if sorted(layers) != list(range(count)):
            raise ModelError(f"{path} lacks layers {sorted(set(range(count)) - layers)[:3]} of its {count}")
        vocab, hidden = header["model.embed_tokens.weight"].shape
        q_rows = header["model.layers.0.self_attn.q_proj.weight"].shape[0]
        k_rows = header["model.layers.0.self_attn.k_proj.weight"].shape[0]
        head_dim = (header["model.layers.0.self_attn.q_norm.weight"].shape[0] if family == "qwen3"
                    else FAMILY_CONSTANTS["mistral3"]["head_dim"])
        if q_rows % head_dim or k_rows % head_dim:
            raise ModelError(f"{path}: attention of {q_rows}/{k_rows} rows does not divide into heads of {head_dim}")
        config = {"vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": q_rows // head_dim,
                  "num_key_value_heads": k_rows // head_dim, "head_dim": head_dim,
                  "intermediate_size": header["model.layers.0.mlp.gate_proj.weight"].shape[0]}
        return cls(path, family, config, count, weights, fp8, tekken=tekken,
                   has_norm="model.norm.weight" in header)

    # --- what it is -----------------------------------------------------------------------------

    @property
    def embedded_tokenizer(self) -> bool:
        return self.tekken is not None

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def quantised(self) -> bool:
        return any(i.dtype in FP8_DTYPES for i in self.weights.values())

    @property
    def precision(self) -> str:
        """"bf16", "fp8 e4m3" or "fp8 e4m3 scaled 180, bf16 20" (weights by how they are stored)."""
        counts: dict[str, int] = {}
        for key, info in self.weights.items():
            kind = FLOAT_DTYPES.get(info.dtype) or FP8_DTYPES[info.dtype]
            kind += " scaled" if key in self.fp8 and self.fp8[key].scale is not None else ""
            counts[kind] = counts.get(kind, 0) + 1
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])
        return ordered[0][0] if len(ordered) == 1 else ", ".join(f"{k} {n}" for k, n in ordered)

    @property
    def pruned(self) -> bool:
        """Cut short of its model (ComfyUI's 30-layer Mistral): no final norm, or fewer layers than released."""
        return not self.has_norm or self.num_layers < RELEASED.get((self.family, self.hidden), ("", 0))[1]

    def describe(self) -> str:
        family = {"qwen3": "Qwen3", "mistral3": "Mistral"}[self.family]
        name = RELEASED.get((self.family, self.hidden), (family, 0))[0]
        pruned = ", pruned" if self.pruned else ""
        tokenizer = f", tokenizer inside ({TEKKEN_KEY})" if self.tekken is not None else ""
        return (f"{name} text encoder, width {self.hidden}, {self.num_layers} layers{pruned}, {self.precision}"
                f"{tokenizer}")

    def mismatch(self, preset: ModelPreset) -> str:
        """Why ``preset`` cannot use this encoder ("" when it can)."""
        layers, joint = preset.text_encoder_layers, int(preset.transformer["joint_attention_dim"])
        if preset.text_encoder in ("qwen3", "mistral3") and self.family != preset.text_encoder:
            return f"it is a {self.family} model; {preset.name} needs {preset.text_encoder}"
        if self.hidden * len(layers) != joint:
            return (f"it has width {self.hidden}; {preset.name} needs {len(layers)} x {joint // len(layers)} = {joint}"
                    " (the wrong size of model?)")
        if self.num_layers < max(layers):
            return f"it has {self.num_layers} layers; {preset.name} reads layer {max(layers)}"
        return ""

    def fits(self, preset: ModelPreset) -> bool:
        return not self.mismatch(preset)

    # --- loading --------------------------------------------------------------------------------

    def load(self, preset: ModelPreset, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The decoder stack up to the last layer ``preset`` reads, on ``device``: fp8 linear layers as
        :class:`.precision.Fp8Linear` (their weights as stored), everything else in ``dtype``. The layers
        after the last one read are never read from the file."""
        problem = self.mismatch(preset)
        if problem:
            raise ModelError(f"{self.path} cannot encode prompts for {preset.name}: {problem}")
        model = self._build(max(preset.text_encoder_layers))
        if self.pruned or max(preset.text_encoder_layers) < self.num_layers:
            # See the module docstring: a released encoder's last layer read is never its last, so the full
            # model's hidden state there has no final norm. A file whose own last layer is read (no
            # released one) keeps it, as transformers applies it to the last hidden state.
            model.norm = torch.nn.Identity()
        formats = self._fp8_linears(model)
        quantised_layers(model, formats, device)
        state = {}
        with open_safetensors(self.path) as f:
            for name in model.state_dict(keep_vars=True):
                module, _, leaf = name.rpartition(".")
                if leaf == "weight_scale" and module in formats:
                    continue  # read with its weight
                key = f"model.{name}"
                info = self.weights.get(key)
                if info is None:
                    raise ModelError(f"{self.path} lacks {key}")
                value = f.get_tensor(info.key)
                stored = self.fp8.get(key)
                if stored is None:
                    state[name] = value.to(device=device, dtype=dtype)
                    continue
                scale = fp8_scale(f.get_tensor(stored.scale.key) if stored.scale is not None else None,
                                  stored.format.per_row).to(device)
                if module in formats:  # kept fp8: the stored values and a float32 scale of the layer's shape
                    state[name] = value.to(device)
                    state[f"{module}.weight_scale"] = scale
                else:  # an fp8 tensor that is not a linear weight (an embedding, a norm): its numbers in dtype
                    state[name] = dequantise_fp8(value.to(device), scale, dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary_emb = type(model.rotary_emb)(model.config).to(device)  # its buffer is computed, not stored
        return model.eval().requires_grad_(False)

    def _fp8_linears(self, model: torch.nn.Module) -> dict[str, LinearFormat]:
        """The built model's bias-free linear layers whose weights the file stores in fp8, by module name, each
        held as stored (per-row when its scale has one value per output row)."""
        return {name: self.fp8[f"model.{name}.weight"].format for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and module.bias is None and f"model.{name}.weight" in self.fp8}

    def _build(self, layers: int) -> torch.nn.Module:
        import transformers  # noqa: PLC0415

        constants = dict(FAMILY_CONSTANTS[self.family])
        constants.pop("head_dim", None)
        config_class, model_class = (("Qwen3Config", "Qwen3Model") if self.family == "qwen3"
                                     else ("MistralConfig", "MistralModel"))
        config = getattr(transformers, config_class)(**self.config, **constants, num_hidden_layers=layers,
                                                     tie_word_embeddings=False, attention_bias=False)
        with torch.device("meta"):
            return getattr(transformers, model_class)(config)

    def tokenizer(self, folder: Path | None, hint: str):
        """The tokenizer for this encoder: from ``folder`` (a diffusers ``tokenizer/`` or ComfyUI's Qwen
        folder), else the one inside the file (Mistral's tekken), or a ModelError that says which files to put
        where."""
        import transformers  # noqa: PLC0415

        if folder is None:
            if self.tekken is not None:
                return tekken_tokenizer(read_tekken(self.path, self.tekken), f"{self.path}'s {TEKKEN_KEY}")
            raise ModelError(hint or f"{self.path} has no tokenizer")
        check_tokenizer_folder(folder)
        try:
            if self.family == "mistral3":
                return transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load the tokenizer from {folder}: {exc}") from exc
        if "enable_thinking" not in str(tok.chat_template or ""):  # ComfyUI's folder: Qwen2.5's template
            tok.chat_template = QWEN3_CHAT_TEMPLATE
        return tok


@functools.lru_cache(maxsize=64)
def _open_encoder(path: Path, stamp: tuple) -> EncoderFile:
    return EncoderFile._index(path)


def encoder_prefix(header: dict) -> str:
    """What a file puts before the encoder's ``model.*`` names: nothing in a text-encoder file, and
    ``text_encoders.<name>.transformer.`` in a ComfyUI all-in-one checkpoint (``supported_models.Flux2``'s
    ``text_encoder_key_prefix``; ``<name>`` is ``qwen3_4b``, ``qwen3_8b`` or ``mistral3_24b``)."""
    if "model.embed_tokens.weight" in header:
        return ""
    pattern = re.compile(r"(text_encoders\.[^.]+\.transformer\.)model\.embed_tokens\.weight")
    found = sorted({m[1] for k in header if (m := pattern.fullmatch(k))})
    return found[0] if len(found) == 1 else ""


def _declared_layers(path: Path, header: dict[str, TensorInfo], metadata: dict[str, str], prefix: str = "") -> set[str]:
    """The modules a file declares quantised, by their names inside the encoder (``header`` without ``prefix``):
    the transformer checkpoints' rule (:func:`.checkpoints.declared_formats`: only the encoder's own entries of
    an all-in-one file's ``_quantization_metadata``), and with the legacy ``scaled_fp8`` marker every scaled
    layer; refuses formats other than fp8."""
    formats = declared_formats(path, header, metadata, prefix)
    declared = set(formats)
    if "scaled_fp8" in header:
        declared |= {k.rsplit(".", 1)[0] for k in header if k.endswith(SCALE_SUFFIXES)}
    bad = sorted({f for f in formats.values() if f not in QUANT_FORMATS})
    if bad:
        raise ModelError(f"{path} is quantised as {', '.join(bad)}; meshd reads text encoders in bf16 or fp8 "
                         "(e4m3fn / e5m2 with per-tensor or per-row scales)")
    return declared
