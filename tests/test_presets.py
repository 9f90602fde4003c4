"""The real presets are the real models: block counts, widths and parameter counts as in
research/flux2.md §1.2 (built on the meta device, so no memory is used), and a span of every block
holds exactly the tensors of diffusers' whole transformer."""

import dataclasses

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from meshd.model.presets import PRESETS
from meshd.model.span import span_modules

# model: (double, single, heads, hidden, joint_attention_dim, guidance, params B, double block M, single block M,
#         non-block M, text-encoder width)  -- research/flux2.md §1.2
TABLE = {
    "dev": (8, 48, 48, 6144, 15360, True, 32.22, 981.5, 490.7, 816, 5120),
    "klein-9b": (8, 24, 32, 4096, 12288, False, 9.08, 436.2, 218.1, 354, 4096),
    "klein-4b": (5, 20, 24, 3072, 7680, False, 3.88, 245.4, 122.7, 195, 2560),
}


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(TABLE))
def test_real_preset_matches_the_published_architecture(name):
    double, single, heads, hidden, joint, guidance, total_b, double_m, single_m, rest_m, te_width = TABLE[name]
    preset = PRESETS[name]
    assert (preset.num_double, preset.num_single, preset.num_blocks) == (double, single, double + single)
    assert int(preset.transformer["num_attention_heads"]) == heads and preset.hidden == hidden
    assert int(preset.transformer["joint_attention_dim"]) == joint == len(preset.text_encoder_layers) * te_width
    assert bool(preset.transformer["guidance_embeds"]) is guidance
    assert preset.text_encoder == ("mistral3" if name == "dev" else "qwen3")
    assert preset.text_encoder_layers == ((10, 20, 30) if name == "dev" else (9, 18, 27))

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**preset.transformer)
    total = params(model)
    assert round(total / 1e9, 2) == total_b
    assert round(params(model.transformer_blocks[0]) / 1e6, 1) == double_m == round(preset.block_params(0) / 1e6, 1)
    assert round(params(model.single_transformer_blocks[0]) / 1e6, 1) == single_m == \
        round(preset.block_params(double) / 1e6, 1)
    blocks = sum(preset.block_params(i) for i in range(preset.num_blocks))
    assert round((total - blocks) / 1e6) == rest_m


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_span_of_every_block_holds_exactly_diffusers_tensors(name):
    preset = PRESETS[name]
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in Flux2Transformer2DModel(**preset.transformer).state_dict().items()}
    span = span_modules(preset, range(preset.num_blocks), True, True)
    assert {k: tuple(v.shape) for k, v in span.state_dict().items()} == reference


def test_tiny_has_the_real_structure_at_toy_size():
    tiny, real = PRESETS["tiny"], PRESETS["klein-9b"]
    assert tiny.num_double >= 2 and tiny.num_single >= 2 and tiny.text_encoder == "stand-in"
    shared = ("patch_size", "mlp_ratio", "rope_theta", "eps", "guidance_embeds")
    assert all(tiny.transformer[k] == real.transformer[k] for k in shared)
    assert int(tiny.transformer["joint_attention_dim"]) == 3 * 16  # three stacked layers of a width-16 encoder


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_out_channels_is_what_diffusers_builds_the_output_projection_for(name):
    """One derivation of the prediction's width (the span's tail, the planner's tail bytes and the head's
    reading of a prediction use it): diffusers' config leaves out_channels None, meaning in_channels."""
    preset = PRESETS[name]
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**preset.transformer)
        span = span_modules(preset, range(preset.num_blocks), False, True)
    patch = int(preset.transformer["patch_size"])
    assert model.proj_out.out_features == span.proj_out.out_features == patch * patch * preset.out_channels
    wider = dataclasses.replace(preset, transformer={**preset.transformer, "out_channels": 2 * preset.out_channels})
    assert wider.out_channels == 2 * int(preset.transformer["in_channels"])
