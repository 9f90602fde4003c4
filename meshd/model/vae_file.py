"""FLUX.2's VAE from the single file ComfyUI and BFL ship (``flux2-vae.safetensors``), in BFL's names.

BFL's autoencoder uses the original latent-diffusion names (``encoder.down.0.block.1.norm1``,
``decoder.up.3.upsample.conv``, ``mid.attn_1.q`` as 1x1 convolutions, ``encoder.quant_conv``,
``bn.running_mean``); diffusers' ``AutoencoderKLFlux2`` has its own. The renaming below is the one
diffusers' ``scripts/convert_flux2_to_diffusers.py`` applies (decoder blocks are numbered in reverse;
attention weights drop their 1x1 kernel dims), written name by name so every tensor of the file is
accounted for: the file must map onto exactly the tensors, and shapes, of a preset's VAE config, or it
is refused naming the first difference. A VAE already in diffusers names loads the same way.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .presets import PRESETS, ModelPreset
from .checkpoints import FLOAT_DTYPES as FLOAT_CODES
from .tensorfiles import ModelError, TensorInfo, file_stamp, open_safetensors, read_header

#: Prefixes VAE single files put before the autoencoder's names (ComfyUI full checkpoints; some exporters).
PREFIXES = ("first_stage_model.", "vae.", "")
_DIRECT = {
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    "encoder.quant_conv": "quant_conv",
    "decoder.post_quant_conv": "post_quant_conv",
}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def bfl_vae_name(key: str, num_up_blocks: int) -> str:
    """The diffusers name of one BFL-named VAE tensor (a name already in diffusers form is returned as is)."""
    module, _, leaf = key.rpartition(".")
    if module in _DIRECT:
        return f"{_DIRECT[module]}.{leaf}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d+)\.(.+)", module):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet(m[3])}.{leaf}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)", module):
        return f"{m[1]}.mid_block.attentions.0.{_ATTENTION.get(m[2], m[2])}.{leaf}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", module):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet(m[3])}.{leaf}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv", module):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{leaf}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", module):
        return f"decoder.up_blocks.{num_up_blocks - 1 - int(m[1])}.resnets.{m[2]}.{_resnet(m[3])}.{leaf}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv", module):
        return f"decoder.up_blocks.{num_up_blocks - 1 - int(m[1])}.upsamplers.0.conv.{leaf}"
    return key


def _resnet(inner: str) -> str:
    return "conv_shortcut" if inner == "nin_shortcut" else inner


@functools.lru_cache(maxsize=None)
def _vae_shapes(preset_name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

    with torch.device("meta"):
        vae = AutoencoderKLFlux2(**PRESETS[preset_name].vae)
    return tuple((name, tuple(t.shape)) for name, t in vae.state_dict().items())


def vae_shapes(preset: ModelPreset) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``preset``'s VAE by diffusers name, with its shape."""
    return dict(_vae_shapes(preset.name))


@dataclass(frozen=True)
class VaeFile:
    """A FLUX.2 VAE single file: its header indexed, each tensor traced to its diffusers name."""

    path: Path
    sources: dict[str, TensorInfo]  # diffusers name -> stored tensor
    dtypes: tuple[str, ...]

    @classmethod
    def open(cls, path: Path) -> VaeFile:
        """Index a VAE file (header only, remembered while the file is unchanged); a ModelError naming the
        file when it is not a VAE."""
        return _open_vae(Path(path), file_stamp(path))

    @classmethod
    def _index(cls, path: Path) -> VaeFile:
        header, _ = read_header(path)
        prefix = next((p for p in PREFIXES if f"{p}decoder.conv_in.weight" in header), None)
        if prefix is None:
            raise ModelError(f"{path} is not a VAE (no decoder.conv_in.weight)")
        ups = {int(m[1]) for k in header if (m := re.match(rf"{re.escape(prefix)}decoder\.up\.(\d+)\.", k))}
        num_up = max(ups, default=-1) + 1
        sources = {}
        for key, info in header.items():
            if not key.startswith(prefix):
                continue
            bad = info.dtype not in FLOAT_CODES and not key.endswith("num_batches_tracked")
            if bad:
                raise ModelError(f"{path}: VAE tensor {key} is stored as {info.dtype}; meshd reads VAEs in "
                                 "bf16, fp16 or fp32 only")
            sources[bfl_vae_name(key[len(prefix):], num_up)] = info
        return cls(path, sources, tuple(sorted({i.dtype for i in sources.values()})))

    @property
    def quantised(self) -> bool:
        return False  # a quantised VAE is refused when the file is opened

    def mismatch(self, preset: ModelPreset) -> str:
        """Why this file is not ``preset``'s VAE ("" when it is)."""
        expected = vae_shapes(preset)
        for name, shape in expected.items():
            info = self.sources.get(name)
            if info is None and not name.endswith("num_batches_tracked"):
                return f"it lacks {name}"
            if info is not None and _squeezed(name, info.shape) != shape:
                return f"{name} has shape {info.shape}, {preset.name}'s VAE has {shape}"
        extra = sorted(set(self.sources) - set(expected))
        return f"it holds {extra[0]}, which FLUX.2's VAE does not have" if extra else ""

    def fits(self, preset: ModelPreset) -> bool:
        return not self.mismatch(preset)

    def load(self, preset: ModelPreset, device: torch.device, dtype: torch.dtype):
        """``AutoencoderKLFlux2`` of ``preset``'s config, with this file's weights, on ``device``."""
        from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

        problem = self.mismatch(preset)
        if problem:
            raise ModelError(f"{self.path} is not the VAE of {preset.name}: {problem}")
        with torch.device("meta"):
            vae = AutoencoderKLFlux2(**preset.vae)
        state = {}
        with open_safetensors(self.path) as f:
            for name, shape in vae_shapes(preset).items():
                info = self.sources.get(name)
                if info is None:  # num_batches_tracked: a counter the VAE never reads in eval mode
                    state[name] = torch.zeros((), dtype=torch.long, device=device)
                    continue
                tensor = f.get_tensor(info.key).reshape(shape)  # 1x1 attention convs -> linear weights
                cast = dtype if tensor.dtype.is_floating_point else tensor.dtype
                state[name] = tensor.to(device=device, dtype=cast)
        vae.load_state_dict(state, strict=True, assign=True)
        return vae.eval()

    def describe(self) -> str:
        return f"FLUX.2 VAE, {'/'.join(FLOAT_CODES.get(d, d) for d in self.dtypes if d in FLOAT_CODES)}"


@functools.lru_cache(maxsize=64)
def _open_vae(path: Path, stamp: tuple) -> VaeFile:
    return VaeFile._index(path)


def _squeezed(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1x1-convolution attention weight as the linear weight diffusers keeps."""
    if ".attentions." in name and name.endswith("weight") and len(shape) > 2 and all(s == 1 for s in shape[2:]):
        return shape[:2]
    return shape
