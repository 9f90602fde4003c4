"""Deterministic activation-like tensors shared by tests and benchmarks."""

from __future__ import annotations

import math

import torch


def structured_stream(tokens_h: int = 16, tokens_w: int = 16, prefix: int = 32, channels: int = 64,
                      outliers: int = 2, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[1, prefix + h*w, C]: smooth spatial fields per channel plus noise, a few channels 100-1000x larger."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, tokens_h).view(tokens_h, 1, 1)
    xs = torch.linspace(0, 1, tokens_w).view(1, tokens_w, 1)
    freq = torch.rand(1, 1, channels, generator=g) * 6 + 1
    phase = torch.rand(1, 1, channels, generator=g) * 2 * math.pi
    image = torch.sin(freq * (ys * 1.3 + xs) * math.pi + phase) + 0.3 * torch.cos(freq * ys * 3 - phase)
    image = image.reshape(tokens_h * tokens_w, channels) + 0.05 * torch.randn(tokens_h * tokens_w, channels, generator=g)
    text = torch.randn(prefix, channels, generator=g) * 0.5
    x = torch.cat([text, image]).unsqueeze(0)
    picks = torch.randperm(channels, generator=g)[:outliers]
    x[..., picks] *= torch.logspace(2, 3, outliers)
    return x.to(dtype)


def noise_stream(tokens: int = 288, channels: int = 64, seed: int = 1, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, channels, generator=g).to(dtype)
