"""Deterministic per-tensor weights: the same on every peer, whichever tensors it builds.

Each tensor's values depend only on a base seed and the tensor's name, so a peer that builds only
blocks 16-31 gets exactly the weights an all-local run has for those blocks.
"""

from __future__ import annotations

import hashlib
import math

import torch


def tensor_seed(base: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def seeded_value(base: str, name: str, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor initialised like a freshly built module (uniform +-1/sqrt(fan_in)), seeded by name."""
    device = torch.device(device)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var" or (leaf == "weight" and len(shape) == 1):
        return torch.ones(shape, device=device, dtype=dtype)  # norm scales, BN variance
    if leaf in ("bias", "running_mean") or len(shape) == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, device=device, dtype=torch.long)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(max(1, fan_in))
    g = torch.Generator(device=device).manual_seed(tensor_seed(base, name))
    out = torch.empty(shape, device=device, dtype=torch.float32)
    out.uniform_(-bound, bound, generator=g)
    return out.to(dtype)


def seeded_state(module: torch.nn.Module, base: str, device: torch.device | str, dtype: torch.dtype,
                 prefix: str = "") -> dict[str, torch.Tensor]:
    """Seeded values for every parameter and buffer of ``module`` (names prefixed with ``prefix``)."""
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        full = prefix + name
        value_dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
        out[full] = seeded_value(base, full, tuple(tensor.shape), device, value_dtype)
    return out
