"""The modules one peer hosts, and the FLUX.2 forward pass cut at arbitrary block boundaries.

Blocks are numbered in one flat order, double-stream blocks first: ``0 .. num_double - 1`` are
``transformer_blocks``, the rest ``single_transformer_blocks``. A peer holds any set of blocks plus,
when it is the head, the input side (embedders, timestep embedding, modulation) and, when it ends
the model, the output side (``norm_out``, ``proj_out``).

The arithmetic is diffusers' ``Flux2Transformer2DModel.forward`` step by step, on diffusers' own
block modules, so an all-local run and a split run compute the same bits; the tests compare with
diffusers directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Modulation,
    Flux2PosEmbed,
    Flux2SingleTransformerBlock,
    Flux2TimestepGuidanceEmbeddings,
    Flux2TransformerBlock,
)

from .presets import ModelPreset

HEAD_MODULES = (
    "time_guidance_embed",
    "double_stream_modulation_img",
    "double_stream_modulation_txt",
    "single_stream_modulation",
    "x_embedder",
    "context_embedder",
)
TAIL_MODULES = ("norm_out", "proj_out")


def block_prefix(preset: ModelPreset, index: int) -> str:
    """The state-dict prefix of flat block ``index`` (diffusers naming)."""
    if index < preset.num_double:
        return f"transformer_blocks.{index}."
    return f"single_transformer_blocks.{index - preset.num_double}."


@dataclass
class Stream:
    """The activations between two blocks: text and image streams, as a pair or joined (text first)."""

    txt_len: int
    pair: tuple[torch.Tensor, torch.Tensor] | None = None
    joint: torch.Tensor | None = None

    def as_joint(self) -> torch.Tensor:
        if self.joint is None:
            self.joint = torch.cat([self.pair[0], self.pair[1]], dim=1)
            self.pair = None
        return self.joint

    def as_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pair is None:
            j = self.joint
            self.pair = (j[:, : self.txt_len].contiguous(), j[:, self.txt_len :].contiguous())
            self.joint = None
        return self.pair


@dataclass
class Conditioning:
    """Per-step vectors every block needs: the timestep embedding and the shared modulations."""

    temb: torch.Tensor
    mod_img: torch.Tensor
    mod_txt: torch.Tensor
    mod_single: torch.Tensor

    NAMES = ("temb", "mod_img", "mod_txt", "mod_single")

    def tensors(self) -> list[torch.Tensor]:
        return [self.temb, self.mod_img, self.mod_txt, self.mod_single]


class SpanModel(torch.nn.Module):
    """The FLUX.2 pieces one peer hosts: some blocks, plus the head or tail modules if it has them."""

    def __init__(self, preset: ModelPreset, blocks: Iterable[int], head: bool, tail: bool) -> None:
        super().__init__()
        cfg = preset.transformer
        self.preset = preset
        dim = preset.hidden
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        mlp, eps = float(cfg["mlp_ratio"]), float(cfg["eps"])
        self.block_indices = tuple(sorted(set(blocks)))
        bad = [i for i in self.block_indices if not 0 <= i < preset.num_blocks]
        if bad:
            raise ValueError(f"blocks {bad} do not exist in {preset.name} ({preset.num_blocks} blocks)")
        self.has_head, self.has_tail = head, tail
        #: How a block is called: None runs it eagerly; a BlockCompiler's ``call`` runs the compiled graph
        #: of its class and shape (see compiled.py). Set by the owner, the same for every block.
        self.block_call = None
        self.pos_embed = Flux2PosEmbed(theta=int(cfg["rope_theta"]), axes_dim=list(cfg["axes_dims_rope"]))
        # ModuleDicts keyed by the diffusers index give diffusers' state-dict names.
        self.transformer_blocks = torch.nn.ModuleDict()
        self.single_transformer_blocks = torch.nn.ModuleDict()
        for i in self.block_indices:
            if i < preset.num_double:
                self.transformer_blocks[str(i)] = Flux2TransformerBlock(dim, heads, head_dim, mlp, eps, bias=False)
            else:
                self.single_transformer_blocks[str(i - preset.num_double)] = Flux2SingleTransformerBlock(
                    dim, heads, head_dim, mlp, eps, bias=False
                )
        if head:
            self.time_guidance_embed = Flux2TimestepGuidanceEmbeddings(
                in_channels=int(cfg["timestep_guidance_channels"]), embedding_dim=dim, bias=False,
                guidance_embeds=bool(cfg["guidance_embeds"]),
            )
            self.double_stream_modulation_img = Flux2Modulation(dim, mod_param_sets=2, bias=False)
            self.double_stream_modulation_txt = Flux2Modulation(dim, mod_param_sets=2, bias=False)
            self.single_stream_modulation = Flux2Modulation(dim, mod_param_sets=1, bias=False)
            self.x_embedder = torch.nn.Linear(int(cfg["in_channels"]), dim, bias=False)
            self.context_embedder = torch.nn.Linear(int(cfg["joint_attention_dim"]), dim, bias=False)
        if tail:
            patch = int(cfg["patch_size"])
            self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=eps, bias=False)
            self.proj_out = torch.nn.Linear(dim, patch * patch * preset.out_channels, bias=False)

    # --- the pieces of Flux2Transformer2DModel.forward ----------------------------------------

    def conditioning(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> Conditioning:
        """Timestep embedding and shared modulation vectors (head only). ``timestep`` is in [0, 1]."""
        timestep = timestep.to(dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
        temb = self.time_guidance_embed(timestep, guidance)
        return Conditioning(
            temb=temb,
            mod_img=self.double_stream_modulation_img(temb),
            mod_txt=self.double_stream_modulation_txt(temb),
            mod_single=self.single_stream_modulation(temb),
        )

    def embed(self, latents: torch.Tensor, text: torch.Tensor) -> Stream:
        """Project packed latents and prompt embeddings into the model width (head only)."""
        return Stream(txt_len=text.shape[1], pair=(self.context_embedder(text), self.x_embedder(latents)))

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.context_embedder(text)

    def embed_image(self, latents: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(latents)

    def rotary(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for ``[text; image]`` tokens (every stage computes them; no weights)."""
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        image = self.pos_embed(img_ids)
        text = self.pos_embed(txt_ids)
        return torch.cat([text[0], image[0]], dim=0), torch.cat([text[1], image[1]], dim=0)

    def run(self, start: int, end: int, stream: Stream, cond: Conditioning, rotary) -> Stream:
        """Run flat blocks ``[start, end)`` on ``stream``."""
        n_double = self.preset.num_double
        call = self.block_call or _eager
        for i in range(start, end):
            if i < n_double:
                block = self.transformer_blocks[str(i)]
                txt, img = stream.as_pair()
                txt, img = call(
                    block,
                    hidden_states=img,
                    encoder_hidden_states=txt,
                    temb_mod_img=cond.mod_img,
                    temb_mod_txt=cond.mod_txt,
                    image_rotary_emb=rotary,
                    joint_attention_kwargs=None,
                )
                stream.pair = (txt, img)
            else:
                block = self.single_transformer_blocks[str(i - n_double)]
                stream.joint = call(
                    block,
                    hidden_states=stream.as_joint(),
                    encoder_hidden_states=None,
                    temb_mod=cond.mod_single,
                    image_rotary_emb=rotary,
                    joint_attention_kwargs=None,
                )
        return stream

    def final(self, stream: Stream, temb: torch.Tensor) -> torch.Tensor:
        """Drop the text tokens, then ``norm_out`` and ``proj_out`` (tail only): the noise prediction."""
        hidden = stream.as_joint()[:, stream.txt_len :, ...]
        return self.proj_out(self.norm_out(hidden, temb))

    # --- bookkeeping --------------------------------------------------------------------------

    def tensor_prefixes(self) -> list[str]:
        """State-dict prefixes of everything this span holds."""
        prefixes = [block_prefix(self.preset, i) for i in self.block_indices]
        if self.has_head:
            prefixes += [m + "." for m in HEAD_MODULES]
        if self.has_tail:
            prefixes += [m + "." for m in TAIL_MODULES]
        return prefixes


def _eager(block: torch.nn.Module, **kwargs):
    return block(**kwargs)


def span_modules(preset: ModelPreset, blocks: Iterable[int], head: bool, tail: bool) -> SpanModel:
    """A SpanModel with no storage (meta device), ready to receive loaded or seeded tensors."""
    with torch.device("meta"):
        return SpanModel(preset, blocks, head, tail)
