"""Deterministic activation-like tensors for benchmarks and tests.

Random-weight models produce nearly uniform activations that look nothing like real FLUX ones
(GPU.md): real ones have strong spatial structure over the image grid and a few channels 100-1000x
larger than the rest. Fixture (a) has both; fixture (b) is plain noise, the worst case for any codec.
"""

from __future__ import annotations

import math

import torch


def structured_stream(grid_h: int = 64, grid_w: int = 64, prefix: int = 512, channels: int = 4096,
                      outliers: int = 8, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[1, prefix + grid_h*grid_w, C]``: per-channel smooth fields on the token grid plus 5% noise,
    noise-like text tokens first, and ``outliers`` channels scaled by 100..1000."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, grid_h).view(grid_h, 1, 1)
    xs = torch.linspace(0, 1, grid_w).view(1, grid_w, 1)
    freq = torch.rand(1, 1, channels, generator=g) * 6 + 1
    phase = torch.rand(1, 1, channels, generator=g) * 2 * math.pi
    mix = torch.rand(1, 1, channels, generator=g) * 2 - 1
    image = torch.sin(freq * (ys * 1.3 + xs * mix) * math.pi + phase) + 0.3 * torch.cos(freq * ys * 3 - phase)
    image = image.reshape(grid_h * grid_w, channels)
    image = image + 0.05 * torch.randn(grid_h * grid_w, channels, generator=g)
    text = torch.randn(prefix, channels, generator=g) * 0.5
    x = torch.cat([text, image]).unsqueeze(0)
    picks = torch.randperm(channels, generator=g)[:outliers]
    x[..., picks] *= torch.logspace(2, 3, outliers)
    return x.to(dtype)


def noise_stream(tokens: int = 4608, channels: int = 4096, seed: int = 1,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, channels, generator=g).to(dtype)
