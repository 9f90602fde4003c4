"""A ComfyUI install as a user has it, built from the tiny model's weights: real safetensors files whose
names, dtypes, scales and quantisation records follow ComfyUI's published files, laid out as ComfyUI
lays them out. No diffusers folder (no config.json, no model_index.json) anywhere in it.

    ComfyUI/
      comfy/text_encoders/qwen25_tokenizer/   vocab.json, merges.txt, tokenizer_config.json (Qwen2Tokenizer,
                                              Qwen2.5's chat template, as ComfyUI ships it)
      models/diffusion_models/flux2-tiny.safetensors        model.diffusion_model. + BFL names, bf16
      models/diffusion_models/fp8/flux2-tiny-fp8mixed.safetensors   blocks fp8 scaled, the rest bf16
      models/vae/flux2-vae.safetensors                       BFL's autoencoder names, bf16
      models/text_encoders/qwen_3_tiny.safetensors           model.* (no lm_head), bf16, 5 layers
      models/text_encoders/qwen_3_tiny_fp8mixed.safetensors  linears fp8 + weight_scale + comfy_quant + input_scale
      models/loras/style.safetensors                         a kohya LoRA

The tokenizer is a byte-level BPE like Qwen's (same file format, a vocabulary of 256 bytes and a few
merges); the small Qwen3 has the released Qwen3 constants (RoPE theta 1e6, eps 1e-6) that meshd
pins for files, so a model built by transformers from the same weights is the reference.

Mistral's tokenizer as ComfyUI embeds it (``tekken_model``) is a tekken.json in the released format: the
real Tekken v7 pre-tokeniser pattern and Mistral Small 3's first 20 control tokens at their ranks, a byte
vocabulary of all 256 bytes and a few merged tokens. :func:`tekken_encode` is a reference encoder written
from the format (tiktoken's rank-ordered merging), independent of the transformers converter meshd uses:
mistral_common is not installed here, so it stands in for ``Tekkenizer``.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import regex

import torch
from safetensors.torch import load_file, save_file
from transformers import MistralConfig, MistralModel, Qwen3Config, Qwen3ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from meshd.model.tiny import write_tiny
from tests.test_checkpoints import to_bfl, write_single

FP8_MAX = 448.0
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "a"), ("d", "o"), ("do", "g"), ("Ġ", "dog"), ("s", "e"), ("Ġ", "se")]
#: Qwen2.5's template as ComfyUI's qwen25_tokenizer carries it (a default system turn when none is given).
QWEN25_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
                   "{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TRANSFORMER = "diffusion_models/flux2-tiny"


def write_qwen_tokenizer(folder: Path) -> None:
    """A Qwen2Tokenizer folder in ComfyUI's format: vocab.json + merges.txt + tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    added = {str(len(vocab) + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True} for i, t in enumerate(SPECIAL)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "model_max_length": 131072,
        "added_tokens_decoder": added, "chat_template": QWEN25_TEMPLATE}))


def small_qwen3(layers: int = 5) -> Qwen3ForCausalLM:
    """A test-sized Qwen3 (width 16, as the tiny model's 3 x 16 = 48 text width needs) with Qwen3's constants."""
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, vocab_size=300, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).eval()


