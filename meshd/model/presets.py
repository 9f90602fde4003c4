"""The FLUX.2 models meshd knows, as data.

Block counts and sizes are the real ones (diffusers' convert script and BFL's reference code; see
research/flux2.md): dev 8 + 48 blocks of width 6144, klein-9B 8 + 24 of 4096, klein-4B 5 + 20 of
3072. ``tiny`` has the same structure at toy size, for tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: FLUX.2's scheduler settings (FlowMatchEulerDiscreteScheduler with exponential dynamic shift).
FLUX2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}

_COMMON = {
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "attention_head_dim": 128,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
}

_REAL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "batch_norm_eps": 1e-4,
}


@dataclass(frozen=True)
class ModelPreset:
    """A model family member: its transformer and VAE configs and how to sample it."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: str  # "qwen3", "mistral3" or "stand-in"
    distilled: bool  # step-distilled: no classifier-free guidance
    default_steps: int
    default_guidance: float
    default_size: int
    max_sequence_length: int
    text_encoder_layers: tuple[int, ...] = (9, 18, 27)
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLUX2_SCHEDULER))

    @property
    def num_double(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def num_single(self) -> int:
        return int(self.transformer["num_single_layers"])

    @property
    def num_blocks(self) -> int:
        return self.num_double + self.num_single

    @property
    def hidden(self) -> int:
        return int(self.transformer["num_attention_heads"]) * int(self.transformer["attention_head_dim"])

    @property
    def out_channels(self) -> int:
        """Latent channels the transformer predicts: diffusers' config leaves ``out_channels`` None for "as many
        as it takes in" (every FLUX.2 member)."""
        return int(self.transformer.get("out_channels") or self.transformer["in_channels"])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x 2x2 patches)."""
        return self.vae_scale_factor * 2

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The packed latent grid of a ``height`` x ``width`` image, (rows, columns) in tokens: each token
        is 2x2 VAE latents, each ``vae_scale_factor`` pixels a side. The one derivation: the sampler's
        latents, the head's geometry (what every stage prepares and compiles for) and the default size a
        daemon compiles at load all come from here."""
        return height // self.size_multiple, width // self.size_multiple

    def block_params(self, index: int) -> int:
        """Parameters of block ``index`` (bias-free: 26 D^2 double, 13 D^2 single)."""
        d = self.hidden
        return (26 if index < self.num_double else 13) * d * d


def _transformer(**kw) -> dict[str, Any]:
    cfg = dict(_COMMON)
    cfg.update(kw)
    return cfg


#: What the FLUX.2 [klein] members share: all but the transformer's size (the VAE, a Qwen3 text encoder,
#: step distillation to 4 steps without guidance, and the sampling defaults).
_KLEIN: dict[str, Any] = {
    "vae": _REAL_VAE,
    "text_encoder": "qwen3",
    "distilled": True,
    "default_steps": 4,
    "default_guidance": 1.0,
    "default_size": 1024,
    "max_sequence_length": 512,
}

PRESETS: dict[str, ModelPreset] = {
    "klein-9b": ModelPreset(
        name="klein-9b",
        transformer=_transformer(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                 joint_attention_dim=12288, guidance_embeds=False),
        **_KLEIN,
    ),
    "klein-4b": ModelPreset(
        name="klein-4b",
        transformer=_transformer(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                 joint_attention_dim=7680, guidance_embeds=False),
        **_KLEIN,
    ),
    "dev": ModelPreset(
        name="dev",
        transformer=_transformer(num_layers=8, num_single_layers=48, num_attention_heads=48,
                                 joint_attention_dim=15360, guidance_embeds=True),
        vae=_REAL_VAE,
        text_encoder="mistral3",
        distilled=False,
        default_steps=50,
        default_guidance=4.0,
        default_size=1024,
        max_sequence_length=512,
        text_encoder_layers=(10, 20, 30),
    ),
    "tiny": ModelPreset(
        name="tiny",
        transformer=_transformer(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=16,
                                 in_channels=16, joint_attention_dim=48, timestep_guidance_channels=32,
                                 axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False),
        vae={  # the real VAE at toy size
            **_REAL_VAE,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 4,
            "sample_size": 64,
        },
        text_encoder="stand-in",
        distilled=True,
        default_steps=4,
        default_guidance=1.0,
        default_size=64,
        max_sequence_length=32,
        # The stand-in ignores this; a test-sized real Qwen3 (3 layers of width 16) reads these.
        text_encoder_layers=(1, 2, 3),
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