def comfy_text_encoder(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The language model's tensors as ComfyUI's text-encoder files hold them: ``model.*``, no lm_head, bf16."""
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
            if k.startswith("model.")}


def quant_record(fmt: str = "float8_e4m3fn") -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def fp8mixed(state: dict[str, torch.Tensor], keep_bf16: tuple[str, ...] = ("model.layers.0.mlp.",),
             per_row: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's fp8mixed: each linear weight e4m3 with a float32 ``weight_scale`` (one per tensor, or per
    output row as ``(rows, 1)``), a ``comfy_quant`` record and an ``input_scale``; norms, embeddings and the
    ``keep_bf16`` layers stay bf16. Returns (stored, the values meshd must read back)."""
    stored, expected = {}, {}
    for key, value in state.items():
        module = key.removesuffix(".weight")
        linear = key.endswith("_proj.weight") and value.ndim == 2 and not key.startswith(keep_bf16)
        if not linear:
            stored[key] = expected[key] = value
            continue
        amax = value.float().abs().amax(dim=1, keepdim=True) if per_row else value.float().abs().max().reshape(())
        scale = amax / FP8_MAX
        q = (value.float() / scale).to(torch.float8_e4m3fn)
        stored.update({key: q, f"{module}.weight_scale": scale, f"{module}.input_scale": torch.tensor(1.0),
                       f"{module}.comfy_quant": quant_record()})
        expected[key] = (q.float() * scale).to(torch.bfloat16)
    return stored, expected


_BLOCK = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def to_bfl_vae(state: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKLFlux2 state dict in BFL's names (the inverse of diffusers' conversion script):
    decoder blocks numbered in reverse, attention projections as 1x1 convolutions."""
    out = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue  # BFL's file has no counter
        module, leaf = name.rsplit(".", 1)
        new = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
               "quant_conv": "encoder.quant_conv", "post_quant_conv": "decoder.post_quant_conv"}.get(module, module)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_BLOCK.get(m[3], m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            new = f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_BLOCK.get(m[3], m[3])}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_BLOCK.get(m[3], m[3])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv"
        out[f"{new}.{leaf}"] = value.contiguous()
    return out


def kohya_lora(path: Path) -> None:
    torch.manual_seed(1)
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 64),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(576, 2) * 0.01,
               "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0)}, str(path))


def write_comfyui(root: Path, scratch: Path) -> dict:
    """The ComfyUI install above at ``root`` (``scratch`` holds the tiny diffusers folder it is made from,
    outside the install). Returns the reference parts: the diffusers folder and the Qwen3 model."""
    tiny = write_tiny(scratch / "tiny")
    models = root / "models"
    for sub in ("diffusion_models/fp8", "vae", "text_encoders", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    bfl = to_bfl(load_file(str(tiny / "transformer" / "diffusion_pytorch_model.safetensors")))
    write_single(models / "diffusion_models" / "flux2-tiny.safetensors", bfl, "model.diffusion_model.")
    write_single(models / "diffusion_models" / "fp8" / "flux2-tiny-fp8mixed.safetensors", bfl,
                 "model.diffusion_model.", "mixed")
    vae = load_file(str(tiny / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file(to_bfl_vae(vae, num_up=2), str(models / "vae" / "flux2-vae.safetensors"))
    qwen = small_qwen3()
    state = comfy_text_encoder(qwen)
    save_file(state, str(models / "text_encoders" / "qwen_3_tiny.safetensors"))
    stored, dequantised = fp8mixed(state)
    save_file(stored, str(models / "text_encoders" / "qwen_3_tiny_fp8mixed.safetensors"))
    kohya_lora(models / "loras" / "style.safetensors")
    write_qwen_tokenizer(root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    return {"diffusers": tiny, "qwen3": qwen, "fp8_values": dequantised}


#: Mistral Small 3's control tokens, ranks 0-19 (tekken.json ``special_tokens``; the rest are fillers).
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
#: Tekken v7's pre-tokeniser (mistral_common ``tekken.json`` ``config.pattern``).
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?"
                  r"[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Merged tokens after the 256 bytes, each the concatenation of two earlier ones (as BPE training makes them).
TEKKEN_MERGES = [b"th", b"the", b" d", b" do", b" dog", b"ea", b" s", b" se", b" sea", b"in", b" a", b"re",
                 b"on", b"at", b" b", b" by", b"ou", b" t", b" th", b" the", b"es", b"ing"]
NUM_SPECIAL = 24  # 20 named + 4 fillers, as the real file pads its 1000 control slots


def tekken_json(specials: list[str] = MISTRAL_SPECIALS) -> bytes:
    """A tekken.json (format of mistral_common's v7 files): config, byte vocabulary by rank, control tokens."""
    vocab = [bytes([b]) for b in range(256)] + TEKKEN_MERGES
    return json.dumps({
        "config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": NUM_SPECIAL + len(vocab),
                   "default_vocab_size": NUM_SPECIAL + len(vocab), "default_num_special_tokens": NUM_SPECIAL,
                   "version": "v7"},
        "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": None}
                  for r, t in enumerate(vocab)],
        "special_tokens": [{"rank": r, "token_str": t, "is_control": True} for r, t in enumerate(specials)],
    }).encode()


def tekken_encode(data: bytes, text: str) -> list[int]:
    """Token ids of plain ``text`` (no control tokens) under the tekken.json ``data``: the pattern splits it,
    then each piece's bytes merge pairwise, lowest rank of the merged bytes first (tiktoken's algorithm)."""
    doc = json.loads(data)
    num_special = doc["config"]["default_num_special_tokens"]
    ranks = {base64.b64decode(v["token_bytes"]): v["rank"] for v in doc["vocab"]}
    ids = []
    for piece in regex.findall(doc["config"]["pattern"], text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            merged = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            best = min(((r, i) for r, i in merged if r is not None), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [num_special + ranks[p] for p in parts]
    return ids


def flux2_prompt_ids(data: bytes, system: str, prompt: str, length: int) -> list[int]:
    """What FLUX.2's dev pipeline feeds Mistral: ``<s>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][INST]prompt[/INST]``
    (control tokens by rank), cut to ``length`` and padded on the left with ``<pad>``. A control token's text
    inside the prompt is that control token, as the pipeline's tokenizer and ComfyUI's both read it."""
    special = {t: r for r, t in enumerate(MISTRAL_SPECIALS)}
    split = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")
    text = [special[part] if part in special else tekken_encode(data, part) for part in split.split(prompt) if part]
    ids = ([special["<s>"], special["[SYSTEM_PROMPT]"]] + tekken_encode(data, system)
           + [special["[/SYSTEM_PROMPT]"], special["[INST]"]]
           + [i for part in text for i in ([part] if isinstance(part, int) else part)] + [special["[/INST]"]])
    ids = ids[:length]
    return [special["<pad>"]] * (length - len(ids)) + ids


def small_mistral(layers: int = 5) -> MistralModel:
    """A test-sized Mistral Small 3 (width 16, head size 128 as meshd pins for the family) over the tekken
    vocabulary above."""
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=1,
                           num_key_value_heads=1, head_dim=128, vocab_size=NUM_SPECIAL + 256 + len(TEKKEN_MERGES),
                           rope_theta=1e9, rms_norm_eps=1e-5, max_position_embeddings=131072)
    model = MistralModel(config).eval()
    inv_freq = model.rotary_emb.inv_freq.clone()  # stays float32, as from_pretrained(dtype=bf16) keeps it
    model = model.to(torch.bfloat16)
    model.rotary_emb.inv_freq = inv_freq
    return model


def comfy_mistral(model: MistralModel, keep: int, tekken: bytes | None) -> dict[str, torch.Tensor]:
    """ComfyUI's pruned Mistral file: ``model.*`` of the first ``keep`` layers, no final norm, the tokenizer
    as a ``tekken_model`` uint8 tensor."""
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith("norm.") and not (k.startswith("layers.") and int(k.split(".")[1]) >= keep)}
    if tekken is not None:
        state["tekken_model"] = torch.frombuffer(bytearray(tekken), dtype=torch.uint8)
    return state
